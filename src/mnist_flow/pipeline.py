"""The pipeline's stages as plain functions: prepare data, tune, fit the best, evaluate, register.

``flows/mnist.py`` wraps each stage in a Prefect task; ``mnist-flow tune`` and ``mnist-flow train``
call the same functions without Prefect. Parameters are validated once, in :class:`RunParams`,
before any work starts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import optuna
import torch
from optuna.trial import FrozenTrial
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mnist_flow import data as data_lib
from mnist_flow.budget import fail_stale_trials, trial_lock
from mnist_flow.dashboard import annotate_finished_trial
from mnist_flow.db import dispose_storage, mask_url, optuna_storage
from mnist_flow.errors import ConfigError
from mnist_flow.formatting import format_params
from mnist_flow.progress import NullProgress, Progress
from mnist_flow.settings import Settings
from mnist_flow.train import (EvalResult, History, TrainConfig, evaluate, resolve_precision, select_device,
                              train_model)
from mnist_flow.tune import (Objective, SearchSpace, Splits, best_trial, config_from_params, last_value,
                             open_study, recipe_of, run_study, study_name_for)

DatasetName = Literal["mnist", "fashion-mnist"]
SourceName = Literal["auto", "download", "dir", "sample"]


class RunParams(BaseModel):
    """The flow's parameters: flat, typed and checked before any work."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: DatasetName = Field("mnist", description="Which dataset: mnist or fashion-mnist.")
    source: SourceName = Field("auto", description="Where the data comes from: auto, download, dir or sample.")
    data_dir: Path | None = Field(None, description="Folder with the four IDX files (source=dir).")
    n_trials: int = Field(20, ge=1, description="Optuna trials to finish in this run.")
    max_epochs: int = Field(8, ge=1, description="Epochs per trial (the pruner may stop a trial earlier).")
    final_epochs: int = Field(24, ge=1, description="Epochs of the final fit of the best configuration.")
    seed: int = Field(0, ge=0, description="Seed of the split, the sampler, the initial weights and the batches.")
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Trial processes running the study at the same time: auto (one per available CPU, "
        "no more than n_trials and than the memory holds) or a number; 1 runs the trials in the flow's process.")
    trial_runner: Literal["local", "deployment"] = Field(
        "local", description="Where workers > 1 run: local (processes on this machine, Prefect's "
        "ProcessPoolTaskRunner) or deployment (runs of mnist-trials/worker on any Prefect worker).")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of the training set held out for validation.")
    batch_size: int = Field(128, ge=1, description="Mini-batch size.")
    weight_decay: float = Field(5e-4, ge=0.0, description="L2 weight decay of SGD.")
    schedule: Literal["constant", "onecycle"] = Field("onecycle", description="Learning-rate schedule.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Training arithmetic: bf16 matmuls where the hardware has them natively, else fp32.")
    lr_min: float = Field(1e-3, gt=0.0, description="Lower bound of the learning rate (log scale).")
    lr_max: float = Field(0.3, gt=0.0, description="Upper bound of the learning rate.")
    momentum_min: float = Field(0.5, ge=0.0, lt=1.0, description="Lower bound of the momentum.")
    momentum_max: float = Field(0.98, ge=0.0, lt=1.0, description="Upper bound of the momentum.")
    hidden1_min: int = Field(128, ge=1, description="Lower bound of the first hidden layer's width.")
    hidden1_max: int = Field(1024, ge=1, description="Upper bound of the first hidden layer's width.")
    hidden2_min: int = Field(64, ge=1, description="Lower bound of the second hidden layer's width.")
    hidden2_max: int = Field(512, ge=1, description="Upper bound of the second hidden layer's width.")

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        """One message for ``workers`` (the union would report both of its members)."""
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("workers must be 'auto' or a whole number >= 1")

    @model_validator(mode="after")
    def _check(self) -> "RunParams":
        self.search_space().validate()
        if self.source == "dir" and self.data_dir is None:
            raise ValueError("source 'dir' needs data_dir (the folder with the four IDX files)")
        return self

    @classmethod
    def parse(cls, **values: Any) -> "RunParams":
        """Build from user input, turning validation errors into one ConfigError."""
        try:
            params = cls(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc), fix="Correct the parameter(s) and run again.") from None
        except ConfigError:
            raise
        data_lib.validate_source(params.dataset, params.source, params.data_dir)
        return params

    def search_space(self) -> SearchSpace:
        return SearchSpace(lr_min=self.lr_min, lr_max=self.lr_max, momentum_min=self.momentum_min,
                           momentum_max=self.momentum_max, hidden1_min=self.hidden1_min,
                           hidden1_max=self.hidden1_max, hidden2_min=self.hidden2_min, hidden2_max=self.hidden2_max)

    def base_config(self) -> TrainConfig:
        """The fixed part of the recipe; the search fills in lr, momentum and hidden sizes."""
        return TrainConfig(batch_size=self.batch_size, epochs=self.max_epochs, weight_decay=self.weight_decay,
                           schedule=self.schedule, seed=self.seed, precision=resolve_precision(self.precision))


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "parameters"
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        parts.append(f"{loc}: {msg}" + (f" (got {given!r})" if loc != "parameters" and not isinstance(given, dict)
                                        else ""))
    return "Invalid parameter(s): " + "; ".join(parts) + "."


@dataclass(frozen=True)
class Prepared:
    """The dataset in memory, split, normalised and on the training device."""

    bundle: data_lib.DataBundle
    splits: Splits
    test_x: torch.Tensor
    test_y: torch.Tensor
    device: torch.device


def load_data(params: RunParams, settings: Settings) -> data_lib.DataBundle:
    """Fetch (or read) and verify the dataset."""
    return data_lib.load_dataset(params.dataset, params.source, data_dir=params.data_dir,
                                 cache_dir=settings.cache_dir, mirrors=settings.mirrors)


def prepare(bundle: data_lib.DataBundle, *, val_fraction: float, seed: int,
            device: torch.device | str = "cpu") -> Prepared:
    """Carve the stratified validation split and move features to ``device`` once."""
    device = torch.device(device)
    train_idx, val_idx = data_lib.stratified_split(bundle.train_labels, val_fraction, seed)
    images, labels = bundle.train_images, bundle.train_labels
    # Split the uint8 images before converting: the float32 copy of the full set never exists.
    splits = Splits(data_lib.to_features(images[train_idx], device), labels[train_idx].to(device),
                    data_lib.to_features(images[val_idx], device), labels[val_idx].to(device))
    test_x = data_lib.to_features(bundle.test_images, device)
    return Prepared(bundle, splits, test_x, bundle.test_labels.to(device), device)


def new_run_key() -> str:
    return uuid.uuid4().hex[:12]


#: Settings.heartbeat_interval / heartbeat_grace defaults: a killed worker's trial is failed and
#: re-queued (same configuration) by the next process that opens the study a minute later.
HEARTBEAT_INTERVAL_S: int = Settings.model_fields["heartbeat_interval"].default
HEARTBEAT_GRACE_S: int = Settings.model_fields["heartbeat_grace"].default
STALE_TRIAL_RETRIES = 3


def study_storage(storage_url: str, *, heartbeat_interval: int = HEARTBEAT_INTERVAL_S,
                  heartbeat_grace: int = HEARTBEAT_GRACE_S) -> optuna.storages.BaseStorage:
    """The study's RDBStorage with heartbeats: a trial whose process died is failed and retried.

    Optuna re-queues a stale trial's configuration as a WAITING trial whose system attributes carry
    ``failed_trial`` (the number of the killed trial), at most ``STALE_TRIAL_RETRIES`` times.
    """
    import warnings

    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna_storage(storage_url, heartbeat_interval=heartbeat_interval, grace_period=heartbeat_grace,
                              failed_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                                  max_retry=STALE_TRIAL_RETRIES))


def tune(prepared: Prepared, params: RunParams, storage_url: str, *, run_key: str,
         flow_run_id: str | None = None, progress: Progress | None = None,
         storage: optuna.storages.BaseStorage | None = None, heartbeat_interval: int = HEARTBEAT_INTERVAL_S,
         heartbeat_grace: int = HEARTBEAT_GRACE_S, worker_index: int = 0,
         warm_start: Sequence[dict[str, Any]] = (), threads: Any = None) -> tuple[optuna.Study, FrozenTrial]:
    """Run (or resume) this run's trials of the dataset's study; return the study and its best trial.

    Several processes (trial workers, ``worker_index`` 1, 2, ...) may run the same run key at once:
    together they finish exactly ``params.n_trials`` (see :mod:`mnist_flow.budget`).

    Trials left RUNNING by a killed process (no heartbeat for ``heartbeat_grace`` seconds) are failed
    first and their configurations re-queued, so a resumed run retries them instead of losing them.

    Without ``storage``, the study's storage is made here and its connections are closed on return
    (the returned study stays usable); a ``storage`` passed in is left open for its caller to dispose.
    """
    progress = progress or NullProgress()
    owned = storage is None  # a storage made here is closed here; a caller's storage is the caller's to close
    storage = storage or study_storage(storage_url, heartbeat_interval=heartbeat_interval,
                                       heartbeat_grace=heartbeat_grace)
    try:
        study = open_run_study(prepared, params, storage, worker_index=worker_index, warm_start=warm_start)
        fail_stale_trials(study)
        objective = Objective(prepared.splits, params.search_space(), params.base_config(),
                              device=prepared.device, run_key=run_key, flow_run_id=flow_run_id, threads=threads)
        progress.start_trials(params.n_trials)

        def on_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            if trial.user_attrs.get("run_key") != run_key:
                return
            try:
                best = study.best_value
            except ValueError:
                best = None
            seconds = (trial.duration.total_seconds() if trial.duration else 0.0)
            progress.trial_done(trial.number, trial.state.name, last_value(trial), best, trial.params, seconds)

        # annotate_finished_trial writes each completed trial's dashboard note; it logs instead of raising
        run_study(study, objective, n_trials=params.n_trials, run_key=run_key,
                  callbacks=[on_trial, annotate_finished_trial],
                  lock=trial_lock(storage_url, study.study_name))
        return study, best_trial(study, recipe_of(params.base_config()))
    finally:
        if owned:  # the returned study stays readable: a later read opens a fresh connection
            dispose_storage(storage)


#: Sampler seeds of trial workers are this far apart, so parallel workers do not draw the same points.
WORKER_SEED_STRIDE = 10_007


def open_run_study(prepared: Prepared, params: RunParams, storage: str | optuna.storages.BaseStorage, *,
                   worker_index: int = 0, warm_start: Sequence[dict[str, Any]] = ()) -> optuna.Study:
    """Create or load the dataset's study (the seed configuration is queued first in a new one)."""
    bundle = prepared.bundle
    return open_study(storage, study_name_for(bundle.name, bundle.fingerprint),
                      seed=params.seed + WORKER_SEED_STRIDE * worker_index, max_epochs=params.max_epochs,
                      user_attrs={"dataset": bundle.name, "fingerprint": bundle.fingerprint,
                                  "search_space": params.search_space().to_dict(),
                                  "recipe": params.base_config().to_dict()},
                      warm_start=warm_start)


def champion_warm_start(registry: Any, dataset: str) -> list[dict[str, Any]]:
    """The champion's searched parameters, to queue first in a new study of ``dataset`` (else nothing)."""
    champion = registry.champion(model_name(dataset))
    if champion is None or len(champion.params.get("hidden", ())) != 2:
        return []
    hidden1, hidden2 = champion.params["hidden"]
    return [{"lr": champion.params["lr"], "momentum": champion.params["momentum"], "hidden1": hidden1,
             "hidden2": hidden2}]


def fit_best(prepared: Prepared, config: TrainConfig, *, progress: Progress | None = None,
             label: str = "final fit", threads: Any = None) -> tuple[torch.nn.Module, History]:
    """Train ``config`` on the training split, watching the validation split (``threads``: a
    :mod:`mnist_flow.threads` policy)."""
    progress = progress or NullProgress()
    progress.start_epochs(label, config.epochs)
    s = prepared.splits
    return train_model(config, s.train_x, s.train_y, s.val_x, s.val_y, device=prepared.device,
                       on_epoch=lambda stats: progress.epoch_done(stats, config.epochs), threads=threads)


def final_config(trial: FrozenTrial, params: RunParams) -> TrainConfig:
    """The best trial's configuration, trained for ``final_epochs``."""
    return config_from_params(trial.params, params.base_config()).with_(epochs=params.final_epochs)


def evaluate_test(model: torch.nn.Module, prepared: Prepared) -> EvalResult:
    """The only place the test set is used: the final model (and the champion for comparison)."""
    return evaluate(model, prepared.test_x, prepared.test_y)


def model_name(dataset: str) -> str:
    """Registered model name per dataset."""
    return dataset


def sidecar(bundle: data_lib.DataBundle) -> dict[str, Any]:
    return {"normalization": {"mean": data_lib.MEAN, "std": data_lib.STD, "scale": 255.0},
            "classes": list(bundle.classes), "input": {"height": 28, "width": 28, "channels": 1,
                                                       "background": "dark"}}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The human-readable end-of-run summary (the same dict the flow returns)."""
    best = summary["best"]
    lines = [
        f"data:        {summary['data']['name']} from {summary['data']['source']} "
        f"({summary['data']['train_samples']} train / {summary['data']['val_samples']} val / "
        f"{summary['data']['test_samples']} test), fingerprint {summary['data']['fingerprint'][:16]}",
        f"study:       {summary['study']} ({summary['trials']['finished']} trials this run: "
        f"{summary['trials']['complete']} complete, {summary['trials']['pruned']} pruned)",
        f"best params: trial #{best['trial']}: " + format_params(best["params"]),
        f"accuracy:    best trial val {best['val_accuracy']:.4f}; final model val "
        f"{summary['metrics']['val_accuracy']:.4f}, test {summary['metrics']['test_accuracy']:.4f}",
        f"registered:  {summary['model']['name']} v{summary['model']['version']} "
        + ("(champion)" if summary["model"]["champion"] else "(challenger, not promoted)")
        + (f": {summary['decision']['reason']}" if summary.get("decision") else ""),
        "stages:      " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["seconds"].items()),
        f"dashboard:   {summary['dashboard_command']}",
    ]
    return lines


class Stopwatch:
    """Seconds per stage, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> "_Lap":
        return _Lap(self, name)


class _Lap:
    def __init__(self, watch: Stopwatch, name: str) -> None:
        self.watch, self.name = watch, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.watch.seconds[self.name] = round(time.perf_counter() - self.start, 2)


def dashboard_command(database_url: str) -> str:
    return f"mnist-flow dashboard   # optuna-dashboard on {mask_url(database_url)}"


def register_challenger(registry: Any, prepared: Prepared, model: torch.nn.Module, config: TrainConfig,
                        history: History, test: EvalResult, *, study_name: str, trial_number: int,
                        run_key: str, flow_run_id: str | None) -> Any:
    """Register the model with its lineage; idempotent per run and trial, so a retry registers once."""
    bundle = prepared.bundle
    metrics = {"val_accuracy": history.last.val_accuracy, "val_loss": history.last.val_loss,
               "test_accuracy": test.accuracy, "test_loss": test.loss, "train_loss": history.last.train_loss,
               "epochs": len(history.epochs), "train_seconds": round(sum(history.column("seconds")), 3)}
    return registry.register(
        model_name(bundle.name), model, sidecar=sidecar(bundle), params=config.to_dict(), metrics=metrics,
        dataset_name=bundle.name, dataset_fingerprint=bundle.fingerprint, study_name=study_name,
        trial_number=trial_number, flow_run_id=flow_run_id, seed=config.seed,
        idempotency_key=f"{flow_run_id or run_key}:{study_name}:{trial_number}")


def decide_promotion(registry: Any, prepared: Prepared, version: Any, test: EvalResult, *,
                     flow_run_id: str | None, margin: float, alpha: float | None) -> tuple[Any, Any]:
    """Compare the challenger with the champion on the same test set, record the decision, move the alias.

    Returns ``(model_version, decision)``. A challenger that was already decided on (a retried run)
    gets its recorded decision back instead of a second one.
    """
    from mnist_flow.promotion import Decision, decide

    name = version.name
    earlier = [d for d in registry.history(name) if d["challenger_version"] == version.version and d["actor"] == "gate"]
    if earlier:
        fields = Decision.__dataclass_fields__
        return registry.get(name, version.version), Decision(**{k: earlier[-1][k] for k in fields})
    champion = registry.champion(name)
    if champion is not None and champion.version == version.version:
        return version, None  # made champion by hand in the meantime: nothing to decide
    fingerprint = prepared.bundle.fingerprint
    challenger_correct = test.predictions == prepared.test_y.cpu()
    champion_correct = None
    if champion is not None and champion.dataset_fingerprint == fingerprint:
        champion_model, _, _ = registry.load(name, champion.version)
        champion_model.to(prepared.device)
        champion_correct = evaluate_test(champion_model, prepared).predictions == prepared.test_y.cpu()
    decision = decide(challenger_correct, champion_correct, challenger_fingerprint=fingerprint,
                      champion_fingerprint=champion.dataset_fingerprint if champion else None,
                      margin=margin, alpha=alpha)
    registry.record_decision(name, decision, challenger_version=version.version,
                             champion_version=champion.version if champion else None, flow_run_id=flow_run_id)
    return registry.get(name, version.version), decision


def register_and_decide(registry: Any, prepared: Prepared, model: torch.nn.Module, config: TrainConfig,
                        history: History, test: EvalResult, *, study_name: str, trial_number: int,
                        run_key: str, flow_run_id: str | None, margin: float,
                        alpha: float | None) -> tuple[Any, Any]:
    """:func:`register_challenger`, then :func:`decide_promotion`."""
    version = register_challenger(registry, prepared, model, config, history, test, study_name=study_name,
                                  trial_number=trial_number, run_key=run_key, flow_run_id=flow_run_id)
    return decide_promotion(registry, prepared, version, test, flow_run_id=flow_run_id, margin=margin, alpha=alpha)


def build_summary(params: RunParams, prepared: Prepared, study: optuna.Study, best: FrozenTrial, run_key: str,
                  version: Any, decision: Any, test: EvalResult, history: History, seconds: dict[str, float],
                  database_url: str) -> dict[str, Any]:
    """The dict the flow returns and the CLI prints."""
    from mnist_flow.tune import finished_trials

    mine = finished_trials(study, run_key)
    bundle = prepared.bundle
    return {
        "data": {"name": bundle.name, "source": bundle.source, "origin": bundle.origin,
                 "fingerprint": bundle.fingerprint, "train_samples": int(prepared.splits.train_y.numel()),
                 "val_samples": int(prepared.splits.val_y.numel()), "test_samples": int(prepared.test_y.numel())},
        "study": study.study_name,
        "trials": {"finished": len(mine), "complete": sum(t.state.name == "COMPLETE" for t in mine),
                   "pruned": sum(t.state.name == "PRUNED" for t in mine), "in_study": len(study.trials)},
        "best": {"trial": best.number, "params": best.params, "val_accuracy": best.value},
        "params": params.model_dump(mode="json"),
        "metrics": {"val_accuracy": history.last.val_accuracy, "test_accuracy": test.accuracy,
                    "test_loss": test.loss},
        "model": {"name": version.name, "version": version.version, "champion": "champion" in version.aliases,
                  "artifact": version.artifact_uri},
        "decision": None if decision is None else {"outcome": decision.outcome, "reason": decision.reason,
                                                    "p_value": decision.p_value},
        "seconds": seconds,
        "database": mask_url(database_url),
        "dashboard_command": dashboard_command(database_url),
    }
