"""The `mnist` flow attaches its review artifacts to the flow run: summary, trials table, dashboard link."""

from __future__ import annotations

import json
import re
from pathlib import Path
from uuid import UUID

import optuna
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from mnist_flow.registry.store import Registry
from mnist_flow.review.dashboard import read_note
from mnist_flow.settings import load_settings
from mnist_flow.storage.db import optuna_storage

ROOT = Path(__file__).resolve().parents[2]
from flows import mnist as flow_module

TINY = dict(source="sample", n_trials=2, max_epochs=2, final_epochs=2, seed=0, hidden1_min=64, hidden1_max=128,
            hidden2_min=64, hidden2_max=64)


@pytest.mark.filterwarnings("ignore:Fixed parameter:UserWarning")  # the seed trial is outside the tiny space
def test_the_flow_run_carries_the_summary_the_trials_table_and_the_dashboard_link(prefect_api, home, monkeypatch):
    monkeypatch.setenv("MNIST_FLOW_DASHBOARD_URL", "http://review:s3cret@127.0.0.1:8080/")

    summary = flow_module.mnist(**TINY)

    # the registry's lineage names the flow run (CheckedFlow.__call__ does not take return_state)
    registry = Registry.from_settings(load_settings())
    run_id = UUID(registry.get("mnist", summary.model.version).flow_run_id)
    registry.dispose()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run_id])))
    by_key = {a.key: a for a in artifacts}
    assert {"mnist-summary", "mnist-trials", "optuna-dashboard"} <= set(by_key)

    markdown = by_key["mnist-summary"].data
    assert by_key["mnist-summary"].type == "markdown"
    for expected in (f"#{summary.best.trial}", "`lr` =", "`momentum` =",
                     f"{summary.metrics.test_accuracy:.4f}", f"{summary.metrics.val_accuracy:.4f}",
                     "## Champion comparison", "| tune |", summary.data.fingerprint):
        assert expected in markdown, expected

    table = by_key["mnist-trials"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and len(rows) == summary.trials.in_study >= 2
    assert {"number", "state", "value", "params_lr", "params_momentum", "duration_s", "worker"} <= set(rows[0])

    link = str(by_key["optuna-dashboard"].data)
    page = r"\(http://127\.0\.0\.1:8080/dashboard/studies/\d+\)"
    assert re.search(rf"\[study {summary.study} in optuna-dashboard\]{page}", link), link
    assert "s3cret" not in link and "review" not in link

    # the trial the model came from names the registered version in its dashboard note
    storage = optuna_storage(load_settings().resolved_database_url)
    study = optuna.load_study(study_name=summary.study, storage=storage)
    trial = next(t for t in study.trials if t.number == summary.best.trial)
    assert f"Registered model: **mnist v{summary.model.version}**" in read_note(study, trial)


def test_the_dashboard_link_drops_credentials_and_points_at_the_study():
    from flows.reporting import dashboard_link

    class Study:
        _study_id = 7

    assert dashboard_link(" https://u:pw@dash.example:8443/optuna/ ", Study()) == \
        "https://dash.example:8443/optuna/dashboard/studies/7"
    assert dashboard_link("http://127.0.0.1:8080", object()) == "http://127.0.0.1:8080/dashboard"
