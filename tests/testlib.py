"""Helpers shared by the test layers (import with ``from testlib import ...``; conftest modules are not importable)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

IN_CI = bool(os.environ.get("CI"))
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def require_fashion_mnist() -> Path:
    """The Debian package's Fashion-MNIST: a failure in CI (which installs it), a skip elsewhere."""
    if not FASHION_DIR.is_dir():
        message = "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return FASHION_DIR


# PostgreSQL 15 on 127.0.0.1:5432 (trust auth); .ci/run starts it. Not an MNIST_FLOW_* variable: those are settings.
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_admin():  # noqa: ANN201 - a psycopg connection
    """A fresh autocommit admin connection: a failure in CI (which starts the server), a skip elsewhere."""
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
