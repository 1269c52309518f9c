"""deployments/prefect.yaml, flows/serve.py and the decision artifact, checked without a server."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"


def _load(name: str, path: Path):
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


@pytest.fixture(scope="module")
def document() -> dict:
    return yaml.safe_load(PREFECT_FILE.read_text())


@pytest.fixture(scope="module")
def train(document: dict) -> dict:
    (deployment,) = [d for d in document["deployments"] if d["name"] == "train"]
    return deployment


def test_prefect_yaml_is_valid_for_prefect_deploy(document: dict) -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(document)
    assert [d.name for d in model.deployments][:1] == ["train"]


def test_train_deployment_runs_the_mnist_flow_on_the_process_pool(train: dict, document: dict) -> None:
    path, function = train["entrypoint"].split(":")
    assert (REPO / path).is_file() and f"def {function}(" in (REPO / path).read_text()
    assert train["work_pool"]["name"] == "mnist"
    assert document["definitions"]["work_pools"]["mnist"] is train["work_pool"]  # the shared anchor
    assert train["enforce_parameter_schema"] is True
    assert train["concurrency_limit"]["limit"] == 1


def test_nightly_schedule_is_a_utc_cron_with_a_slug_and_strict_download(train: dict) -> None:
    from mnist_flow.params import RunParams

    (schedule,) = train["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] == "UTC" and schedule["slug"]
    assert schedule["parameters"]["source"] == "download"
    RunParams(**{**train["parameters"], **schedule["parameters"]})  # valid flow parameters


def test_pull_step_sets_the_checkout_as_working_directory_at_deploy_time(document: dict) -> None:
    (step,) = document["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}


def test_prefect_yaml_holds_no_secret() -> None:
    text = PREFECT_FILE.read_text()
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", text), "a URL with a password"
    assert not re.search(r"(?i)(password|secret|token|api_key)\s*:", text)


def test_serve_builds_the_same_deployments_and_keeps_schedules_on_shutdown(monkeypatch) -> None:
    serve_module = _load("mnist_flow_serve_under_test", REPO / "flows" / "serve.py")
    calls = []
    monkeypatch.setattr(serve_module, "serve", lambda *deployments, **kwargs: calls.append((deployments, kwargs)))
    assert serve_module.main() == 0
    ((deployments, kwargs),) = calls
    assert kwargs == {"pause_on_shutdown": False}
    (train,) = [d for d in deployments if d.name == "train"]
    assert train.flow_name == "mnist" and train.work_pool_name is None
    (schedule,) = train.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert schedule.parameters["source"] == "download" and schedule.slug
    assert train.concurrency_limit == 1 and train.enforce_parameter_schema is True


def test_decision_artifact_explains_the_outcome_and_masks_the_database_password() -> None:
    from mnist_flow.registry.promotion import Decision

    reporting = _load("mnist_flow_reporting_under_test", REPO / "flows" / "reporting.py")
    decision = Decision("kept", "accuracy gain +0.0010 is above the margin but not significant", 0.981, 0.980,
                        0.42, 12, 10, 0.0, 0.05)
    version = SimpleNamespace(name="mnist", version=2, aliases=(), dataset_name="mnist",
                              dataset_fingerprint="ab" * 32)
    text = reporting.decision_markdown(decision, version, "postgresql+psycopg://bob:hunter2@db:5432/mnist")
    assert "Outcome: kept" in text and "not significant" in text and "0.42" in text
    assert "hunter2" not in text and "v2" in text
    assert "already the champion" in reporting.decision_markdown(None, version, "sqlite:///x.db")


def test_one_training_at_a_time_and_no_backlog(train: dict) -> None:
    assert train["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}


def test_no_schedule_forces_active_so_a_redeploy_keeps_an_operators_pause(document: dict) -> None:
    for deployment in document["deployments"]:
        for schedule in deployment.get("schedules") or []:
            assert "active" not in schedule and schedule["slug"], (deployment["name"], schedule)


def test_changed_data_trigger_a_training_with_the_events_data_and_budgets(train: dict, document: dict) -> None:
    from prefect.events import DeploymentEventTrigger

    (spec,) = train["triggers"]
    trigger = DeploymentEventTrigger(**spec)
    assert trigger.expect == {"mnist-flow.data.changed"} and trigger.enabled
    assert set(trigger.parameters) == {"dataset", "source", "data_dir", "n_trials", "max_epochs", "final_epochs"}
    assert all(value == f"{{{{ event.payload.{key} }}}}" for key, value in trigger.parameters.items())
    (check,) = [d for d in document["deployments"] if d["name"] == "check"]
    path, function = check["entrypoint"].split(":")
    assert f"def {function}(" in (REPO / path).read_text()
    (schedule,) = check["schedules"]
    assert 0 < schedule["interval"] <= 3600


def test_the_training_flow_retries_once_when_run_by_a_deployment() -> None:
    flow_module = _load("mnist_flow_train_under_test", REPO / "flows" / "mnist.py")
    assert flow_module.mnist.retries == 1 and flow_module.mnist.retry_delay_seconds > 0


def test_the_automations_detect_zombies_of_our_deployments_and_retry_a_first_crash_once() -> None:
    automations = _load("mnist_flow_automations_under_test", REPO / "flows" / "automations.py")
    zombie = automations.zombie_automation(["d1", "d2"], 90)
    assert zombie.trigger.posture == "Proactive" and zombie.trigger.within.total_seconds() == 90
    assert zombie.trigger.after == {"prefect.flow-run.heartbeat"}
    assert "prefect.flow-run.heartbeat" in zombie.trigger.expect and "prefect.flow-run.Completed" in zombie.trigger.expect
    assert zombie.trigger.match_related.get("prefect.resource.id") == ["prefect.deployment.d1", "prefect.deployment.d2"]
    assert zombie.actions[0].state == "CRASHED"
    retry = automations.retry_automation("d1")
    assert retry.trigger.expect == {"prefect.flow-run.Crashed"}
    assert retry.trigger.match.get("prefect.run-count") == ["0", "1"]  # a second crash is not retried
    assert (retry.actions[0].state, retry.actions[0].name) == ("SCHEDULED", "AwaitingRetry")
    with pytest.raises(SystemExit):
        automations.main(["--zombie-seconds", "30"])  # not above Prefect's shortest heartbeat
