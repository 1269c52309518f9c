"""The trial budget of a run, kept exactly while several processes run trials of one study.

A run (one ``run_key``) asks for ``n_trials`` finished trials (COMPLETE or PRUNED). With
``workers > 1`` several processes, on one machine or many, run trials of the same study at once.
Optuna's ``MaxTrialsCallback`` is not enough there: it counts the whole study (not one run) and only
stops a process *after* a trial ends, so two processes that both see "one left" both start one.

Design (:class:`TrialBudget`, used by :func:`mnist_flow.search.study.run_study`):

- A trial belongs to a run through its ``run_key`` user attribute.
- Starting a trial is serialised per study by a lock that works across processes
  (:func:`trial_lock`, one of :mod:`mnist_flow.storage.locks`): a PostgreSQL advisory lock on PostgreSQL, an
  exclusive ``flock`` on a file next to a SQLite database (SQLite is one machine only), a thread lock
  for in-memory studies.
- Under the lock a process counts the run's trials in the storage: finished (COMPLETE, PRUNED),
  running (RUNNING) and queued (WAITING). It starts one only if ``finished + running + queued <
  n_trials``, or to pop a queued trial of the run. It keeps the lock until the new trial carries the
  run's tag, so two processes can never take the same last slot: no overshoot.
- FAIL trials do not count. A trial whose process died is failed once its heartbeat is older than
  the grace period (``fail_stale_trials``, run at every turn) and queued again with the run's tag by
  ``RetryHeartbeatStaleTrialCallback``; the next process to take a turn runs it. So a process does not
  stop when the slots are taken but when ``n_trials`` are *finished*; meanwhile it waits and polls.
- A queued trial that already carries another run's tag is run for that run, untouched. Only in a
  rare race (a run's re-queued trial and an untagged queued trial, with the budget full) can a
  process pop a trial it may not run; that trial ends FAIL with the reason, tagged ``surplus_of``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_flow.storage.db import database_lock
from mnist_flow.storage.locks import Lock, ThreadLock

RUN_KEY_ATTR = "run_key"
SURPLUS_ATTR = "surplus_of"


def trial_lock(storage_url: str | None, study_name: str) -> Lock:
    """The lock that serialises starting trials of ``study_name`` in the database at ``storage_url``."""
    if not storage_url:
        return ThreadLock()
    return database_lock(storage_url, f"trials:{study_name}")


class Step(Enum):
    """What a process does at its turn."""

    RUN = "run"  # start (or pop) one trial; the lock is held until it is tagged
    WAIT = "wait"  # the slots are taken by running trials: poll again later
    DONE = "done"  # n_trials of the run are finished


@dataclass(frozen=True)
class Counts:
    """The run's trials in the storage, by state."""

    finished: int
    running: int
    waiting: int


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the trials whose heartbeat is older than the grace period (a no-op without heartbeats)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class BudgetFilled(RuntimeError):
    """A popped trial that this process may not run: the run's budget is already taken."""


class TrialBudget:
    """Exactly ``n_trials`` finished trials of ``run_key``, however many processes run them."""

    def __init__(self, n_trials: int, run_key: str | None, lock: Lock | None = None) -> None:
        self.n_trials, self.run_key = n_trials, run_key
        self.lock = lock or ThreadLock()
        self._held = False

    def counts(self, study: optuna.Study) -> Counts:
        """Count the run's finished, running and queued trials (read from the storage)."""
        trials = study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        )
        mine = [t for t in trials if self.run_key is None or t.user_attrs.get(RUN_KEY_ATTR) == self.run_key]
        return Counts(
            finished=sum(t.state.is_finished() for t in mine),
            running=sum(t.state == TrialState.RUNNING for t in mine),
            waiting=sum(t.state == TrialState.WAITING for t in mine),
        )

    def begin(self, study: optuna.Study) -> Step:
        """Take a turn. On ``Step.RUN`` the lock stays held until :meth:`claim` (or :meth:`release`)."""
        fail_stale_trials(study)
        self.lock.acquire()
        self._held = True
        try:
            counts = self.counts(study)
            if counts.finished >= self.n_trials:
                step = Step.DONE
            elif counts.waiting > 0 or counts.finished + counts.running < self.n_trials:
                step = Step.RUN
            else:
                step = Step.WAIT
        except BaseException:
            self.release()
            raise
        if step is not Step.RUN:
            self.release()
        return step

    def claim(self, trial: optuna.Trial) -> str | None:
        """Tag a new trial with the run (if a slot is free) and release the lock.

        Returns the run the trial is run for: its own tag for a re-queued trial, ``run_key`` for a
        new one, None when the budget is full (the trial must not run).
        """
        try:
            owner = trial.user_attrs.get(RUN_KEY_ATTR)
            if owner is not None or self.run_key is None:
                return owner
            counts = self.counts(study=trial.study)
            if counts.finished + counts.running + counts.waiting < self.n_trials:
                trial.set_user_attr(RUN_KEY_ATTR, self.run_key)
                return self.run_key
            trial.set_user_attr(SURPLUS_ATTR, self.run_key)
            return None
        finally:
            self.release()

    def release(self) -> None:
        """Release the lock if this process holds it (idempotent)."""
        if self._held:
            self._held = False
            self.lock.release()

    def guard(self, objective: Callable[[optuna.Trial], float]) -> Callable[[optuna.Trial], float]:
        """``objective`` preceded by :meth:`claim`: a trial past the budget ends before any work."""

        def guarded(trial: optuna.Trial) -> float:
            if self.claim(trial) is None and self.run_key is not None:
                raise BudgetFilled(
                    f"run {self.run_key}: its {self.n_trials} trial(s) were already taken by "
                    "other workers; this trial was not run"
                )
            return objective(trial)

        return guarded


def ran_here(trial: FrozenTrial) -> bool:
    """Whether a trial counts as work (not a surplus trial ended before it started)."""
    return SURPLUS_ATTR not in trial.user_attrs
