"""The champion/challenger gate: pure functions, no database.

A challenger replaces the champion only if it was evaluated on the same test set (equal
dataset fingerprints), beats the champion's accuracy by more than ``margin``, and, unless
``alpha`` is None, the exact McNemar test on the per-sample disagreements gives p < alpha.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import comb

import torch

from mnist_flow.errors import ConfigError


@dataclass(frozen=True)
class Decision:
    """What the gate decided and why; ``b``/``c`` count challenger-only / champion-only correct samples."""

    outcome: str
    reason: str
    challenger_accuracy: float
    champion_accuracy: float | None
    p_value: float | None
    b: int | None
    c: int | None
    margin: float
    alpha: float | None

    @property
    def promotes(self) -> bool:
        """True when the challenger becomes champion."""
        return self.outcome in ("promoted", "first")


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial(b+c, 1/2) test on the discordant pairs."""
    if b < 0 or c < 0:
        raise ValueError(f"Discordant counts must be >= 0, got b={b}, c={c}.")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def _accuracy(correct: torch.Tensor) -> float:
    return float(correct.to(torch.float64).mean().item()) if correct.numel() else 0.0


def _as_bool(correct: torch.Tensor, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(correct).reshape(-1)
    if tensor.dtype != torch.bool:
        tensor = tensor != 0
    if tensor.numel() == 0:
        raise ConfigError(f"The {what} was evaluated on no samples.", fix="Evaluate on a non-empty test set.")
    return tensor.cpu()


def decide(
    challenger_correct: torch.Tensor,
    champion_correct: torch.Tensor | None,
    *,
    challenger_fingerprint: str,
    champion_fingerprint: str | None,
    margin: float,
    alpha: float | None,
) -> Decision:
    """Decide whether the challenger replaces the champion (see the module docstring for the rules)."""
    if margin < 0 or (alpha is not None and not 0 < alpha <= 1):
        raise ConfigError(
            f"Invalid gate settings margin={margin}, alpha={alpha}.",
            fix="Use margin >= 0 and 0 < alpha <= 1 (or no alpha).",
        )
    challenger = _as_bool(challenger_correct, "challenger")
    challenger_acc = _accuracy(challenger)

    def unpaired(outcome: str, reason: str) -> Decision:  # no paired comparison: no champion figures
        return Decision(outcome, reason, challenger_acc, None, None, None, None, margin, alpha)

    if champion_fingerprint is None:
        return unpaired("first", "no champion yet: the first model becomes champion")
    if challenger_fingerprint != champion_fingerprint:
        # Checked before any paired comparison: the caller does not score the champion on other data.
        return unpaired(
            "blocked",
            f"dataset fingerprints differ (challenger {challenger_fingerprint}, champion {champion_fingerprint}): "
            "the accuracies are not comparable, nothing was promoted automatically; promote by hand if intended",
        )
    if champion_correct is None:
        raise ConfigError(
            "The champion has the challenger's data fingerprint but was not scored on its test set.",
            fix="Pass the champion's per-sample results (champion_correct).",
        )
    champion = _as_bool(champion_correct, "champion")
    champion_acc = _accuracy(champion)
    if challenger.shape != champion.shape:
        raise ConfigError(
            f"Challenger and champion were scored on different numbers of samples "
            f"({challenger.numel()} vs {champion.numel()}) despite equal fingerprints.",
            fix="Evaluate both models on the same test set.",
        )
    b = int((challenger & ~champion).sum().item())
    c = int((~challenger & champion).sum().item())
    p_value = mcnemar_exact(b, c)
    gain = challenger_acc - champion_acc
    if gain <= margin:
        reason = (
            f"accuracy gain {gain:+.4f} ({challenger_acc:.4f} vs {champion_acc:.4f}) "
            f"is not above the margin {margin:.4f}"
        )
        return Decision("kept", reason, challenger_acc, champion_acc, p_value, b, c, margin, alpha)
    if alpha is not None and not p_value < alpha:
        reason = (
            f"accuracy gain {gain:+.4f} is above the margin {margin:.4f} but not significant: "
            f"McNemar p={p_value:.4g} (b={b}, c={c}) >= alpha {alpha}"
        )
        return Decision("kept", reason, challenger_acc, champion_acc, p_value, b, c, margin, alpha)
    test = "significance test off" if alpha is None else f"McNemar p={p_value:.4g} < alpha {alpha}"
    reason = f"accuracy gain {gain:+.4f} ({challenger_acc:.4f} vs {champion_acc:.4f}) > margin {margin:.4f}; {test}"
    return Decision("promoted", reason, challenger_acc, champion_acc, p_value, b, c, margin, alpha)
