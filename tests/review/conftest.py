"""Fixtures for the review tests: one small study with a registered champion, built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from mnist_flow import pipeline
from mnist_flow.params import RunParams
from mnist_flow.registry.store import Registry
from mnist_flow.search.study import study_name_for
from mnist_flow.storage.db import optuna_storage

# Tiny budgets on the bundled sample: narrow hidden sizes keep every fit to a few seconds on two cores.
TINY = dict(source="sample", n_trials=4, max_epochs=3, final_epochs=4, seed=0, hidden1_min=64, hidden1_max=128,
            hidden2_min=64, hidden2_max=64)


@dataclass(frozen=True)
class World:
    """A home with a study of 4 trials (complete and pruned) and a champion trained from its best trial."""

    home: Path
    database_url: str
    artifacts_url: str
    study: optuna.Study
    version: Any
    test_accuracy: float
    prepared: pipeline.Prepared

    def registry(self) -> Registry:
        return Registry(self.database_url, self.artifacts_url)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared two-core machine two threads run an epoch 10x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, sample_prepared: pipeline.Prepared) -> World:
    home = tmp_path_factory.mktemp("review") / "home"
    url, artifacts = f"sqlite:///{home / 'mnist-flow.db'}", str(home / "artifacts")
    params = RunParams.parse(**TINY)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # First trials of our own in place of the seed tutorial's 512-256 network (the study is new, so
    # open_study would enqueue that one): the same search, a quarter of the compute. The weaker one
    # goes first, so that successive halving (rung at epoch 2) lets both complete; the sampler's
    # trials that follow are then pruned unless they beat them, so the study has both states.
    name = study_name_for(sample_prepared.bundle.name, sample_prepared.bundle.fingerprint)
    seeded = optuna.create_study(storage=optuna_storage(url), study_name=name, direction="maximize")
    seeded.enqueue_trial({"lr": 0.1, "momentum": 0.8, "hidden1": 64, "hidden2": 64})
    seeded.enqueue_trial({"lr": 0.05, "momentum": 0.9, "hidden1": 128, "hidden2": 64})
    tuned = pipeline.tune(sample_prepared, params, url, run_key="review-tests")
    study, best = tuned.study, tuned.best
    config = pipeline.final_config(best, params)
    model, history = pipeline.fit_best(sample_prepared, config)
    test = pipeline.evaluate_test(model, sample_prepared)
    registry = Registry(url, artifacts)
    registry.migrate()
    version, _ = pipeline.register_and_decide(
        registry,
        pipeline.Candidate(sample_prepared, model, config, history, test, study_name=study.study_name,
                           trial_number=best.number, run_key="review-tests", flow_run_id=None),
        margin=0.0, alpha=0.05)
    registry.dispose()
    return World(home, url, artifacts, study, version, test.accuracy, sample_prepared)


@pytest.fixture
def world_env(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    """The world's home as MNIST_FLOW_HOME, for the CLI."""
    monkeypatch.setenv("MNIST_FLOW_HOME", str(world.home))
    for key in ("MNIST_FLOW_DATABASE_URL", "MNIST_FLOW_ARTIFACTS_URL", "MNIST_FLOW_DATA_DIR",
                "MNIST_FLOW_MAX_IMAGE_PIXELS", "MNIST_FLOW_DASHBOARD_URL"):
        monkeypatch.delenv(key, raising=False)
    return world


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect API (started only by the tests that ask for it)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
