"""Fixtures shared by every test layer: an isolated home and the bundled MNIST sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing a test runs may call home or touch the developer's own state.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MNIST_FLOW_HOME", "/nonexistent/set-the-home-fixture")

IN_CI = bool(os.environ.get("CI"))
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


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
    from mnist_flow.data import load_dataset

    return load_dataset("mnist", "sample", cache_dir=Path("/nonexistent"))


@pytest.fixture(scope="session")
def sample_prepared(sample_bundle):
    """The sample, split (10% validation) and normalised on the CPU."""
    from mnist_flow.pipeline import prepare

    return prepare(sample_bundle, val_fraction=0.1, seed=0, device="cpu")


def require_fashion_mnist() -> Path:
    """The Debian package's Fashion-MNIST: a failure in CI (which installs it), a skip elsewhere."""
    if not FASHION_DIR.is_dir():
        message = "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return FASHION_DIR
