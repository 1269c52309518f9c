"""Hang detection: a trial that makes no progress for a multiple of its expected epoch time is failed.

Optuna's heartbeats catch a trial whose process died, not one whose process is stuck: the heartbeat
thread keeps beating while the training thread is blocked. :class:`Watchdog` watches progress
instead. The objective arms it for each trial (:meth:`Watchdog.watch`) and beats it after every epoch;
a monitor thread checks the time since the last beat against the trial's limit:

    limit = max(min_seconds, multiple x expected epoch seconds)

The expected epoch time is the slowest epoch this trial has run so far; before its first epoch it is
estimated from the study's earlier trials (their recorded ``epoch_seconds``, scaled by the number of
weights, since an epoch costs about samples x weights), and without any history from a pessimistic
rate (:data:`FALLBACK_MACS_PER_SECOND`).

When the limit passes, the watchdog

1. raises :class:`TrialHung` in the trial's thread (``PyThreadState_SetAsyncExc``, the mechanism
   Prefect's own timeouts use off the main thread). The objective fails, Optuna records the trial as
   FAIL with the reason, and its configuration is queued again for the same run (at most
   ``max_retries`` times), so the run still finishes its ``n_trials``;
2. if the thread is stuck in native code and never reaches Python again, it ends the process after a
   second ``limit`` (exit code :data:`HUNG_EXIT_CODE`). A Prefect worker then marks the flow run
   Crashed and the service's retry automation runs it again (same run key): the resumed run fails the
   stuck trial by its stale heartbeat and retries it. See docs/service.md.

:func:`task_timeout` turns the same estimate into a backstop for a whole stage (the tune and train tasks).
No Prefect here: ``flows/`` passes a :class:`Watchdog` built from the settings.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: Multiply-accumulates per second assumed when nothing was measured yet: about 50x below this
#: trainer's measured bf16 rate on 2 cores and 3x below the slowest busy-machine epoch measured.
FALLBACK_MACS_PER_SECOND = 1.0e9
#: A training step costs about 3 passes over the weights per sample (forward, two backward products).
PASSES_PER_SAMPLE = 3
#: Exit status of a process the watchdog ended because a trial stayed stuck in native code.
HUNG_EXIT_CODE = 75
RETRY_ATTR = "hang_retry_of"
#: User attribute of a trial failed as hung: why.
HUNG_ATTR = "hung"


class TrialHung(RuntimeError):
    """A trial made no progress for longer than its limit."""


def weights(hidden: Sequence[int], inputs: int = 784, classes: int = 10) -> int:
    """Weights of the MLP ``inputs -> hidden... -> classes`` (what an epoch's cost scales with)."""
    sizes = [inputs, *hidden, classes]
    return sum(a * b for a, b in itertools.pairwise(sizes))


def fallback_epoch_seconds(train_samples: int, hidden: Sequence[int]) -> float:
    """A pessimistic epoch time when nothing was measured (see :data:`FALLBACK_MACS_PER_SECOND`)."""
    return train_samples * weights(hidden) * PASSES_PER_SAMPLE / FALLBACK_MACS_PER_SECOND


def seconds_per_weight(trials: Sequence[Any]) -> float | None:
    """Median measured epoch seconds per weight over finished trials (``epoch_seconds`` user attribute)."""
    rates = []
    for trial in trials:
        seconds = trial.user_attrs.get("epoch_seconds") or []
        params = trial.params
        if seconds and "hidden1" in params and "hidden2" in params:
            rates.append(max(seconds) / weights((int(params["hidden1"]), int(params["hidden2"]))))
    return statistics.median(rates) if rates else None


def expected_epoch_seconds(hidden: Sequence[int], train_samples: int, history: Sequence[Any] = ()) -> float:
    """The expected epoch time of a configuration: from the study's history, else the pessimistic estimate."""
    rate = seconds_per_weight(history)
    if rate is not None:
        return rate * weights(hidden)
    return fallback_epoch_seconds(train_samples, hidden)


def task_timeout(epochs: int, epoch_seconds: float, *, multiple: float, min_seconds: float) -> float:
    """A stage's timeout: ``multiple`` x the expected time of its ``epochs``, never under ``min_seconds``."""
    return max(min_seconds, multiple * epochs * epoch_seconds) + min_seconds


def stage_timeout(
    epochs: int,
    hidden: Sequence[int],
    train_samples: int,
    history: Sequence[Any] = (),
    *,
    multiple: float,
    min_seconds: float,
) -> float:
    """The timeout of a stage of ``epochs`` epochs of the configuration ``hidden``.

    With measured epochs in ``history`` it is ``multiple`` x their expected time; without, the pessimistic
    estimate alone (already far above any measured epoch, so no multiple on top). Never under ``min_seconds``.
    """
    if seconds_per_weight(history) is not None:
        return task_timeout(
            epochs, expected_epoch_seconds(hidden, train_samples, history), multiple=multiple, min_seconds=min_seconds
        )
    return task_timeout(epochs, fallback_epoch_seconds(train_samples, hidden), multiple=1.0, min_seconds=min_seconds)


def _raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> bool:
    """Raise ``exc_type`` in another thread at its next Python instruction (False if there is no such thread)."""
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    if done > 1:  # more than one thread state touched: undo (CPython's documented contract)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
        return False
    return done == 1


def _log_aside(level: int, message: str, *args: Any) -> None:
    """Log from a daemon thread, so that a handler lock held by a stuck thread blocks only that thread."""
    threading.Thread(target=logger.log, args=(level, message, *args), name="watchdog-log", daemon=True).start()


@dataclass
class _Watch:
    """One armed trial: the last beat, the expected epoch time so far, and the thread to interrupt."""

    label: str
    expected: float
    thread_id: int
    last: float = field(default_factory=time.monotonic)
    slowest: float = 0.0
    fired_at: float | None = None

    def beat(self, epoch_seconds: float | None = None) -> None:
        """Progress: an epoch ended (its training seconds refine the expected epoch time)."""
        if epoch_seconds is not None:
            self.slowest = max(self.slowest, epoch_seconds)
        self.last = time.monotonic()


class Watchdog:
    """Fails a trial that stops making progress; one monitor thread per armed trial.

    ``multiple`` and ``min_seconds`` come from the settings (``MNIST_FLOW_HANG_MULTIPLE``,
    ``MNIST_FLOW_HANG_MIN_SECONDS``). ``exit`` ends the process in the last resort (tests pass their own).
    """

    def __init__(
        self,
        *,
        multiple: float,
        min_seconds: float,
        max_retries: int = 1,
        poll_seconds: float = 0.5,
        exit: Callable[[int], Any] = os._exit,
    ) -> None:
        self.multiple, self.min_seconds, self.max_retries = multiple, min_seconds, max_retries
        self.poll_seconds, self._exit = poll_seconds, exit

    def limit(self, expected: float) -> float:
        """Seconds without progress after which a trial counts as hung."""
        return max(self.min_seconds, self.multiple * expected)

    def _expected(self, watch: _Watch) -> float:
        return watch.slowest or watch.expected

    @contextlib.contextmanager
    def watch(
        self, trial: Any, *, hidden: Sequence[int], train_samples: int, history: Sequence[Any] = ()
    ) -> Iterator[_Watch]:
        """Arm the watchdog for ``trial`` in this thread; on a hang, fail it and queue its configuration again."""
        expected = expected_epoch_seconds(hidden, train_samples, history)
        watch = _Watch(f"trial #{trial.number}", expected, threading.get_ident())
        stop = threading.Event()
        monitor = threading.Thread(
            target=self._monitor, args=(watch, stop), name=f"watchdog-{trial.number}", daemon=True
        )
        monitor.start()
        try:
            yield watch
        except TrialHung:
            limit = self.limit(self._expected(watch))
            with contextlib.suppress(Exception):  # the reason, shown in optuna-dashboard; best effort
                trial.set_user_attr(
                    HUNG_ATTR,
                    f"no progress for {limit:.0f} s ({self.multiple:g} x the expected "
                    f"epoch time {self._expected(watch):.1f} s, at least "
                    f"{self.min_seconds:g} s)",
                )
            self._requeue(trial)
            raise
        finally:
            stop.set()
            monitor.join(timeout=5)
        if watch.fired_at is not None:  # fired just as the trial ended: the exception is still pending
            with contextlib.suppress(TrialHung):
                time.sleep(0)  # let it land here rather than in the caller

    def _monitor(self, watch: _Watch, stop: threading.Event) -> None:
        # The stuck thread may hold locks (a logging handler's, a database's): the monitor takes none.
        # It acts first, and logs from a throwaway thread that may block without holding it up.
        while not stop.wait(self.poll_seconds):
            now = time.monotonic()
            limit = self.limit(self._expected(watch))
            if watch.fired_at is None and now - watch.last > limit:
                watch.fired_at = now
                _raise_in_thread(watch.thread_id, TrialHung)
                _log_aside(
                    logging.WARNING,
                    "%s made no progress for %.0f s (limit %.0f s: %g x the expected epoch "
                    "time %.1f s, at least %g s): failing it",
                    watch.label,
                    now - watch.last,
                    limit,
                    self.multiple,
                    self._expected(watch),
                    self.min_seconds,
                )
            elif watch.fired_at is not None and now - watch.fired_at > limit:
                message = (
                    f"mnist-flow watchdog: {watch.label} is stuck outside Python (it ignored the failure "
                    f"for {now - watch.fired_at:.0f} s): ending the process (exit {HUNG_EXIT_CODE}) so that "
                    "it can be restarted\n"
                )
                with contextlib.suppress(OSError):
                    os.write(2, message.encode())
                self._exit(HUNG_EXIT_CODE)
                return

    def _requeue(self, trial: Any) -> None:
        """Queue the hung trial's configuration again for the same run (at most ``max_retries`` times)."""
        retries = int(trial.user_attrs.get("hang_retries", 0))
        if retries >= self.max_retries:
            logger.warning(
                "trial #%d hung after %d retry(ies) of its configuration: not queued again", trial.number, retries
            )
            return
        attrs = {k: v for k, v in trial.user_attrs.items() if k in ("run_key", "baseline", "warm_start")}
        trial.study.enqueue_trial(
            trial.params, user_attrs={**attrs, "hang_retries": retries + 1, RETRY_ATTR: trial.number}
        )
        logger.info("trial #%d hung: its configuration is queued again for the same run", trial.number)
