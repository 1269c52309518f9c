"""Fixtures shared by every test layer: an isolated home and the bundled MNIST sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from testlib import PG_ADMIN_URL, pg_admin

# Nothing a test runs may call home or touch the developer's own state.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MNIST_FLOW_HOME", "/nonexistent/set-the-home-fixture")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MNIST_FLOW_HOME (database, artifacts, data cache) for one test."""
    path = tmp_path / "home"
    monkeypatch.setenv("MNIST_FLOW_HOME", str(path))
    for key in ("MNIST_FLOW_DATABASE_URL", "MNIST_FLOW_ARTIFACTS_URL", "MNIST_FLOW_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    return path


@pytest.fixture(scope="session")
def sample_bundle():
    """The 5,000 real MNIST digits shipped with the package."""
    from mnist_flow.data.datasets import load_dataset

    return load_dataset("mnist", "sample", cache_dir=Path("/nonexistent"))


@pytest.fixture(scope="session")
def sample_prepared(sample_bundle):
    """The sample, split (10% validation) and normalised on the CPU."""
    from mnist_flow.pipeline import prepare

    return prepare(sample_bundle, val_fraction=0.1, seed=0, device="cpu")


@pytest.fixture
def pg_database():
    """A factory of fresh databases, ``create(purpose) -> driver-less URL``; all dropped afterwards.

    Each drop uses a new connection and retries, so a test that restarted the server still cleans up.
    """
    import time
    import uuid

    created: list[str] = []

    def create(purpose: str) -> str:
        name = f"mnist_flow_{purpose}_{uuid.uuid4().hex[:10]}"
        with pg_admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name

    yield create
    for name in created:
        for _ in range(20):
            try:
                with pg_admin() as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except Exception:
                time.sleep(0.5)


@pytest.fixture
def pg_url(pg_database) -> str:
    """One fresh PostgreSQL database as an SQLAlchemy (psycopg 3) URL."""
    return pg_database("test").replace("postgresql://", "postgresql+psycopg://")
