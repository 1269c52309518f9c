"""The Optuna study: search space, objective and the loop that runs trials.

The search space is kept apart from model building: ``suggest_config(trial, space, base)``
turns a trial into a :class:`~mnist_flow.training.loop.TrainConfig`, and the objective hands that
config to the one training loop in :mod:`mnist_flow.training.loop`.

:func:`run_study` keeps a run's trial budget exact even when several processes (trial workers)
run the same study at once: see :mod:`mnist_flow.search.budget` for the design.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from mnist_flow.errors import ConfigError, TrainingDiverged
from mnist_flow.params import SearchSpace, TrainConfig
from mnist_flow.search.budget import BudgetFilled, Lock, Step, TrialBudget, ran_here
from mnist_flow.search.watchdog import TrialHung
from mnist_flow.training.loop import EpochStats, History, train_model
from mnist_flow.training.model import MLP

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

logger = logging.getLogger(__name__)

#: The seed tutorial's configuration, enqueued as the first trial of every new study so the
#: search always measures the baseline it has to beat.
SEED_PARAMS = {"lr": 0.01, "momentum": 0.9, "hidden1": 512, "hidden2": 256}  # 500 snapped to the 64-grid


def suggest_config(trial: optuna.Trial, space: SearchSpace, base: TrainConfig) -> TrainConfig:
    """The trial's point in the search space, on top of the fixed parts of ``base``."""
    step = space.hidden_step
    lr = trial.suggest_float("lr", space.lr_min, space.lr_max, log=True)
    momentum = trial.suggest_float("momentum", space.momentum_min, space.momentum_max)
    hidden1 = trial.suggest_int("hidden1", space.hidden1_min, space.hidden1_max, step=step)
    hidden2 = trial.suggest_int("hidden2", space.hidden2_min, space.hidden2_max, step=step)
    return base.with_(lr=lr, momentum=momentum, hidden=(hidden1, hidden2))


def config_from_params(params: dict[str, Any], base: TrainConfig) -> TrainConfig:
    """Rebuild the TrainConfig of a finished trial from its Optuna params."""
    return base.with_(
        lr=params["lr"], momentum=params["momentum"], hidden=(int(params["hidden1"]), int(params["hidden2"]))
    )


@dataclass(frozen=True)
class Splits:
    """Normalised features and labels, already on the training device.

    ``joined``: the training and the validation split as one tensor pair, of which ``train_*`` and ``val_*``
    are views (:func:`mnist_flow.pipeline.prepare` lays them out so), for :meth:`with_val_in_training`.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    joined: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def with_val_in_training(self) -> Splits:
        """The splits with the validation images in the training set too (still watched as validation: a
        collapse or a divergence still shows there). No copy where ``joined`` holds exactly these two splits
        (a ``dataclasses.replace`` of one of them, or of the result, falls back to a copy)."""
        if (
            self.joined is not None
            and _spans(self.joined[0], self.train_x, self.val_x)
            and (_spans(self.joined[1], self.train_y, self.val_y))
        ):
            x, y = self.joined
        else:
            x, y = torch.cat([self.train_x, self.val_x]), torch.cat([self.train_y, self.val_y])
        return Splits(x, y, self.val_x, self.val_y)

    def train(self, config: TrainConfig, **options: Any) -> tuple[MLP, History]:
        """:func:`mnist_flow.training.loop.train_model` on these splits (``options``: its keyword arguments)."""
        return train_model(config, self.train_x, self.train_y, self.val_x, self.val_y, **options)


def _spans(whole: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether ``first`` then ``second`` are exactly the two halves of ``whole`` (views of its memory)."""
    n = len(first)
    return (
        len(whole) == n + len(second)
        and first.data_ptr() == whole.data_ptr()
        and second.data_ptr() == whole[n:].data_ptr()
        and first.shape[1:] == whole.shape[1:] == second.shape[1:]
    )


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Objective:
    """Train one configuration, reporting validation accuracy every epoch so the pruner can stop it."""

    def __init__(
        self,
        splits: Splits,
        space: SearchSpace,
        base: TrainConfig,
        *,
        device: torch.device | str = "cpu",
        run_key: str | None = None,
        flow_run_id: str | None = None,
        on_epoch: Callable[[optuna.Trial, EpochStats], None] | None = None,
        watchdog: Any = None,
        threads: Any = None,
    ) -> None:
        self.splits, self.space, self.base, self.device = splits, space, base, device
        self.run_key, self.flow_run_id, self.on_epoch = run_key, flow_run_id, on_epoch
        self.watchdog = watchdog  # a mnist_flow.search.watchdog.Watchdog: fails (and re-queues) a trial that hangs
        self.threads = threads  # a mnist_flow.training.threads policy (None: torch's current thread count)

    def __call__(self, trial: optuna.Trial) -> float:
        config = suggest_config(trial, self.space, self.base)
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("recipe", recipe_of(self.base))
        if self.run_key is not None and "run_key" not in trial.user_attrs:  # a re-queued trial keeps its run
            trial.set_user_attr("run_key", self.run_key)
        if self.flow_run_id is not None:
            trial.set_user_attr("flow_run_id", self.flow_run_id)
        curve: dict[str, list[float]] = {"val_accuracy": [], "train_loss": [], "epoch_seconds": []}

        dog = (
            None
            if self.watchdog is None
            else self.watchdog.watch(
                trial,
                hidden=config.hidden,
                train_samples=len(self.splits.train_y),
                history=trial.study.get_trials(deepcopy=False, states=FINISHED),
            )
        )

        def report(stats: EpochStats) -> None:
            if watch is not None:
                watch.beat(stats.seconds)
            curve["val_accuracy"].append(round(stats.val_accuracy, 6))
            curve["train_loss"].append(round(stats.train_loss, 6))
            curve["epoch_seconds"].append(round(stats.seconds, 4))
            for key, values in curve.items():
                trial.set_user_attr(key, values)
            if self.on_epoch is not None:
                self.on_epoch(trial, stats)
            trial.report(stats.val_accuracy, stats.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {stats.epoch} (val_accuracy {stats.val_accuracy:.4f})")

        s = self.splits
        with dog if dog is not None else contextlib.nullcontext() as watch:
            try:
                _, history = s.train(config, device=self.device, on_epoch=report, threads=self.threads)
            except TrainingDiverged as exc:  # the configuration's fault, not the study's: prune it, say why
                reason = f"trial #{trial.number}: {exc.message} The trial was stopped and pruned; the study goes on."
                trial.set_user_attr("diverged", reason)
                logger.warning("%s", reason)
                raise optuna.TrialPruned(reason) from None
            except RuntimeError as exc:
                if is_out_of_memory(exc):  # a failed trial (run_study catches it); the study goes on
                    trial.set_user_attr("out_of_memory", str(exc).splitlines()[0][:500])
                    raise torch.OutOfMemoryError(f"trial #{trial.number} ran out of memory: {exc}") from exc
                raise  # anything else is a bug: it propagates
        return history.last.val_accuracy


#: What a trial owns: run_study records these as a failed trial (fail reason) and goes on; anything
#: else an objective raises is a bug and propagates. A divergence never gets here from :class:`Objective`
#: (it prunes the trial), only from an objective of the caller's; BudgetFilled ends a surplus trial.
TRIAL_FAILURES: tuple[type[Exception], ...] = (
    torch.OutOfMemoryError,
    MemoryError,
    TrainingDiverged,
    BudgetFilled,
    TrialHung,  # the watchdog failed a trial that made no progress (re-queued once for the same run)
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory"), which PyTorch does not type."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def study_name_for(dataset: str, fingerprint: str) -> str:
    """One study per dataset and data fingerprint: new data starts a new study."""
    return f"{dataset}-{fingerprint[:12]}"


def make_pruner(max_epochs: int) -> optuna.pruners.BasePruner:
    """Successive halving on the validation accuracy: rungs at epochs 2, 6, 18, ... keep the best third.

    The first rung is at epoch 2, never 1: under the one-cycle warm-up, epoch-1 accuracy says little
    about the end. So trials of one or two epochs are not pruned (a rung at the last epoch saves
    nothing). The search benchmark (docs/benchmarks.md, three seeds, 20 trials of 8 epochs) chose this
    pruner: it saved 44-53 % of the epochs at an equal best result, where Hyperband with the same
    first rung saved 24-38 % (it runs part of the trials in a bracket whose first rung is at epoch 6)
    and Hyperband with a rung at epoch 1 pruned the eventual winner.
    """
    if max_epochs < 3:
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=3)


def fit_to_space(point: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """``point`` moved into ``space``: lr and momentum clipped to the bounds, widths to the nearest grid step.

    A queued trial is run as given, even outside the distributions (Optuna only warns), so the seed
    and champion configurations are fitted to the user's bounds before they are queued.
    """

    def width(value: Any, low: int, high: int) -> int:
        top = (high - low) // space.hidden_step  # Optuna's suggest_int(step=...) tops out at the last full step
        return low + min(max(round((int(value) - low) / space.hidden_step), 0), top) * space.hidden_step

    return {
        "lr": min(max(float(point["lr"]), space.lr_min), space.lr_max),
        "momentum": min(max(float(point["momentum"]), space.momentum_min), space.momentum_max),
        "hidden1": width(point["hidden1"], space.hidden1_min, space.hidden1_max),
        "hidden2": width(point["hidden2"], space.hidden2_min, space.hidden2_max),
    }


def open_study(
    storage: str | optuna.storages.BaseStorage,
    study_name: str,
    *,
    seed: int,
    max_epochs: int,
    user_attrs: dict[str, Any] | None = None,
    enqueue_seed: bool = True,
    warm_start: Sequence[dict[str, Any]] = (),
    space: SearchSpace | None = None,
) -> optuna.Study:
    """Create or resume (``load_if_exists``) the study; a seeded TPE sampler and a successive-halving pruner.

    A new study first runs the seed configuration, then the ``warm_start`` points (e.g. the champion
    of an earlier study, whose data changed), so what earlier runs learnt is not thrown away.
    A URL string becomes one storage, shared by the probe and the returned study. With ``space``,
    each queued point is first fitted to it (:func:`fit_to_space`; the original is kept as ``fitted_from``).
    """
    if isinstance(storage, str):
        storage = optuna.storages.get_storage(storage)
    probe = optuna.create_study(storage=storage, study_name=study_name, direction="maximize", load_if_exists=True)
    # Offset the sampler's seed by the trials already there, so a resumed study does not replay
    # the random start-up points of an earlier run while staying reproducible.
    sampler = optuna.samplers.TPESampler(seed=seed + len(probe.trials), n_startup_trials=8, multivariate=True)
    study = optuna.load_study(storage=storage, study_name=study_name, sampler=sampler, pruner=make_pruner(max_epochs))
    for key, value in (user_attrs or {}).items():
        study.set_user_attr(key, value)
    if not study.trials:
        queued: list[tuple[dict[str, Any], dict[str, Any]]] = (
            [(SEED_PARAMS, {"baseline": "seed tutorial configuration"})] if enqueue_seed else []
        )
        queued += [(point, {"warm_start": "champion of an earlier study"}) for point in warm_start]
        for point, attrs in queued:
            fitted = fit_to_space(point, space) if space is not None else dict(point)
            if fitted != {key: point[key] for key in fitted}:
                attrs = {**attrs, "fitted_from": dict(point)}  # moved into the user's bounds
            # skip_if_exists: two processes opening a new study at once both get here; the later one finds
            # the point already queued (Optuna checks existing trials' params) and adds none
            study.enqueue_trial(fitted, user_attrs=attrs, skip_if_exists=True)
    return study


def last_value(trial: FrozenTrial) -> float | None:
    """The trial's value, else its last reported intermediate value (a pruned trial), else None."""
    if trial.value is not None:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def finished_trials(study: optuna.Study, run_key: str | None = None) -> list[FrozenTrial]:
    """The study's COMPLETE and PRUNED trials, optionally only those of one run."""
    return finished_of(study.get_trials(deepcopy=False, states=FINISHED), run_key)


def finished_of(trials: Sequence[FrozenTrial], run_key: str | None = None) -> list[FrozenTrial]:
    """The COMPLETE and PRUNED trials among ``trials``, optionally only those of one run."""
    return [t for t in trials if t.state in FINISHED and (run_key is None or t.user_attrs.get("run_key") == run_key)]


TrialCallback = Callable[[optuna.Study, FrozenTrial], None]

#: User attribute of a trial stopped by Ctrl-C (Optuna then records it as FAIL).
INTERRUPTED_REASON = "interrupted by the user (Ctrl-C, SIGINT)"


def record_interrupt(objective: Callable[[optuna.Trial], float]) -> Callable[[optuna.Trial], float]:
    """``objective``, writing the reason on a trial that Ctrl-C stops (user attribute ``fail_reason``).

    Optuna marks such a trial FAIL and re-raises the interrupt; the reason says why it failed.
    """

    def run(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except KeyboardInterrupt:
            try:
                trial.set_user_attr("fail_reason", INTERRUPTED_REASON)
            except Exception:  # noqa: BLE001 - the interrupt matters more than its label
                logger.debug("could not record the interrupt on trial #%d", trial.number)
            raise

    return run


def run_study(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    *,
    n_trials: int,
    run_key: str | None,
    callbacks: Sequence[TrialCallback] = (),
    lock: Lock | None = None,
    poll_seconds: float = 1.0,
) -> list[FrozenTrial]:
    """Run trials until ``n_trials`` of this run have finished, in this process and any other.

    Several processes may call this on the same study and run key at once (``lock`` from
    :func:`mnist_flow.search.budget.trial_lock` makes that safe across processes): together they finish
    exactly ``n_trials``. A resumed run only does the rest. See :mod:`mnist_flow.search.budget`.
    """
    if n_trials < 1:
        raise ConfigError(f"n_trials must be >= 1, got {n_trials}.", fix="Pass --n-trials 1 or more.")
    budget = TrialBudget(n_trials, run_key, lock)
    guarded = record_interrupt(budget.guard(objective))
    last: list[FrozenTrial] = []
    failed_in_a_row = 0
    waited = False
    while (step := budget.begin(study)) is not Step.DONE:
        last.clear()
        if step is Step.WAIT:  # the other slots are running elsewhere; one may die and come back queued
            if not waited:
                logger.info(
                    "run %s: the remaining trial(s) are running in other processes; waiting for them "
                    "(a dead one is retried after its heartbeat grace period)",
                    run_key,
                )
            waited = True
            time.sleep(poll_seconds)
            continue
        waited = False
        try:
            # A failed trial (caught, so it costs one trial and not the study) does not count: go round again.
            study.optimize(
                guarded, n_trials=1, callbacks=[*callbacks, lambda _s, t: last.append(t)], catch=TRIAL_FAILURES
            )
        finally:
            budget.release()
        trial = last[-1] if last else None
        if trial is not None and trial.state == TrialState.FAIL and ran_here(trial):
            failed_in_a_row += 1
            if failed_in_a_row >= n_trials:
                raise ConfigError(
                    f"All {failed_in_a_row} trials of the last round failed.",
                    fix="Look at the trials' fail reasons in optuna-dashboard or the log.",
                )
        elif trial is not None:
            failed_in_a_row = 0
    return finished_trials(study, run_key)


def recipe_of(config: TrainConfig) -> dict[str, Any]:
    """The fixed (not searched) part of a configuration; trials are only comparable within one recipe."""
    return {
        "batch_size": config.batch_size,
        "weight_decay": config.weight_decay,
        "schedule": config.schedule,
        "epochs": config.epochs,
    }


def best_trial(study: optuna.Study, recipe: dict[str, Any] | None = None) -> FrozenTrial:
    """The best COMPLETE trial of the whole study (earlier runs count), trained with ``recipe`` if given."""
    return best_of(study.get_trials(deepcopy=False), recipe)


def best_of(trials: Sequence[FrozenTrial], recipe: dict[str, Any] | None = None) -> FrozenTrial:
    """The best COMPLETE trial among ``trials`` (a study's), trained with ``recipe`` if given.

    A run with another batch size or schedule must not retrain the best point of a different recipe.
    """
    complete = [
        t for t in trials if t.state == TrialState.COMPLETE and (recipe is None or t.user_attrs.get("recipe") == recipe)
    ]
    if not complete:
        diverged = [t.number for t in trials if t.state == TrialState.PRUNED and "diverged" in t.user_attrs]
        if diverged:
            raise TrainingDiverged(
                f"No trial of the study completed: {len(diverged)} diverged (trials "
                f"{', '.join(f'#{n}' for n in diverged[:10])}{', ...' if len(diverged) > 10 else ''}), "
                "so there is no configuration to train.",
                fix="Lower the learning rate's upper bound (lr_max) or the momentum's (momentum_max) and run again.",
            )
        raise ConfigError(
            "No trial of the study completed, so there is no configuration to train.",
            fix="Run more trials (--n-trials) or more epochs (--max-epochs) so some finish unpruned.",
        )
    return max(complete, key=lambda t: (t.value, -t.number))
