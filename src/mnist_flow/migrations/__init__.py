"""Alembic migrations of the registry schema, run programmatically (no alembic.ini needed).

Concurrent starts are serialised: PostgreSQL takes a transaction-scoped advisory lock, SQLite
holds an exclusive lock on a ``<database>.migrate.lock`` file next to the database.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from mnist_flow.db import sqlite_path

VERSION_TABLE = "mnist_flow_alembic_version"
_ADVISORY_KEY = zlib.crc32(b"mnist_flow.migrations")  # fixed 32-bit key, fits a bigint


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).resolve().parent))
    return config


def head_revision() -> str | None:
    """The newest revision shipped with this package."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The revision recorded in the database (None before the first migration)."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            import msvcrt

            while True:
                try:
                    msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _upgrade(connection: Connection) -> None:
    config = _config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def upgrade(engine: Engine) -> None:
    """Bring the registry schema to head; idempotent and safe when several processes start at once."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_KEY})
            _upgrade(connection)
        return
    path = sqlite_path(engine.url.render_as_string(hide_password=False)) if engine.dialect.name == "sqlite" else None
    lock = _file_lock(path.with_name(path.name + ".migrate.lock")) if path else contextlib.nullcontext()
    with lock, engine.begin() as connection:
        _upgrade(connection)
