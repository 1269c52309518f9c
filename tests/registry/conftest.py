"""Fixtures for the registry tests: SQLite files, throw-away PostgreSQL databases, tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mnist_flow.registry.store import Registry


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state' / 'mnist-flow.db'}"


@pytest.fixture
def registry(sqlite_url: str, tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(sqlite_url, str(tmp_path / "artifacts"))
    yield reg
    reg.dispose()
