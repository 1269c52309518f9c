"""The Optuna study: search space, objective, the exact trial budget across processes."""
