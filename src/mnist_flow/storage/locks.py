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


class _HandleLock(Lock):
    """A lock held through a handle (a file descriptor, a connection): opened and locked on acquire,
    unlocked and closed on release; a failed lock closes its handle."""

    def __init__(self) -> None:
        self._handle: Any = None

    @abstractmethod
    def _open(self) -> Any:
        """A new handle, or None when there is nothing to lock with (the caller goes on unlocked)."""

    @abstractmethod
    def _lock(self, handle: Any) -> None: ...

    @abstractmethod
    def _unlock(self, handle: Any) -> None: ...

    @abstractmethod
    def _close(self, handle: Any) -> None: ...

    def acquire(self) -> None:
        handle = self._open()
        if handle is None:
            return
        try:
            self._lock(handle)
        except BaseException:
            self._close(handle)
            raise
        self._handle = handle

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                self._unlock(handle)
            finally:
                self._close(handle)


class FileLock(_HandleLock):
    """An exclusive ``flock`` on ``path``: every process on this machine, none elsewhere (SQLite)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _open(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only or missing folder: SQLite itself will report the real problem
            return None

    def _lock(self, handle: int) -> None:
        fcntl.flock(handle, fcntl.LOCK_EX)

    def _unlock(self, handle: int) -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)

    def _close(self, handle: int) -> None:
        os.close(handle)


def advisory_key(name: str) -> int:
    """The signed 64-bit advisory-lock key of ``name`` (stable across processes and machines)."""
    return int.from_bytes(hashlib.sha256(f"mnist-flow:{name}".encode()).digest()[:8], "big", signed=True)


class AdvisoryLock(_HandleLock):
    """A PostgreSQL session advisory lock, held on a connection of its own from ``connect``."""

    def __init__(self, connect: Callable[[], Any], name: str, *, on_close: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self._connect, self._on_close = connect, on_close
        self.key = advisory_key(name)

    def _open(self) -> Any:
        return self._connect()

    def _lock(self, handle: Any) -> None:
        self._run(handle, "SELECT pg_advisory_lock(:key)")

    def _unlock(self, handle: Any) -> None:
        self._run(handle, "SELECT pg_advisory_unlock(:key)")

    def _close(self, handle: Any) -> None:
        handle.close()
        self._on_close()  # no idle connection left behind between turns

    def _run(self, connection: Any, sql: str) -> None:
        from sqlalchemy import text

        connection.execute(text(sql), {"key": self.key})
        connection.commit()
