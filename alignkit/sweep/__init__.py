"""Hyperparameter sweeps over one pipeline stage on Optuna (``alignkit sweep CONFIG``)."""
