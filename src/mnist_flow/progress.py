"""Progress reporting for long work: a live bar on a terminal, one log line per step elsewhere.

The library calls a :class:`Progress`; the CLI picks :class:`RichProgress` on a terminal and the
Prefect flow passes :class:`LogProgress` with its run logger, so the library never imports Prefect.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Protocol

from mnist_flow.formatting import format_params, format_value

if TYPE_CHECKING:
    from rich.progress import TaskID

    from mnist_flow.training.loop import EpochStats


class Progress(Protocol):
    def start_trials(self, total: int) -> None: ...
    def trial_done(
        self, number: int, state: str, value: float | None, best: float | None, params: dict, seconds: float
    ) -> None: ...
    def start_epochs(self, label: str, total: int) -> None: ...
    def epoch_done(self, stats: EpochStats, total: int) -> None: ...
    def close(self) -> None: ...


class LogProgress:
    """One log line per finished trial and per epoch of a fit.

    Fits may share it from several threads (the final fits of several seeds run at once): each thread's
    epochs are logged under the label that thread started its fit with.
    """

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.logger = logger
        self.total = 0
        self.done = 0
        self.started = time.perf_counter()
        self.labels: dict[int, str] = {}  # by thread

    def start_trials(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.perf_counter()

    def trial_done(
        self, number: int, state: str, value: float | None, best: float | None, params: dict, seconds: float
    ) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * max(0, self.total - self.done)
        self.logger.info(
            "trial %d/%d (#%d) %s value=%s best=%s in %.1fs, eta %.0fs: %s",
            self.done,
            self.total,
            number,
            state,
            format_value(value),
            format_value(best),
            seconds,
            eta,
            format_params(params),
        )

    def start_epochs(self, label: str, total: int) -> None:
        self.labels[threading.get_ident()] = label

    def epoch_done(self, stats: EpochStats, total: int) -> None:
        self.logger.info(
            "%s epoch %d/%d: train_loss=%.4f val_loss=%.4f val_accuracy=%.4f (%.2fs)",
            self.labels.get(threading.get_ident(), ""),
            stats.epoch,
            total,
            stats.train_loss,
            stats.val_loss,
            stats.val_accuracy,
            stats.seconds,
        )

    def close(self) -> None:
        pass


class NullProgress:
    def start_trials(self, total: int) -> None: ...
    def trial_done(self, *args: object, **kwargs: object) -> None: ...
    def start_epochs(self, label: str, total: int) -> None: ...
    def epoch_done(self, stats: EpochStats, total: int) -> None: ...
    def close(self) -> None: ...


class RichProgress:
    """Live bars: trials (done/total, best so far, ETA) and the epochs of the current fit."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bars = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.bars.start()
        self.trials: TaskID | None = None
        self.epochs: TaskID | None = None

    def start_trials(self, total: int) -> None:
        self.trials = self.bars.add_task("trials", total=total, info="best -")

    def trial_done(
        self, number: int, state: str, value: float | None, best: float | None, params: dict, seconds: float
    ) -> None:
        if self.trials is not None:
            self.bars.update(
                self.trials, advance=1, info=f"best {format_value(best)} (last #{number} {state} {format_value(value)})"
            )

    def start_epochs(self, label: str, total: int) -> None:
        if self.epochs is not None:
            self.bars.remove_task(self.epochs)
        self.epochs = self.bars.add_task(label, total=total, info="")

    def epoch_done(self, stats: EpochStats, total: int) -> None:
        if self.epochs is not None:
            self.bars.update(
                self.epochs, completed=stats.epoch, info=f"val_acc {stats.val_accuracy:.4f} loss {stats.train_loss:.4f}"
            )

    def close(self) -> None:
        self.bars.stop()


def quiet_optuna() -> None:
    """Optuna's own INFO line per trial repeats what the Progress reports; keep its warnings."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
