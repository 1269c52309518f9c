"""Atomic writes of local files: a reader sees the old file or the whole new one, never a half-written one.

A write that cannot succeed however often it is retried (disk full, read-only file system, no
permission) ends in one :class:`~mnist_flow.errors.StorageError` naming the folder and the fix;
Prefect does not retry it (it is not a transient error).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from mnist_flow.errors import StorageError

#: errno values of writes that fail again on a retry: disk full or quota, read-only, no permission, too big.
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
DEFAULT_FIX = (
    "Free some space or make the folder writable, or point MNIST_FLOW_HOME (or MNIST_FLOW_DATA_DIR, "
    "MNIST_FLOW_ARTIFACTS_URL, MNIST_FLOW_DATABASE_URL) at a writable disk with room."
)


def storage_error(
    exc: BaseException, path: str | os.PathLike[str], what: str = "the file", *, fix: str = DEFAULT_FIX
) -> StorageError | None:
    """The StorageError for ``exc`` when it is a write failure no retry can fix (else None).

    ``path`` is the file (or folder) being written; the message names its folder and the cause.
    """
    if not isinstance(exc, OSError) or exc.errno not in PERMANENT_ERRNOS:
        return None
    folder = Path(path).parent if not Path(path).is_dir() else Path(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        cause = f"no space left on the disk holding {folder}"
    elif exc.errno == errno.EFBIG:
        cause = f"the file is too large for the file system holding {folder}"
    elif exc.errno == errno.EROFS:
        cause = f"{folder} is on a read-only file system"
    else:
        cause = f"no permission to write in {folder}"
    return StorageError(f"Cannot write {what}: {cause} ({os.strerror(exc.errno)}).", fix=fix)


def raise_storage_error(
    exc: BaseException, path: str | os.PathLike[str], what: str = "the file", *, fix: str = DEFAULT_FIX
) -> None:
    """Raise :func:`storage_error`'s StorageError for ``exc`` if there is one (else return)."""
    error = storage_error(exc, path, what, fix=fix)
    if error is not None:
        raise error from None


@contextmanager
def atomic_file(
    path: str | os.PathLike[str],
    *,
    suffix: str = ".part",
    sync_folder: bool = False,
    what: str | None = None,
    fix: str = DEFAULT_FIX,
) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` when the block ends without an exception.

    The bytes go to a hidden temp file next to ``path`` (``.NAME.XXXX<suffix>``), are fsynced, then
    renamed over ``path``; if the block raises, the temp file is removed and ``path`` is untouched.
    ``sync_folder`` also fsyncs the folder, so the rename itself survives a power cut (POSIX only).
    A full disk, a read-only folder or a missing permission raise StorageError (``what`` names the file).
    """
    path = Path(path)
    what = what or str(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as exc:
        raise_storage_error(exc, path, what, fix=fix)
        raise
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp creates 0600; the file is data, not a secret
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise_storage_error(exc, path, what, fix=fix)
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)
    if sync_folder and hasattr(os, "O_DIRECTORY"):
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    suffix: str = ".part",
    sync_folder: bool = False,
    what: str | None = None,
    fix: str = DEFAULT_FIX,
) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, suffix=suffix, sync_folder=sync_folder, what=what, fix=fix) as handle:
        handle.write(data)
