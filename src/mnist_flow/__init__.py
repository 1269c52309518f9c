"""mnist-flow: tune, train, evaluate and register handwritten-digit classifiers.

The package is a plain library (no orchestration); ``flows/`` composes it into Prefect flows.
``mnist_flow.load_model("champion")`` loads a registered model and its preprocessing for notebooks;
it is imported on first use, so ``import mnist_flow`` stays cheap and has no side effects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]

if TYPE_CHECKING:
    from mnist_flow.registry.store import load_model


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from mnist_flow.registry.store import load_model

        return load_model
    raise AttributeError(f"module 'mnist_flow' has no attribute {name!r}")
