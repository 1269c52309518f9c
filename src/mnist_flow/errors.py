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


#: User-caused errors that may go away on their own (a network or database outage): worth retrying.
TRANSIENT_ERRORS: tuple[type[MnistFlowError], ...] = (DownloadError, DatabaseUnavailableError)
