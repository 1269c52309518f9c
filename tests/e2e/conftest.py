"""Fixtures of the end-to-end tests: throw-away PostgreSQL databases and a token to find stray processes."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # procs.py, shared with the scale-out tests

import procs  # noqa: E402

PG_ADMIN = os.environ.get("MNIST_FLOW_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres").replace(
    "postgresql+psycopg://", "postgresql://")


@pytest.fixture
def pg_database() -> Iterator[Callable[[str], str]]:
    """A factory of fresh databases ``mnist_flow_e2e_<random>`` (returns a driver-less URL); all dropped after."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    created: list[str] = []

    def create(purpose: str) -> str:
        name = f"mnist_flow_e2e_{uuid.uuid4().hex[:10]}_{purpose}"
        admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return PG_ADMIN.rsplit("/", 1)[0] + "/" + name

    try:
        yield create
    finally:
        for name in created:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def e2e_token() -> Iterator[str]:
    """A token in every started process's environment; the test fails if any such process outlives it."""
    token = procs.new_token()
    yield token
    stray = procs.kill_leftovers(token)
    assert not stray, f"processes left running after the test (killed now): {stray}"
