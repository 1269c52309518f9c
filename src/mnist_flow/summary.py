"""The run's result: :class:`RunSummary`, what the `mnist` flow returns, with its own rendering.

``lines()`` is the terminal summary (printed by `python flows/mnist.py` and logged by the flow),
``markdown()`` the flow run's Prefect artifact (flows/reporting.py), ``to_dict()`` the JSON form
(``--json``; the same keys as the attributes). The database URL is masked wherever it is shown.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mnist_flow.formatting import format_params, format_value, markdown_params
from mnist_flow.storage.db import mask_url


@dataclass(frozen=True)
class DataSummary:
    """The dataset the run used and the sizes of its splits."""

    name: str
    source: str
    origin: str
    fingerprint: str
    train_samples: int
    val_samples: int
    test_samples: int


@dataclass(frozen=True)
class TrialCounts:
    """This run's finished trials (complete and pruned) and all trials of the study."""

    finished: int
    complete: int
    pruned: int
    in_study: int
    epochs: int  # the epochs the finished trials trained (pruned ones stopped early): the tuning's work


@dataclass(frozen=True)
class BestTrial:
    """The trial whose configuration was fitted: its number, parameters and validation accuracy."""

    trial: int
    params: dict[str, Any]
    val_accuracy: float


@dataclass(frozen=True)
class FinalMetrics:
    """The registered model's validation accuracy (its kept epoch) and its test results. ``val_seen``: the model
    trained on the validation images too (``final_data="train+val"``), so its validation figure is not held out."""

    val_accuracy: float
    test_accuracy: float
    test_loss: float
    val_seen: bool = False


@dataclass(frozen=True)
class FitSummary:
    """The final fit kept: its training seed (of ``fits`` seeds), its epochs, the one kept (best validation), its
    divergence recoveries, and the notes of every fit. ``ensemble``: the seeds of the fits whose ensemble was
    registered (then the other figures are those of the best of them)."""

    seed: int
    fits: int
    epochs: int
    best_epoch: int
    recoveries: int
    notes: tuple[str, ...] = ()
    ensemble: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelSummary:
    """The registered version and whether it is the champion."""

    name: str
    version: int
    champion: bool
    artifact: str


@dataclass(frozen=True)
class DecisionSummary:
    """The gate's decision on the registered version."""

    outcome: str
    reason: str
    p_value: float | None
    challenger_accuracy: float | None
    champion_accuracy: float | None


@dataclass(frozen=True)
class RunSummary:
    """What a run did and produced. Built by :func:`mnist_flow.pipeline.build_summary`."""

    data: DataSummary
    study: str
    trials: TrialCounts
    best: BestTrial
    params: dict[str, Any]
    metrics: FinalMetrics
    final_fit: FitSummary
    model: ModelSummary
    decision: DecisionSummary | None
    seconds: dict[str, float]
    database: str
    dashboard_command: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``--json``): nested dicts with the attributes' names."""
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """The human-readable summary, one fact a line."""
        d, t, fit, model = self.data, self.trials, self.final_fit, self.model
        registered = f"{model.name} v{model.version} " + (
            "(champion)" if model.champion else "(challenger, not promoted)"
        )
        return [
            f"data:        {d.name} from {d.source} ({d.train_samples} train / {d.val_samples} val / "
            f"{d.test_samples} test), fingerprint {d.fingerprint[:16]}",
            f"study:       {self.study} ({t.finished} trials this run: {t.complete} complete, {t.pruned} pruned; "
            f"{t.epochs} epochs)",
            f"best params: trial #{self.best.trial}: " + format_params(self.best.params),
            f"accuracy:    best trial val {self.best.val_accuracy:.4f}; final model val "
            f"{self.metrics.val_accuracy:.4f}{' (on images it trained on)' if self.metrics.val_seen else ''}, "
            f"test {self.metrics.test_accuracy:.4f}",
            "final fit:   "
            + (
                f"ensemble of {len(fit.ensemble)} seeds' fits ({', '.join(map(str, fit.ensemble))}), best fit's "
                if fit.ensemble
                else f"seed {fit.seed} of {fit.fits} seeds kept, "
                if fit.fits > 1
                else ""
            )
            + f"epoch {fit.best_epoch} of {fit.epochs} kept (best val), "
            f"{fit.recoveries} divergence recover{'y' if fit.recoveries == 1 else 'ies'}",
            f"registered:  {registered}" + (f": {self.decision.reason}" if self.decision else ""),
            "stages:      " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()),
            f"dashboard:   {self.dashboard_command}",
        ]

    def markdown(self) -> str:
        """The summary as Markdown: best parameters, accuracies, the champion comparison, seconds per stage
        and the data (its origin and the database URL masked)."""
        d, t, best, m, model = self.data, self.trials, self.best, self.metrics, self.model
        lines = [
            f"# mnist run: {d.name}, study `{self.study}`",
            "",
            "## Result",
            "",
            "| | |",
            "|---|---|",
            f"| best trial | #{best.trial} (validation accuracy {_fmt(best.val_accuracy)}) |",
            f"| best parameters | {markdown_params(best.params)} |",
            f"| final model validation accuracy | {_fmt(m.val_accuracy)}"
            f"{' (the final fit trained on the validation images too)' if m.val_seen else ''} |",
            f"| final model test accuracy | {_fmt(m.test_accuracy)} |",
            f"| test loss | {_fmt(m.test_loss)} |",
            f"| trials this run | {t.finished} finished ({t.complete} complete, {t.pruned} pruned), {t.epochs} epochs; "
            f"{t.in_study} in the study |",
            "",
            "## Champion comparison",
            "",
        ]
        status = "is the champion" if model.champion else "is a challenger (not promoted)"
        lines.append(f"Registered `{model.name}` v{model.version}; it {status}.")
        if self.decision is not None:
            decision = self.decision
            lines += ["", f"- outcome: **{decision.outcome}**", f"- reason: {decision.reason}"]
            for value, label in (
                (decision.p_value, "McNemar p-value"),
                (decision.champion_accuracy, "champion test accuracy"),
                (decision.challenger_accuracy, "challenger test accuracy"),
            ):
                if value is not None:
                    lines.append(f"- {label}: {_fmt(value)}")
        else:
            lines += ["", "No comparison was needed (this version already was the champion)."]
        lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in self.seconds.items()]
        lines += [
            "",
            "## Data",
            "",
            f"- dataset: {d.name} from {d.source} ({mask_url(d.origin)})",
            f"- samples: {d.train_samples} train / {d.val_samples} validation / {d.test_samples} test",
            f"- fingerprint: `{d.fingerprint}`",
            "",
            f"Study database: `{mask_url(self.database)}`",
            f"Dashboard: `{mask_url(self.dashboard_command)}`",
        ]
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return format_value(value, 4, small=1e-2)  # learning rates below 0.01 keep their digits
