"""The pipeline's stages as plain functions: prepare data, tune, fit the best, evaluate, register.

``flows/mnist.py`` wraps each stage in a Prefect task; ``mnist-flow tune`` and ``mnist-flow train``
call the same functions without Prefect. Parameters are validated once, in :class:`RunParams`,
before any work starts.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import optuna
import torch
from optuna.trial import FrozenTrial

from mnist_flow.data import datasets as data_lib
from mnist_flow.errors import TrainingDiverged
from mnist_flow.params import MAX_SEED, RunParams, TrainConfig
from mnist_flow.progress import NullProgress, Progress
from mnist_flow.review.dashboard import annotate_finished_trial
from mnist_flow.search.budget import fail_stale_trials, trial_lock
from mnist_flow.search.study import (
    Objective,
    Splits,
    best_of,
    config_from_params,
    finished_of,
    last_value,
    open_study,
    recipe_of,
    run_study,
    study_name_for,
)
from mnist_flow.settings import Settings
from mnist_flow.storage.db import dispose_storage, mask_url, optuna_storage
from mnist_flow.training.loop import EpochStats, EvalResult, History, all_finite, evaluate
from mnist_flow.training.model import MLP, ensemble_mlp

if TYPE_CHECKING:
    from mnist_flow.registry.promotion import Decision
    from mnist_flow.registry.store import ModelVersion, Registry
    from mnist_flow.search.watchdog import Watchdog
    from mnist_flow.summary import RunSummary
    from mnist_flow.training.threads import Policy


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
    return data_lib.load_dataset(
        params.dataset, params.source, data_dir=params.data_dir, cache_dir=settings.cache_dir, mirrors=settings.mirrors
    )


def prepare(
    bundle: data_lib.DataBundle, *, val_fraction: float, seed: int, device: torch.device | str = "cpu"
) -> Prepared:
    """Carve the stratified validation split and move features to ``device`` once."""
    device = torch.device(device)
    train_idx, val_idx = data_lib.stratified_split(bundle.train_labels, val_fraction, seed)
    order = torch.cat([train_idx, val_idx])
    n = len(train_idx)
    # One tensor, the training split then the validation split: each is a view of it, and the final fit can
    # train on both without a copy (Splits.with_val_in_training).
    x = data_lib.to_features(bundle.train_images[order], device)
    y = bundle.train_labels[order].to(device)
    splits = Splits(x[:n], y[:n], x[n:], y[n:], joined=(x, y))
    test_x = data_lib.to_features(bundle.test_images, device)
    return Prepared(bundle, splits, test_x, bundle.test_labels.to(device), device)


@dataclass(frozen=True)
class Tuned:
    """The tune stage's result: the dataset's study, its best trial within this run's recipe, and the
    study's trials as they were when tuning ended (what later stages read, without going back to the
    database: one deleted or replaced meanwhile is noticed by the register stage, with its own message)."""

    study: optuna.Study
    best: FrozenTrial
    trials: tuple[FrozenTrial, ...]


def new_run_key() -> str:
    return uuid.uuid4().hex[:12]


#: Settings.heartbeat_interval / heartbeat_grace defaults: a killed worker's trial is failed and
#: re-queued (same configuration) by the next process that opens the study a minute later.
HEARTBEAT_INTERVAL_S: int = Settings.model_fields["heartbeat_interval"].default
HEARTBEAT_GRACE_S: int = Settings.model_fields["heartbeat_grace"].default
STALE_TRIAL_RETRIES = 3


def study_storage(
    storage_url: str, *, heartbeat_interval: int = HEARTBEAT_INTERVAL_S, heartbeat_grace: int = HEARTBEAT_GRACE_S
) -> optuna.storages.BaseStorage:
    """The study's RDBStorage with heartbeats: a trial whose process died is failed and retried.

    Optuna re-queues a stale trial's configuration as a WAITING trial whose system attributes carry
    ``failed_trial`` (the number of the killed trial), at most ``STALE_TRIAL_RETRIES`` times.
    """
    import warnings

    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna_storage(
            storage_url,
            heartbeat_interval=heartbeat_interval,
            grace_period=heartbeat_grace,
            failed_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=STALE_TRIAL_RETRIES),
        )


def tune(
    prepared: Prepared,
    params: RunParams,
    storage_url: str,
    *,
    run_key: str,
    flow_run_id: str | None = None,
    progress: Progress | None = None,
    storage: optuna.storages.BaseStorage | None = None,
    heartbeat_interval: int = HEARTBEAT_INTERVAL_S,
    heartbeat_grace: int = HEARTBEAT_GRACE_S,
    worker_index: int = 0,
    warm_start: Sequence[dict[str, Any]] = (),
    watchdog: Watchdog | None = None,
    threads: Policy | None = None,
) -> Tuned:
    """Run (or resume) this run's trials of the dataset's study; return the study and its best trial.

    Several processes (trial workers, ``worker_index`` 1, 2, ...) may run the same run key at once:
    together they finish exactly ``params.n_trials`` (see :mod:`mnist_flow.search.budget`).

    Trials left RUNNING by a killed process (no heartbeat for ``heartbeat_grace`` seconds) are failed
    first and their configurations re-queued, so a resumed run retries them instead of losing them.

    Without ``storage``, the study's storage is made here and its connections are closed on return
    (the returned study stays usable); a ``storage`` passed in is left open for its caller to dispose.
    """
    progress = progress or NullProgress()
    owned = storage is None  # a storage made here is closed here; a caller's storage is the caller's to close
    storage = storage or study_storage(
        storage_url, heartbeat_interval=heartbeat_interval, heartbeat_grace=heartbeat_grace
    )
    try:
        study = open_run_study(prepared, params, storage, worker_index=worker_index, warm_start=warm_start)
        fail_stale_trials(study)
        objective = Objective(
            prepared.splits,
            params.space,
            params.base_config(),
            device=prepared.device,
            run_key=run_key,
            flow_run_id=flow_run_id,
            watchdog=watchdog,
            threads=threads,
        )
        progress.start_trials(params.n_trials)

        def on_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            if trial.user_attrs.get("run_key") != run_key:
                return
            try:
                best = study.best_value
            except ValueError:
                best = None
            seconds = trial.duration.total_seconds() if trial.duration else 0.0
            progress.trial_done(trial.number, trial.state.name, last_value(trial), best, trial.params, seconds)

        # annotate_finished_trial writes each completed trial's dashboard note; it logs instead of raising
        run_study(
            study,
            objective,
            n_trials=params.n_trials,
            run_key=run_key,
            callbacks=[on_trial, annotate_finished_trial],
            lock=trial_lock(storage_url, study.study_name),
        )
        trials = tuple(study.get_trials(deepcopy=False))  # read once: the best and the later stages use them
        return Tuned(study, best_of(trials, recipe_of(params.base_config())), trials)
    except optuna.exceptions.StorageInternalError as exc:  # Optuna's wrapper of the database's own error
        from mnist_flow.storage.db import permanent_error

        permanent = permanent_error(storage_url, exc.__cause__) if exc.__cause__ is not None else None
        if permanent is None:
            raise
        raise permanent from None  # a full disk, a read-only or damaged database: one message, no retry
    finally:
        if owned:  # the returned study stays readable: a later read opens a fresh connection
            dispose_storage(storage)


#: Sampler seeds of trial workers are this far apart, so parallel workers do not draw the same points.
WORKER_SEED_STRIDE = 10_007


def open_run_study(
    prepared: Prepared,
    params: RunParams,
    storage: str | optuna.storages.BaseStorage,
    *,
    worker_index: int = 0,
    warm_start: Sequence[dict[str, Any]] = (),
) -> optuna.Study:
    """Create or load the dataset's study (the seed configuration is queued first in a new one)."""
    bundle = prepared.bundle
    return open_study(
        storage,
        study_name_for(bundle.name, bundle.fingerprint),
        seed=params.seed + WORKER_SEED_STRIDE * worker_index,
        max_epochs=params.max_epochs,
        user_attrs={
            "dataset": bundle.name,
            "fingerprint": bundle.fingerprint,
            "search_space": params.space.to_dict(),
            "recipe": params.base_config().to_dict(),
        },
        warm_start=warm_start,
        space=params.space,
    )


def champion_warm_start(registry: Registry, dataset: str) -> list[dict[str, Any]]:
    """The champion's searched parameters, to queue first in a new study of ``dataset`` (else nothing)."""
    champion = registry.champion(model_name(dataset))
    if champion is None or len(champion.params.get("hidden", ())) != 2:
        return []
    hidden1, hidden2 = champion.params["hidden"]
    return [
        {"lr": champion.params["lr"], "momentum": champion.params["momentum"], "hidden1": hidden1, "hidden2": hidden2}
    ]


#: Recoveries a final fit may make (restore the best state, halve the rate): 8 halvings take the rate
#: down 256x, enough for the corner lr 0.3 x momentum 0.98 of the default space (tests/model/test_stability.py).
FINAL_RECOVERIES = 8
#: The registered model's validation accuracy may be at most this far below its trial's.
FINAL_FIT_TOLERANCE = 0.003


def fit_best(
    prepared: Prepared,
    config: TrainConfig,
    *,
    progress: Progress | None = None,
    label: str = "final fit",
    threads: Policy | None = None,
    stop: threading.Event | None = None,
    splits: Splits | None = None,
) -> tuple[MLP, History]:
    """Train ``config`` on the training split (of ``splits``, default ``prepared.splits``), watching the
    validation split.

    Guarded (:func:`mnist_flow.training.loop.fit`): a diverging epoch restores the best state so far and goes on
    at a lower rate (``history.events``), and the model ends with the weights of its best epoch by
    validation accuracy (``history.best_epoch``). Raises TrainingDiverged only when the recoveries
    run out; the model returned has finite weights. ``threads``: a :mod:`mnist_flow.training.threads` policy.
    ``stop``, once set, ends the fit after its current epoch (raises :class:`FitStopped`).
    """
    progress = progress or NullProgress()
    progress.start_epochs(label, config.epochs)
    s = splits or prepared.splits

    def on_epoch(stats: EpochStats) -> None:
        progress.epoch_done(stats, config.epochs)
        if stop is not None and stop.is_set():
            raise FitStopped(label)

    model, history = s.train(
        config,
        device=prepared.device,
        on_epoch=on_epoch,
        recover=FINAL_RECOVERIES,
        keep_best=True,
        threads=threads,
    )
    if not all_finite(model):  # cannot happen with a finite best checkpoint; never hand on a NaN model
        raise TrainingDiverged(
            f"The {label} of {config.to_dict()} ended with non-finite weights.",
            fix="Lower the learning rate (lr_max) or the momentum (momentum_max).",
        )
    return model, history


def final_config(trial: FrozenTrial, params: RunParams) -> TrainConfig:
    """The best trial's configuration, trained for ``final_epochs``."""
    return config_from_params(trial.params, params.base_config()).with_(epochs=params.final_epochs)


def trial_config(trial: FrozenTrial, params: RunParams) -> TrainConfig:
    """The best trial's exact recipe (its epochs and schedule): retraining it reproduces the trial."""
    return config_from_params(trial.params, params.base_config())


@dataclass(frozen=True)
class Ensemble:
    """What a model that is the mean of several fits' logits (:func:`~mnist_flow.training.model.ensemble_mlp`)
    is made of, and its own validation figures (no epoch of one fit's history holds them)."""

    seeds: tuple[int, ...]
    val_accuracy: float
    val_loss: float


@dataclass(frozen=True)
class FinalFit:
    """The model to evaluate and register, the configuration that trained it, its history and what was done.

    With ``ensemble``, the model is the ensemble of the fits of ``config`` with those seeds, and ``history``
    is the history of the best of them.
    """

    model: MLP
    config: TrainConfig
    history: History
    notes: tuple[str, ...]
    ensemble: Ensemble | None = None
    #: The fits trained on the validation split too (``final_data="train+val"``): its figures are on seen images.
    val_seen: bool = False

    @property
    def val_accuracy(self) -> float:
        """The validation accuracy of the model itself."""
        return self.ensemble.val_accuracy if self.ensemble else self.history.best.val_accuracy


def final_fit(
    prepared: Prepared,
    trial: FrozenTrial,
    params: RunParams,
    *,
    progress: Progress | None = None,
    threads: Policy | None = None,
    stop: threading.Event | None = None,
) -> FinalFit:
    """Fit the best trial's configuration over ``final_epochs``; never below the trial by more than 0.3 points
    (on held-out validation: ``final_data="train"``).

    1. The trial's configuration with its one-cycle stretched over ``final_epochs`` (longer training is
       what reaches 98.5 % on MNIST), guarded: a diverging epoch restores the best state so far and goes
       on at half the rate; the best epoch by validation accuracy is kept.
    2. If that fit still diverged, or its best validation accuracy is more than
       :data:`FINAL_FIT_TOLERANCE` below the trial's, the trial's own recipe (``max_epochs``, its schedule,
       its seed) is retrained, which reproduces the trial (on the trial's data), and the better of the
       two by validation accuracy is registered. ``notes`` says what happened, for the log and the summary.

    With ``final_data="train+val"`` (the default) both fits train on the validation split too
    (:func:`final_splits`), the trial's recipe included: the comparison with the trial then sees figures on
    seen images, so in effect only a divergence falls back to the recipe, which is then the trial's recipe
    on more data, not the trial itself.

    ``threads``: a :mod:`mnist_flow.training.threads` policy for both fits.
    """
    config, recipe = final_config(trial, params), trial_config(trial, params)
    splits, seen = final_splits(prepared, params), params.final_on_val
    floor = (trial.value or 0.0) - FINAL_FIT_TOLERANCE
    notes: list[str] = []
    stretched: FinalFit | None = None
    try:
        model, history = fit_best(prepared, config, progress=progress, threads=threads, stop=stop, splits=splits)
        stretched = FinalFit(model, config, history, (), val_seen=seen)
        notes += history.events
        best = history.best
        notes.append(
            f"final fit of trial #{trial.number}: {config.epochs} epochs, kept epoch {best.epoch} "
            f"(val accuracy {best.val_accuracy:.4f}; trial {trial.value:.4f})"
        )
        if best.val_accuracy >= floor or recipe == config:
            return replace(stretched, notes=tuple(notes))
        notes.append(
            f"val accuracy {best.val_accuracy:.4f} is more than {FINAL_FIT_TOLERANCE * 100:.1f} points "
            f"below trial #{trial.number}'s {trial.value:.4f}: retraining the trial's recipe "
            f"({recipe.epochs} epochs)"
        )
    except TrainingDiverged as exc:
        if recipe == config:
            raise exc.restated(f"The final fit of trial #{trial.number} diverged: {exc.message}") from None
        notes.append(
            f"final fit of trial #{trial.number} diverged ({exc.message}): retraining the trial's "
            f"recipe ({recipe.epochs} epochs)"
        )
    try:
        model, history = fit_best(
            prepared, recipe, progress=progress, label="trial recipe", threads=threads, stop=stop, splits=splits
        )
    except TrainingDiverged as exc:
        if stretched is None:
            raise exc.restated(
                f"The final fit of trial #{trial.number} diverged, and so did its trial recipe ({exc.message})."
            ) from None
        notes.append(f"the trial recipe diverged too ({exc.message}): keeping the final fit")
        return replace(stretched, notes=tuple(notes))
    notes += history.events
    notes.append(f"trial recipe: val accuracy {history.best.val_accuracy:.4f} at epoch {history.best.epoch}")
    if stretched is not None and stretched.history.best.val_accuracy > history.best.val_accuracy:
        notes.append("keeping the final fit (higher val accuracy)")
        return replace(stretched, notes=tuple(notes))
    return FinalFit(model, recipe, history, tuple(notes), val_seen=seen)


def final_splits(prepared: Prepared, params: RunParams) -> Splits:
    """What the final fits train on: the training split, and with ``final_data="train+val"`` the validation
    split too. Once the search has chosen, the held-out images are worth more as training data: on
    Fashion-MNIST the test accuracy of each of six fits rose by 0.1 to 0.7 points (docs/benchmarks.md,
    "The final fit on the validation split too"). Validation is still computed every epoch, now on seen
    images: it still shows a divergence or a collapse."""
    return prepared.splits.with_val_in_training() if params.final_on_val else prepared.splits


class FitStopped(Exception):
    """A fit ended early because its ``stop`` event was set (another fit of the run failed or was interrupted)."""


#: The final fits after the first train with the run's seed plus this stride times their index.
FINAL_SEED_STRIDE = 1000


def final_seeds(params: RunParams) -> list[int]:
    """The training seeds of the final fits: the run's own first (the one that can reproduce the trial)."""
    return [(params.seed + FINAL_SEED_STRIDE * i) % (MAX_SEED + 1) for i in range(params.final_seeds)]


def final_fits(
    prepared: Prepared,
    trial: FrozenTrial,
    params: RunParams,
    *,
    progress: Progress | None = None,
    threads: Policy | None = None,
) -> FinalFit:
    """The best trial's configuration fitted with each of :func:`final_seeds` at once, in threads; registered is
    their ensemble (``final_model="ensemble"``, the default) where its validation accuracy is at least the best
    fit's, else the fit with the highest validation accuracy (the test set is not looked at). With
    ``final_data="train+val"`` (the default) the fits learn the validation images too (:func:`final_splits`),
    so no held-out figure is left to compare on: the ensemble is registered unless its validation accuracy on
    those seen images is more than 0.3 points below the best fit's (``final_model="best"``: the fit with the
    highest validation accuracy, on seen images).

    The first fit, with the run's seed, is :func:`final_fit` (guarded, with its fallback to the trial's own
    recipe), so with ``final_data="train"`` the kept model is never more than 0.3 points below the trial.
    The others are guarded fits of the same stretched configuration with another seed; one that diverges beyond its recoveries is left
    out. Why seeds: of more trials, a refit of the next-best configurations or more seeds in the same time,
    only more seeds raised the test accuracy (docs/benchmarks.md, "Spending the time saved"). The ensemble
    (:func:`~mnist_flow.training.model.ensemble_mlp`: one MLP whose logits are the mean of the fits') keeps
    what each seed learned instead of discarding all but one: on the full MNIST it gained 0.02 to 0.11 points
    of test accuracy over the best single fit (docs/benchmarks.md, "The ensemble of the final fits").
    ``threads`` is the policy of every fit (one intra-op thread each, normally: they share the CPUs).
    Each fit is deterministic in its seed (their initial weights are drawn in turn), so a run's result
    does not depend on how the threads interleave.
    """
    seeds = final_seeds(params)
    if len(seeds) == 1:
        return final_fit(prepared, trial, params, progress=progress, threads=threads)
    config = final_config(trial, params)
    splits, seen = final_splits(prepared, params), params.final_on_val
    stop = threading.Event()

    def other(seed: int) -> FinalFit:
        seeded = config.with_(seed=seed)
        model, history = fit_best(
            prepared,
            seeded,
            progress=progress,
            label=f"final fit (seed {seed})",
            threads=threads,
            stop=stop,
            splits=splits,
        )
        return FinalFit(model, seeded, history, tuple(history.events), val_seen=seen)

    with ThreadPoolExecutor(max_workers=len(seeds), thread_name_prefix="final-fit") as pool:
        futures = [pool.submit(final_fit, prepared, trial, params, progress=progress, threads=threads, stop=stop)]
        futures += [pool.submit(other, seed) for seed in seeds[1:]]
        try:
            fits = [futures[0].result()]
            notes = [*fits[0].notes]
            for seed, future in zip(seeds[1:], futures[1:], strict=True):
                try:
                    fit = future.result()
                except TrainingDiverged as exc:
                    notes.append(f"final fit with seed {seed} diverged ({exc.message}): left out")
                    continue
                fits.append(fit)
                notes += fit.notes
                best = fit.history.best
                notes.append(
                    f"final fit with seed {seed}: kept epoch {best.epoch} (val accuracy {best.val_accuracy:.4f})"
                )
        except BaseException:  # an interrupt, a timeout or a bug: the other fits end after their epoch
            stop.set()
            raise
    kept = max(fits, key=lambda fit: fit.history.best.val_accuracy)  # the first wins a tie
    each = ", ".join(f"seed {fit.config.seed}: {fit.history.best.val_accuracy:.4f}" for fit in fits)
    if params.final_model == "ensemble" and len(fits) > 1:
        model = ensemble_mlp([fit.model for fit in fits])
        val = evaluate(model, prepared.splits.val_x, prepared.splits.val_y, precision=kept.config.precision)
        # Trained on the validation split too, the fits leave no held-out figure to compare: the ensemble is
        # registered unless it is clearly worse on those images, which it learnt (a broken ensemble).
        # docs/benchmarks.md: on the test set it beat the fit validation picks in 4 of 5 configurations
        # trained without the validation split, and in 3 of 3 trained with it.
        floor = kept.history.best.val_accuracy - (FINAL_FIT_TOLERANCE if seen else 0.0)
        if val.accuracy >= floor:
            what = "trained on the validation split too" if seen else f"val accuracy {val.accuracy:.4f}"
            notes.append(f"registered the ensemble of the {len(fits)} fits ({what}; {each})")
            ensemble = Ensemble(tuple(fit.config.seed for fit in fits), val.accuracy, val.loss)
            return replace(kept, model=model, notes=tuple(notes), ensemble=ensemble)
        notes.append(f"the ensemble of the {len(fits)} fits is less accurate (val accuracy {val.accuracy:.4f})")
    notes.append(
        f"kept the fit with seed {kept.config.seed} of {len(seeds)} (val accuracy "
        f"{kept.history.best.val_accuracy:.4f}; {each})"
    )
    return replace(kept, notes=tuple(notes))


def evaluate_test(model: torch.nn.Module, prepared: Prepared) -> EvalResult:
    """The only place the test set is used: the final model (and the champion for comparison)."""
    return evaluate(model, prepared.test_x, prepared.test_y)


def model_name(dataset: str) -> str:
    """Registered model name per dataset."""
    return dataset


def sidecar(bundle: data_lib.DataBundle) -> dict[str, Any]:
    """How the model's inputs were made, for `predict` and `serve` to repeat exactly (see predict.Preprocessing)."""
    from mnist_flow.review.predict import preparation_for

    return {
        "normalization": {"mean": data_lib.MEAN, "std": data_lib.STD, "scale": 255.0},
        "classes": list(bundle.classes),
        "input": {
            "height": 28,
            "width": 28,
            "channels": 1,
            "background": "dark",
            "preparation": preparation_for(bundle.name),
        },
    }


class Stopwatch:
    """Seconds per stage, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> _Lap:
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


def idempotency_key(run_key: str, flow_run_id: str | None, study_name: str, trial_number: int) -> str:
    """The registration key of a run's model: a rerun of the run (same run key) finds its version again."""
    return f"{flow_run_id or run_key}:{study_name}:{trial_number}"


@dataclass(frozen=True)
class Candidate:
    """A trained model to register: what trained it, how it did, and the run and trial it comes from."""

    prepared: Prepared
    model: MLP
    config: TrainConfig
    history: History
    test: EvalResult
    study_name: str
    trial_number: int
    run_key: str
    flow_run_id: str | None = None
    #: Set when ``model`` is the ensemble of several fits of ``config`` (FinalFit.ensemble).
    ensemble: Ensemble | None = None
    #: The model trained on the validation split too (FinalFit.val_seen): recorded as ``trained_on``.
    val_seen: bool = False

    @property
    def idempotency_key(self) -> str:
        """The registration key: a rerun of the run (same run key) finds its version again."""
        return idempotency_key(self.run_key, self.flow_run_id, self.study_name, self.trial_number)


def register_challenger(
    registry: Registry,
    candidate: Candidate,
    *,
    decision: Decision | None = None,
    champion_version: int | None = None,
    require_study: bool = False,
) -> ModelVersion:
    """Register the model with its lineage; idempotent per run and trial, so a retry registers once.

    The metrics are those of the epoch whose weights the model holds (``history.best``; an ensemble's validation
    figures are its own, its other figures its best fit's, and ``ensemble_of`` counts its fits). A model with a
    non-finite weight or metric is refused as the divergence it is (TrainingDiverged), before the registry.
    ``require_study`` (the flow, whose tune stage made the study): the study must still be in the database,
    so a database deleted or replaced during the run is refused instead of re-created empty.
    ``decision`` (against ``champion_version``) is recorded in the same transaction as the version.
    """
    from mnist_flow.registry.store import Lineage  # the registry (SQLAlchemy) is imported when it is used

    c = candidate
    bundle = c.prepared.bundle
    kept = c.history.best
    metrics = {
        "val_accuracy": c.ensemble.val_accuracy if c.ensemble else kept.val_accuracy,
        "val_loss": c.ensemble.val_loss if c.ensemble else kept.val_loss,
        "test_accuracy": c.test.accuracy,
        "test_loss": c.test.loss,
        "train_loss": kept.train_loss,
        "epochs": len(c.history.epochs),
        "train_seconds": round(sum(c.history.column("seconds")), 3),
        "best_epoch": kept.epoch,
        "recoveries": c.history.recoveries,
        "ensemble_of": len(c.ensemble.seeds) if c.ensemble else 1,
    }
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad or not all_finite(c.model):
        what = f"non-finite {', '.join(bad)}" if bad else "non-finite weights"
        raise TrainingDiverged(
            f"Not registered: the model of trial #{c.trial_number} has {what}: its training diverged.",
            fix="Lower the learning rate (lr_max) or the momentum (momentum_max) and run again.",
        )
    return registry.register(
        model_name(bundle.name),
        c.model,
        sidecar=sidecar(bundle),
        params={
            **c.config.to_dict(),
            **({"ensemble_seeds": list(c.ensemble.seeds)} if c.ensemble else {}),
            "trained_on": "train+val" if c.val_seen else "train",
        },
        metrics=metrics,
        lineage=Lineage(bundle.name, bundle.fingerprint, c.study_name, c.trial_number, c.flow_run_id, c.config.seed),
        idempotency_key=c.idempotency_key,
        require_study=require_study,
        decision=decision,
        champion_version=champion_version,
    )


def _gate(
    registry: Registry,
    prepared: Prepared,
    test: EvalResult,
    champion: ModelVersion | None,
    *,
    margin: float,
    alpha: float | None,
) -> Decision:
    """The gate's decision for a challenger with ``test`` results against ``champion`` (None: no champion yet)."""
    from mnist_flow.registry.promotion import decide

    fingerprint = prepared.bundle.fingerprint
    challenger_correct = test.predictions == prepared.test_y.cpu()
    champion_correct = None
    if champion is not None and champion.dataset_fingerprint == fingerprint:
        champion_model, _, _ = registry.load(champion.name, champion.version)
        champion_model.to(prepared.device)
        champion_correct = evaluate_test(champion_model, prepared).predictions == prepared.test_y.cpu()
    return decide(
        challenger_correct,
        champion_correct,
        challenger_fingerprint=fingerprint,
        champion_fingerprint=champion.dataset_fingerprint if champion else None,
        margin=margin,
        alpha=alpha,
    )


def decide_promotion(
    registry: Registry,
    prepared: Prepared,
    version: ModelVersion,
    test: EvalResult,
    *,
    flow_run_id: str | None,
    margin: float,
    alpha: float | None,
) -> tuple[ModelVersion, Decision | None]:
    """Compare the challenger with the champion on the same test set, record the decision, move the alias.

    Returns ``(model_version, decision)``. A challenger that was already decided on (a retried run, or
    :func:`register_and_decide`, which records the decision with the version) gets its recorded
    decision back instead of a second one.
    """
    from mnist_flow.registry.promotion import Decision

    name = version.name
    earlier = [d for d in registry.history(name) if d["challenger_version"] == version.version and d["actor"] == "gate"]
    if earlier:
        fields = Decision.__dataclass_fields__
        return registry.get(name, version.version), Decision(**{k: earlier[-1][k] for k in fields})
    champion = registry.champion(name)
    if champion is not None and champion.version == version.version:
        return version, None  # made champion by hand in the meantime: nothing to decide
    decision = _gate(registry, prepared, test, champion, margin=margin, alpha=alpha)
    registry.record_decision(
        name,
        decision,
        challenger_version=version.version,
        champion_version=champion.version if champion else None,
        flow_run_id=flow_run_id,
    )
    return registry.get(name, version.version), decision


#: How often the gate compares again when another run moved the champion while it was deciding.
GATE_ATTEMPTS = 5


def register_and_decide(
    registry: Registry,
    candidate: Candidate,
    *,
    margin: float,
    alpha: float | None,
    require_study: bool = False,
) -> tuple[ModelVersion, Decision | None]:
    """Register the model and record the gate's decision in one transaction; return ``(version, decision)``.

    There is no moment at which the version exists without its decision, so a process killed at any
    point leaves either nothing (artifacts at most) or a decided version. A rerun with the same run key
    finds its version: decided, it gets the recorded decision back; undecided (registered by
    :func:`register_challenger` alone, e.g. by an older mnist-flow), it is decided once now.

    ``require_study``: see :func:`register_challenger` (checked before anything is read, as a read would
    create a deleted SQLite file again).
    """
    from mnist_flow.registry.store import ChampionMovedError

    c = candidate
    if require_study:
        registry.require_database(c.study_name)

    def decided(version: ModelVersion) -> tuple[ModelVersion, Decision | None]:
        return decide_promotion(
            registry, c.prepared, version, c.test, flow_run_id=c.flow_run_id, margin=margin, alpha=alpha
        )

    existing = registry.by_key(c.idempotency_key)
    if existing is not None:
        return decided(existing)
    name = model_name(c.prepared.bundle.name)
    moved: ChampionMovedError | None = None
    for _ in range(GATE_ATTEMPTS):
        champion = registry.champion(name)
        decision = _gate(registry, c.prepared, c.test, champion, margin=margin, alpha=alpha)
        try:
            version = register_challenger(
                registry,
                c,
                decision=decision,
                champion_version=champion.version if champion else None,
                require_study=require_study,
            )
        except ChampionMovedError as exc:
            moved = exc  # another run promoted its model meanwhile: compare with the new champion
            continue
        # the recorded decision: ours, or that of a concurrent registration with the same key that won
        return decided(version)
    assert moved is not None
    raise moved


def build_summary(
    params: RunParams,
    prepared: Prepared,
    tuned: Tuned,
    run_key: str,
    fitted: FinalFit,
    test: EvalResult,
    version: ModelVersion,
    decision: Decision | None,
    seconds: dict[str, float],
    database_url: str,
) -> RunSummary:
    """What the run did and produced: what the flow returns, logs and publishes."""
    from mnist_flow.summary import (
        BestTrial,
        DataSummary,
        DecisionSummary,
        FinalMetrics,
        FitSummary,
        ModelSummary,
        RunSummary,
        TrialCounts,
    )

    study, best = tuned.study, tuned.best
    assert best.value is not None  # the best trial is a complete one
    mine = finished_of(tuned.trials, run_key)
    bundle, history = prepared.bundle, fitted.history
    return RunSummary(
        data=DataSummary(
            name=bundle.name,
            source=bundle.source,
            origin=bundle.origin,
            fingerprint=bundle.fingerprint,
            train_samples=int(prepared.splits.train_y.numel()),
            val_samples=int(prepared.splits.val_y.numel()),
            test_samples=int(prepared.test_y.numel()),
        ),
        study=study.study_name,
        trials=TrialCounts(
            finished=len(mine),
            complete=sum(t.state.name == "COMPLETE" for t in mine),
            pruned=sum(t.state.name == "PRUNED" for t in mine),
            in_study=len(tuned.trials),
            epochs=sum(len(t.intermediate_values) for t in mine),
        ),
        best=BestTrial(trial=best.number, params=dict(best.params), val_accuracy=best.value),
        params=params.flat(),
        metrics=FinalMetrics(
            val_accuracy=fitted.val_accuracy, test_accuracy=test.accuracy, test_loss=test.loss, val_seen=fitted.val_seen
        ),
        final_fit=FitSummary(
            seed=fitted.config.seed,
            fits=params.final_seeds,
            ensemble=fitted.ensemble.seeds if fitted.ensemble else (),
            epochs=len(history.epochs),
            best_epoch=history.best.epoch,
            recoveries=history.recoveries,
            notes=tuple(fitted.notes),
        ),
        model=ModelSummary(
            name=version.name,
            version=version.version,
            champion="champion" in version.aliases,
            artifact=version.artifact_uri,
        ),
        decision=None
        if decision is None
        else DecisionSummary(
            outcome=decision.outcome,
            reason=decision.reason,
            p_value=decision.p_value,
            challenger_accuracy=decision.challenger_accuracy,
            champion_accuracy=decision.champion_accuracy,
        ),
        seconds=dict(seconds),
        database=mask_url(database_url),
        dashboard_command=dashboard_command(database_url),
    )
