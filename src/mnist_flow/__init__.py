"""mnist-flow: tune, train, evaluate and register handwritten-digit classifiers.

The package is a plain library (no orchestration); ``flows/`` composes it into Prefect flows.
"""

__version__ = "0.1.0"
