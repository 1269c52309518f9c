"""Alembic migrations of the registry schema, run programmatically (no alembic.ini needed).

Concurrent starts are serialised by :func:`mnist_flow.db.database_lock` (a PostgreSQL advisory lock,
or an exclusive lock on a file next to a SQLite database).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from mnist_flow.db import database_lock

VERSION_TABLE = "mnist_flow_alembic_version"


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
    command.upgrade(config, "head")


def upgrade(engine: Engine) -> None:
    """Bring the registry schema to head; idempotent and safe when several processes start at once."""
    url = engine.url.render_as_string(hide_password=False)
    with database_lock(url, "registry-migrations"), engine.begin() as connection:
        _upgrade(connection)
