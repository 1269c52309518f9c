"""Alembic migrations of the registry schema, run programmatically (no alembic.ini needed).

Concurrent starts are serialised by :func:`mnist_flow.storage.db.database_lock` (a PostgreSQL advisory lock, or an
exclusive lock on a file next to a SQLite database).

A database whose registry revision this package does not know (written by a newer mnist-flow, or
edited), or whose registry tables are missing although its revision says they exist, is refused
with one :class:`~mnist_flow.errors.DatabaseDamagedError`.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

from mnist_flow.errors import DatabaseDamagedError
from mnist_flow.storage.db import DAMAGED_FIX, database_lock, mask_url

VERSION_TABLE = "mnist_flow_alembic_version"
#: The registry's tables at head (checked after every upgrade: a dropped one is reported, not re-created).
TABLES = ("mnist_flow_model_versions", "mnist_flow_aliases", "mnist_flow_decisions")


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


def _upgrade(connection: Connection) -> None:
    config = _config()
    config.attributes["connection"] = connection
    try:
        command.upgrade(config, "head")
    except CommandError as exc:
        where = mask_url(connection.engine.url.render_as_string(hide_password=True))
        raise DatabaseDamagedError(
            f"The registry tables of the database {where} are at a schema revision this mnist-flow does not know "
            f"({current_revision(connection)!r}; it knows up to {head_revision()!r}): the database was written by a "
            f"newer mnist-flow, or its {VERSION_TABLE} table was edited ({exc}).",
            fix="Upgrade mnist-flow to the version that wrote the database, or set MNIST_FLOW_DATABASE_URL to "
            "another database.",
        ) from None
    missing = [table for table in TABLES if not inspect(connection).has_table(table)]
    if missing:
        where = mask_url(connection.engine.url.render_as_string(hide_password=True))
        raise DatabaseDamagedError(
            f"The database {where} lacks the registry table(s) {', '.join(missing)} although its schema revision "
            f"({current_revision(connection)}) says they exist: they were dropped or the database was damaged.",
            fix=DAMAGED_FIX,
        )


def upgrade(engine: Engine) -> None:
    """Bring the registry schema to head; idempotent and safe when several processes start at once."""
    url = engine.url.render_as_string(hide_password=False)
    with database_lock(url, "registry-migrations"), engine.begin() as connection:
        _upgrade(connection)
