"""`python -m mnist_flow.cli`."""

from mnist_flow.cli import run

run()
