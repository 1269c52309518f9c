"""Errors a user can cause and fix.

Every error raised for bad input, bad data or an unreachable service derives from
:class:`MnistFlowError`. The CLI and the flow entry point print such an error as one
message (cause, then fix) and exit non-zero, without a traceback.
"""

from __future__ import annotations


class MnistFlowError(Exception):
    """Base class: ``message`` names the cause, ``fix`` tells the user what to do."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}\nFix: {self.fix}" if self.fix else self.message


class ConfigError(MnistFlowError):
    """A parameter or setting has a value that cannot work."""


class DataError(MnistFlowError):
    """A data file is missing, corrupt, or does not match its checksum."""


class DownloadError(DataError):
    """No mirror delivered a file: possibly transient (network), so worth retrying."""


class RegistryError(MnistFlowError):
    """The model registry was asked for something it does not hold or cannot do."""


class ArtifactIntegrityError(RegistryError):
    """A model artifact does not match the checksum recorded in the registry."""


class DatabaseUnavailableError(MnistFlowError):
    """The study or registry database cannot be reached."""


class DatabaseDamagedError(MnistFlowError):
    """The database exists but cannot be used as it is: corrupt, an unknown schema revision, a missing table."""


class StorageError(MnistFlowError):
    """A file cannot be written or kept where it must go (disk full, read-only, not persistent)."""


class ImageError(MnistFlowError):
    """An image given for prediction cannot be used."""


class TrainingDiverged(MnistFlowError):
    """A training run's loss became non-finite or exploded and could not be recovered.

    Not a user's bad input: the message names the run (trial or final fit), the epoch and what was
    done about it. ``epoch`` is the epoch it happened in, ``loss`` the mean loss that gave it away.
    """

    def __init__(
        self, message: str, *, fix: str | None = None, epoch: int | None = None, loss: float | None = None
    ) -> None:
        super().__init__(message, fix=fix)
        self.epoch, self.loss = epoch, loss

    def restated(self, message: str) -> TrainingDiverged:
        """The same divergence told with the caller's context: its fix, epoch and loss kept."""
        return TrainingDiverged(message, fix=self.fix, epoch=self.epoch, loss=self.loss)


#: User-caused errors that may go away on their own (a network or database outage): worth retrying.
TRANSIENT_ERRORS: tuple[type[MnistFlowError], ...] = (DownloadError, DatabaseUnavailableError)


#: The one line a command prints when Ctrl-C stops it (exit code 130).
INTERRUPTED = "interrupted (Ctrl-C): stopped; what finished is kept (an interrupted trial is recorded as FAIL)"

#: Loggers whose records may carry a user error's traceback: Prefect's run and engine loggers, Optuna's.
NOISY_LOGGERS = (
    "prefect",
    "prefect.flow_runs",
    "prefect.task_runs",
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.task_engine",
    "optuna",
    "optuna.study._optimize",
)


def is_user_error(exc: BaseException | None) -> bool:
    """An error the user caused (one message is enough) or an interrupt (Ctrl-C): no traceback for either."""
    return isinstance(exc, (MnistFlowError, KeyboardInterrupt))


def one_line(exc: BaseException) -> str:
    """A user error as one line (cause, then fix), e.g. for a log record."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return " ".join(str(exc).split("\n"))


class OneMessageFilter:
    """A logging filter that turns a record carrying a user error into one line, without its traceback.

    Prefect logs a failed task or flow with the exception's traceback (and Optuna a failed trial); for
    an :class:`MnistFlowError` or an interrupt the message alone says everything, so the traceback is
    dropped and the exception's repr is replaced by its one-line message (cause and fix). Optuna's
    follow-up line of an interrupted trial ("Trial N failed with value None.") is dropped too.
    """

    def __init__(self) -> None:
        self._interrupted_trials: set[str] = set()

    def filter(self, record: object) -> bool:
        import logging

        assert isinstance(record, logging.LogRecord)
        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        if exc is None:
            if message in self._interrupted_trials:  # Optuna's second line about the interrupted trial
                self._interrupted_trials.discard(message)
                return False
            return True
        if not is_user_error(exc):
            return True
        if isinstance(exc, KeyboardInterrupt) and message.startswith("Trial ") and " failed " in message:
            self._interrupted_trials.add(f"{message.split(' failed ', 1)[0]} failed with value None.")
            return False  # the trial is recorded as FAIL with its reason; the CLI prints the one line
        record.msg = message.replace(repr(exc), f"{type(exc).__name__}: {one_line(exc)}")
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


_FILTER = OneMessageFilter()


def quiet_user_error_tracebacks(names: tuple[str, ...] = NOISY_LOGGERS) -> None:
    """Install :class:`OneMessageFilter` on the named loggers and on their handlers (idempotent).

    Call it once logging is configured (Prefect configures its handlers when a run starts).
    """
    import logging

    for name in names:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)
