"""The MLP, its hand-written SGD step and the one training loop."""
