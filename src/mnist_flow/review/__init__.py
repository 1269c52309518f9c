"""Reviewing results: reports, optuna-dashboard, prediction and the model API."""
