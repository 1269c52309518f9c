"""Locks that hold across the processes sharing one database: the only lock implementations.

:func:`mnist_flow.storage.db.database_lock` picks one for a database URL: a PostgreSQL session advisory lock
(every process on every machine; the server drops it with the connection, so a killed process cannot
leave it held), an exclusive ``flock`` on a file next to a SQLite database (every process on this
machine), or a thread lock (in-memory databases, tests). Each is a context manager.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Any


class Lock(ABC):
    """A mutual exclusion that holds across the processes sharing a database; a context manager."""

    @abstractmethod
    def acquire(self) -> None: ...

    @abstractmethod
    def release(self) -> None: ...

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class ThreadLock(Lock):
    """One process only (in-memory databases, tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self) -> None:
        self._lock.acquire()

    def release(self) -> None:
        self._lock.release()


class FileLock(Lock):
    """An exclusive ``flock`` on ``path``: every process on this machine, none elsewhere (SQLite)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only or missing folder: SQLite itself will report the real problem
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def advisory_key(name: str) -> int:
    """The signed 64-bit advisory-lock key of ``name`` (stable across processes and machines)."""
    return int.from_bytes(hashlib.sha256(f"mnist-flow:{name}".encode()).digest()[:8], "big", signed=True)


class AdvisoryLock(Lock):
    """A PostgreSQL session advisory lock, held on a connection of its own from ``connect``."""

    def __init__(self, connect: Callable[[], Any], name: str, *, on_close: Callable[[], None] = lambda: None) -> None:
        self._connect, self._on_close = connect, on_close
        self.key = advisory_key(name)
        self._connection: Any = None

    def acquire(self) -> None:
        from sqlalchemy import text

        connection = self._connect()
        try:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
            connection.commit()
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def release(self) -> None:
        from sqlalchemy import text

        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
                connection.commit()
            finally:
                connection.close()
                self._on_close()  # no idle connection left behind between turns
