"""Database engines, URL masking, the Optuna storage, cross-process locks and atomic file writes."""
