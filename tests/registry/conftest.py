"""Fixtures for the registry tests: SQLite files, throw-away PostgreSQL databases, tiny models."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mnist_flow.registry import Registry

PG_ADMIN_URL = os.environ.get("MNIST_FLOW_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _pg_admin_conninfo() -> str:
    return PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state' / 'mnist-flow.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards; skipped when no server answers."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(_pg_admin_conninfo(), autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    name = f"mnist_flow_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def registry(sqlite_url: str, tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(sqlite_url, str(tmp_path / "artifacts"))
    yield reg
    reg.dispose()
