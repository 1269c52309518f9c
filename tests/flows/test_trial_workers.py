"""The `mnist` flow with trial_runner=deployment needs the trial-worker deployment; local workers never touch it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnist_flow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
from flows import mnist as flow_module
from flows import trials as trials_module


def test_deployment_workers_without_a_worker_deployment_are_refused_before_any_work(home: Path) -> None:
    with pytest.raises(ConfigError, match="mnist-trials/worker") as info:
        flow_module.mnist(source="sample", n_trials=2, max_epochs=1, final_epochs=1, workers=2,
                          trial_runner="deployment")
    assert "make deploy" in info.value.fix and "workers=1" in info.value.fix
    assert not (home / "mnist-flow.db").exists()


def test_the_trial_worker_flow_takes_the_parents_params_run_key_and_study() -> None:
    import inspect

    assert trials_module.mnist_trials.name == "mnist-trials"
    assert list(inspect.signature(trials_module.mnist_trials.fn).parameters) == [
        "params", "run_key", "study_name", "worker_index"]
    assert trials_module.WORKER_DEPLOYMENT == "mnist-trials/worker"


def test_the_worker_deployment_shares_the_train_deployments_pool() -> None:
    import yaml

    document = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in document["deployments"]}
    assert by_name["worker"]["entrypoint"] == "flows/trials.py:mnist_trials"
    assert by_name["worker"]["work_pool"] == by_name["train"]["work_pool"]
    assert by_name["worker"]["work_pool"]["name"] == "mnist"
    assert "concurrency_limit" not in by_name["worker"]  # the trial workers of one run run at the same time
