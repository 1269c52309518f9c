"""How numbers and hyperparameters are written in tables, logs, notes and Markdown summaries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def format_value(value: Any, digits: int = 4, *, small: float = 0.0) -> str:
    """``-`` for None; a float with ``digits`` decimals; anything else as ``str``.

    A float with ``0 < |value| < small`` gets ``digits`` significant digits instead, so a small
    p-value or learning rate does not print as 0.0000.
    """
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if value and abs(value) < small else f"{value:.{digits}f}"
    return str(value)


def format_params(params: Mapping[str, Any], *, code: bool = False) -> str:
    """``name=value`` pairs joined by ``, `` (floats with 4 significant digits); ``code`` puts names in backticks."""

    def name(key: str) -> str:
        return f"`{key}`" if code else key

    return ", ".join(f"{name(k)}={v:.4g}" if isinstance(v, float) else f"{name(k)}={v}" for k, v in params.items())


def markdown_params(params: Mapping[str, Any]) -> str:
    """Name = value pairs for Markdown, names in backticks (4 digits; rates below 0.01 keep theirs), or ``-``."""
    return ", ".join(f"`{k}` = {format_value(v, 4, small=1e-2)}" for k, v in params.items()) or "-"
