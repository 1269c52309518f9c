"""Atomic writes of local files: a reader sees the old file or the whole new one, never a half-written one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_file(path: str | os.PathLike[str], *, suffix: str = ".part",
                sync_folder: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` when the block ends without an exception.

    The bytes go to a hidden temp file next to ``path`` (``.NAME.XXXX<suffix>``), are fsynced, then
    renamed over ``path``; if the block raises, the temp file is removed and ``path`` is untouched.
    ``sync_folder`` also fsyncs the folder, so the rename itself survives a power cut (POSIX only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp creates 0600; the file is data, not a secret
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if sync_folder and hasattr(os, "O_DIRECTORY"):
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, suffix: str = ".part",
                 sync_folder: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, suffix=suffix, sync_folder=sync_folder) as handle:
        handle.write(data)
