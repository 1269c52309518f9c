"""Reports of a study: a trials table (pandas), Markdown summaries and PNG plots (matplotlib, Agg).

``write_report`` writes into one folder:

* ``trials.csv``: one row per trial (number, state, value, one ``params_*`` column per parameter,
  duration, worker, run key, epochs run, start and end times);
* ``summary.md``: the study, its best trials, the champion and the list of plots;
* ``optimization_history.png``, ``param_importances.png``, ``validation_curves.png``,
  ``param_scatter.png`` and, when the dataset has a champion, ``confusion_matrix.png`` (the
  champion on the test set: loaded through the registry, which checks the weights' SHA-256).

``trials_frame`` and ``table_records`` also feed the Prefect artifacts of ``flows/reporting.py`` (with
``RunSummary.markdown()``); nothing here imports Prefect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
import torch
from optuna.trial import FrozenTrial, TrialState

from mnist_flow.data import datasets as data_lib
from mnist_flow.errors import ConfigError, DataError
from mnist_flow.formatting import format_value, markdown_params
from mnist_flow.search.study import last_value

if TYPE_CHECKING:
    from mnist_flow.registry.store import ModelVersion, Registry

TOP_TRIALS = 5
PLOT_DPI = 110


# --- tables ---------------------------------------------------------------------------------------


def _duration(trial: FrozenTrial) -> float | None:
    return round(trial.duration.total_seconds(), 3) if trial.duration else None


def _epochs(trial: FrozenTrial) -> int:
    curve = trial.user_attrs.get("val_accuracy")
    return len(curve) if isinstance(curve, list) else len(trial.intermediate_values)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, ``params_*``, duration_s, worker, run_key, epochs, times.

    ``value`` is the validation accuracy: of the last epoch for complete trials, of the epoch where
    the pruner stopped for pruned ones (Optuna's convention), empty for failed or running trials.
    """
    trials = study.get_trials(deepcopy=False)
    param_names = sorted({name for t in trials for name in t.params})
    rows = []
    for t in trials:
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "value": t.value}
        for name in param_names:
            row[f"params_{name}"] = t.params.get(name)
        row.update(
            {
                "duration_s": _duration(t),
                "worker": t.user_attrs.get("worker"),
                "run_key": t.user_attrs.get("run_key"),
                "flow_run_id": t.user_attrs.get("flow_run_id"),
                "epochs": _epochs(t),
                "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
                "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
            }
        )
        rows.append(row)
    columns = [
        "number",
        "state",
        "value",
        *(f"params_{n}" for n in param_names),
        "duration_s",
        "worker",
        "run_key",
        "flow_run_id",
        "epochs",
        "datetime_start",
        "datetime_complete",
    ]
    return pd.DataFrame(rows, columns=columns)


def table_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """``frame`` as JSON-ready records: NaN becomes None, floats are rounded for display."""
    records = []
    for row in frame.to_dict(orient="records"):
        clean: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, float):
                value = None if math.isnan(value) else round(value, 6)
            elif hasattr(value, "item"):  # numpy scalars
                value = value.item()
            clean[key] = value
        records.append(clean)
    return records


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials, best first (ties: the earlier trial)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(trials, key=lambda t: (-(t.value if t.value is not None else -math.inf), t.number))


# --- Markdown ---------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    return format_value(value, digits, small=1e-2)  # learning rates below 0.01 keep their digits


# --- plots ------------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=PLOT_DPI)
    return path


def plot_optimization_history(study: optuna.Study, path: Path) -> Path:
    """Validation accuracy per trial (pruned trials at their last reported value) and the best so far."""
    fig = _figure()
    ax = fig.add_subplot()
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and last_value(t) is not None]
    if complete:
        ax.scatter([t.number for t in complete], [t.value for t in complete], label="complete", color="tab:blue")
        best, xs, ys = -math.inf, [], []
        for t in complete:
            best = max(best, float(t.value or 0.0))
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [last_value(t) for t in pruned],
            marker="x",
            color="tab:gray",
            label="pruned (last epoch)",
        )
    if not complete and not pruned:
        ax.text(0.5, 0.5, "no finished trials yet", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"Optimization history: {study.study_name}")
    if complete or pruned:
        ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


IMPORTANCE_METHOD = "PED-ANOVA"


def param_importances(study: optuna.Study) -> tuple[dict[str, float] | None, str | None]:
    """PED-ANOVA importances, or ``(None, reason)`` when they cannot be computed.

    PED-ANOVA needs only numpy (optuna's default, fANOVA, needs scikit-learn) and is deterministic.
    """
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n_complete < 2:
        return None, f"importances need at least 2 complete trials; the study has {n_complete}"
    try:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), None
    except (ValueError, RuntimeError, ZeroDivisionError, ImportError) as exc:
        return None, f"importances could not be computed: {exc}"


def plot_param_importances(study: optuna.Study, path: Path) -> tuple[Path, dict[str, float] | None, str | None]:
    """A bar chart of hyperparameter importances, or a figure saying why there is none.

    Returns the plot's path, the importances and, when there are none, the reason.
    """
    importances, reason = param_importances(study)
    fig = _figure(6.0, 3.5)
    ax = fig.add_subplot()
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel(f"importance ({IMPORTANCE_METHOD})")
    else:
        ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("Hyperparameter importances")
    return _save(fig, path), importances, reason


def _curve(trial: FrozenTrial) -> list[float]:
    curve = trial.user_attrs.get("val_accuracy")
    if isinstance(curve, list) and curve:
        return [float(v) for v in curve]
    return [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]


def plot_validation_curves(study: optuna.Study, path: Path, top: int = TOP_TRIALS) -> Path:
    """Validation accuracy per epoch of the ``top`` best complete trials."""
    fig = _figure()
    ax = fig.add_subplot()
    best = complete_trials(study)[:top]
    for t in best:
        curve = _curve(t)
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=f"#{t.number} ({_fmt(t.value)})")
    if best:
        ax.legend(title="trial (val acc)", loc="lower right")
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        ax.text(0.5, 0.5, "no complete trials yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"Validation curves of the best {len(best)} trial(s)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_param_scatter(study: optuna.Study, path: Path) -> Path:
    """lr (log) against momentum, coloured by validation accuracy; pruned trials hollow."""
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    trials = [t for t in study.get_trials(deepcopy=False) if "lr" in t.params and "momentum" in t.params]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    others = [t for t in trials if t not in complete]
    if complete:
        points = ax.scatter(
            [t.params["lr"] for t in complete],
            [t.params["momentum"] for t in complete],
            c=[t.value for t in complete],
            cmap="viridis",
            label="complete",
        )
        fig.colorbar(points, ax=ax, label="validation accuracy")
    if others:
        ax.scatter(
            [t.params["lr"] for t in others],
            [t.params["momentum"] for t in others],
            facecolors="none",
            edgecolors="tab:gray",
            label="pruned / failed",
        )
    if trials:
        ax.set_xscale("log")
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no trials with lr and momentum", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("lr")
    ax.set_ylabel("momentum")
    ax.set_title("Search: lr and momentum")
    return _save(fig, path)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """``[true, predicted]`` counts."""
    index = labels.reshape(-1).cpu().to(torch.int64) * classes + predictions.reshape(-1).cpu().to(torch.int64)
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes)


def plot_confusion_matrix(matrix: torch.Tensor, class_names: Sequence[str], path: Path, title: str) -> Path:
    """The confusion matrix as a heat map with counts in the cells."""
    fig = _figure(6.5, 6.0)
    ax = fig.add_subplot()
    values = matrix.numpy()
    image = ax.imshow(values, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    labels = [str(c).split(" - ")[0] for c in class_names]
    ax.set_xticks(range(len(labels)), labels, rotation=45 if max(map(len, labels)) > 2 else 0)
    ax.set_yticks(range(len(labels)), labels)
    threshold = values.max() / 2 if values.size else 0
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if values[i, j]:
                ax.text(
                    j,
                    i,
                    str(values[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if values[i, j] > threshold else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


# --- the champion on the test set -------------------------------------------------------------------


@dataclass(frozen=True)
class ChampionEvaluation:
    """The champion's predictions on the test set of the data it was trained on."""

    version: ModelVersion
    accuracy: float
    matrix: torch.Tensor
    classes: tuple[str, ...]
    data_source: str


@dataclass(frozen=True)
class ChampionData:
    """Where to look for the data a champion was trained on (for its test set); see :func:`load_test_data`."""

    source: str | None = None
    data_dir: Path | None = None
    cache_dir: Path | None = None
    mirrors: Sequence[str] = ()


def load_test_data(dataset: str, fingerprint: str, where: ChampionData = ChampionData()) -> data_lib.DataBundle:
    """The dataset the champion was trained on (same fingerprint), for its test set.

    With ``where.source=None`` the bundled sample is tried first (MNIST, cheap), then the download cache
    under ``where.cache_dir`` if it holds the four files (a report never starts a download by itself); a
    dataset whose fingerprint differs is refused with a DataError.
    """
    cache_dir = where.cache_dir
    if where.source is not None:
        candidates = [where.source]
    else:
        cached = cache_dir is not None and all(
            (Path(cache_dir) / dataset / "raw" / f"{base}.gz").is_file() for base in data_lib.FILES.values()
        )
        candidates = (["sample"] if dataset == "mnist" else []) + (["download"] if cached else [])
    found: list[str] = []
    for candidate in candidates:
        bundle = data_lib.load_dataset(
            dataset,
            candidate,
            data_dir=where.data_dir if candidate == "dir" else None,
            cache_dir=cache_dir or Path("."),
            mirrors=where.mirrors,
        )
        if bundle.fingerprint == fingerprint:
            return bundle
        found.append(f"{candidate}: {bundle.fingerprint[:16]}")
    raise DataError(
        f"No {dataset} data with the champion's fingerprint {fingerprint[:16]} was found"
        + (f" (found {'; '.join(found)})" if found else "")
        + ".",
        fix="Pass the data the champion was trained on: `mnist-flow report --source dir --data-dir DIR` "
        "(or --source download).",
    )


def evaluate_champion(registry: Registry, name: str, bundle: data_lib.DataBundle) -> ChampionEvaluation:
    """Load the champion through the registry (SHA-256 checked) and predict the test set."""
    from mnist_flow.training.loop import evaluate

    model, _, version = registry.load(name, "champion")
    test_x = data_lib.to_features(bundle.test_images)
    result = evaluate(model, test_x, bundle.test_labels)
    matrix = confusion_matrix(result.predictions, bundle.test_labels, len(bundle.classes))
    return ChampionEvaluation(version, result.accuracy, matrix, tuple(bundle.classes), bundle.source)


# --- the report -------------------------------------------------------------------------------------


@dataclass
class Report:
    """What ``write_report`` wrote, and what it had to leave out (with the reason)."""

    out_dir: Path
    csv: Path
    summary: Path
    plots: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    champion: ChampionEvaluation | None = None


def write_report(
    study: optuna.Study,
    registry: Registry | None,
    out_dir: Path,
    *,
    data: ChampionData = ChampionData(),
    top: int = TOP_TRIALS,
) -> Report:
    """Write ``trials.csv``, ``summary.md`` and the PNG plots of ``study`` into ``out_dir``.

    The champion of the study's dataset (from ``registry``) is evaluated on the test set of the
    data it was trained on, looked for as ``data`` says (:func:`load_test_data`);
    without a champion, or without that data, the confusion matrix is skipped and summary.md says why.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set here, not at import, so importers keep their backend
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a folder.", fix="Pass a folder path with --out.")
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = trials_frame(study)
    csv_path = out_dir / "trials.csv"
    frame.to_csv(csv_path, index=False)
    report = Report(out_dir, csv_path, out_dir / "summary.md")
    report.plots.append(plot_optimization_history(study, out_dir / "optimization_history.png"))
    importance_path, importances, no_importances = plot_param_importances(study, out_dir / "param_importances.png")
    report.plots.append(importance_path)
    report.plots.append(plot_validation_curves(study, out_dir / "validation_curves.png", top))
    report.plots.append(plot_param_scatter(study, out_dir / "param_scatter.png"))
    dataset = study.user_attrs.get("dataset")
    if dataset is None:
        report.skipped["confusion_matrix.png"] = "the study has no 'dataset' attribute, so no champion to evaluate"
    else:
        from mnist_flow.pipeline import model_name

        name = model_name(dataset)
        champion = registry.champion(name) if registry is not None and name in registry.names() else None
        if champion is None or registry is None:
            report.skipped["confusion_matrix.png"] = f"no champion of model {name!r} is registered yet"
        else:
            try:
                bundle = load_test_data(champion.dataset_name, champion.dataset_fingerprint, data)
            except DataError as exc:
                report.skipped["confusion_matrix.png"] = exc.message
            else:
                report.champion = evaluate_champion(registry, name, bundle)
                title = (
                    f"{name} v{champion.version} (champion) on the {bundle.source} test set: "
                    f"accuracy {report.champion.accuracy:.4f}"
                )
                report.plots.append(
                    plot_confusion_matrix(
                        report.champion.matrix, bundle.classes, out_dir / "confusion_matrix.png", title
                    )
                )
    report.summary.write_text(
        report_markdown(study, frame, report, importances, top, importances_reason=no_importances)
    )
    return report


def report_markdown(
    study: optuna.Study,
    frame: pd.DataFrame,
    report: Report,
    importances: dict[str, float] | None,
    top: int = TOP_TRIALS,
    *,
    importances_reason: str | None = None,
) -> str:
    """summary.md: the study, its trials by state, the best trials, importances, the champion, the files.

    ``importances_reason`` says why ``importances`` is None (as :func:`param_importances` returns it).
    """
    attrs = study.user_attrs
    counts = frame["state"].value_counts().to_dict() if len(frame) else {}
    lines = [
        f"# Study `{study.study_name}`",
        "",
        f"- dataset: {attrs.get('dataset', '-')}, fingerprint `{attrs.get('fingerprint', '-')}`",
        f"- trials: {len(frame)} ("
        + (", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "none")
        + ")",
    ]
    if attrs.get("search_space"):
        space = attrs["search_space"]
        lines.append(
            "- search space: "
            + ", ".join(
                f"{p} {_fmt(space.get(f'{p}_min'))}..{_fmt(space.get(f'{p}_max'))}"
                for p in ("lr", "momentum", "hidden1", "hidden2")
                if f"{p}_min" in space
            )
        )
    best = complete_trials(study)[:top]
    lines += ["", f"## Best {len(best)} trial(s)", ""]
    if best:
        names = sorted({n for t in best for n in t.params})
        lines += [
            "| trial | val accuracy | " + " | ".join(names) + " | epochs | seconds |",
            "|---:|---:|" + "---:|" * len(names) + "---:|---:|",
        ]
        for t in best:
            lines.append(
                f"| {t.number} | {_fmt(t.value)} | "
                + " | ".join(_fmt(t.params.get(n)) for n in names)
                + f" | {_epochs(t)} | {_fmt(_duration(t), 1)} |"
            )
    else:
        lines.append("No trial has completed yet.")
    lines += ["", f"## Hyperparameter importances ({IMPORTANCE_METHOD})", ""]
    if importances:
        lines += [f"- {name}: {value:.3f}" for name, value in importances.items()]
    else:
        lines.append(f"Not available ({importances_reason or 'no importances were computed'}).")
    lines += ["", "## Champion", ""]
    if report.champion is not None:
        v = report.champion.version
        recorded = v.metrics.get("test_accuracy") if isinstance(v.metrics, dict) else None
        lines += [
            f"- `{v.name}` v{v.version}, from study `{v.study_name}` trial #{v.trial_number}",
            f"- test accuracy now: {report.champion.accuracy:.4f} on the {report.champion.data_source} test "
            f"set (recorded at registration: {_fmt(recorded)})",
            "- parameters: " + markdown_params({k: v.params[k] for k in ("lr", "momentum", "hidden") if k in v.params}),
        ]
    else:
        lines.append(f"Not evaluated: {report.skipped.get('confusion_matrix.png', 'no champion')}.")
    lines += ["", "## Files", "", f"- [{report.csv.name}]({report.csv.name})"]
    lines += [f"- ![{p.stem.replace('_', ' ')}]({p.name})" for p in report.plots]
    for name, reason in report.skipped.items():
        lines.append(f"- {name}: skipped ({reason})")
    return "\n".join(lines) + "\n"


def resolve_study_name(storage: Any, name: str | None) -> str:
    """``name`` if the storage holds it; without a name, the only study there."""
    names = optuna.get_all_study_names(storage)
    if name is not None:
        if name not in names:
            raise ConfigError(
                f"No study named {name!r}; studies: {', '.join(names) or '(none)'}.",
                fix="Pass one of the listed names with --study.",
            )
        return name
    if len(names) == 1:
        return names[0]
    if not names:
        raise ConfigError("The database holds no study yet.", fix="Run the flow or `mnist-flow tune` first.")
    raise ConfigError(f"The database holds several studies: {', '.join(names)}.", fix="Choose one with --study NAME.")
