"""Scale out for real: a Prefect server on PostgreSQL, `make deploy`, two workers on the pool `mnist`.

`prefect deployment run mnist/train --param workers=2 --param trial_runner=deployment ...` starts two runs
of `mnist-trials/worker`;
the two Prefect workers run them as separate processes on one PostgreSQL study. Exactly n_trials
finish, none fails, at least two processes ran trials, and the model is registered. The services are
started with the commands of tests/e2e/commands.py, the ones docker/compose.yaml runs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import commands
import httpx
import optuna
import procs
import pytest
from optuna.trial import TrialState

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_TRIALS = 8
RUN = ["deployment", "run", "mnist/train", "--param", "workers=2", "--param", "trial_runner=deployment",
       "--param", f"n_trials={N_TRIALS}",
       "--param", "source=sample", "--param", "max_epochs=2", "--param", "final_epochs=1", "--watch"]


def _bin(command: list[str]) -> list[str]:
    """Run the venv's program (make is the system's)."""
    program = procs.BIN / command[0]
    return [str(program) if program.exists() else command[0], *command[1:]]


def _flow_runs(api_url: str, deployment: str) -> list[dict]:
    """The flow runs of the deployment ``flow/name``."""
    found = httpx.get(f"{api_url}/deployments/name/{deployment}", timeout=10)
    found.raise_for_status()
    body = {"flow_runs": {"deployment_id": {"any_": [found.json()["id"]]}}}
    response = httpx.post(f"{api_url}/flow_runs/filter", json=body, timeout=10)
    response.raise_for_status()
    return response.json()


def test_a_train_run_with_two_workers_finishes_exactly_n_trials_on_postgresql(tmp_path: Path, e2e_token: str,
                                                                           pg_database) -> None:
    prefect_db = pg_database("scale_prefect").replace("postgresql://", "postgresql+asyncpg://")
    study_db = pg_database("scale_study").replace("postgresql://", "postgresql+psycopg://")
    env = procs.base_env(tmp_path, e2e_token, MNIST_FLOW_DATABASE_URL=study_db,
                         PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5")
    port = procs.free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    logs = tmp_path / "logs"
    server = procs.start("prefect-server", _bin(commands.prefect_server("127.0.0.1", port)),
                         env={**env, "PREFECT_API_DATABASE_CONNECTION_URL": prefect_db}, log_dir=logs)
    started = [server]
    with procs.stopped_at_exit(started):
        procs.wait_http(f"{api_url}/health", proc=server, timeout=120)
        env["PREFECT_API_URL"] = api_url
        procs.run(commands.DEPLOY, env=env, timeout=180)
        started += [procs.start(f"worker-{i}", commands.WORKER, env=env, log_dir=logs) for i in (1, 2)]

        out = procs.run(_bin(["prefect", *RUN]), env=env, timeout=300).stdout
        assert "Completed" in out, out[-4000:]

        parent_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)  # (the nightly schedule adds runs too)
        (parent,) = [r for r in _flow_runs(api_url, "mnist/train") if r["id"] == parent_id]
        assert parent["state"]["type"] == "COMPLETED"
        children = _flow_runs(api_url, "mnist-trials/worker")
        assert len(children) == 2 and all(c["state"]["type"] == "COMPLETED" for c in children)
        storage = optuna.storages.RDBStorage(study_db)
        (summary,) = optuna.get_all_study_summaries(storage)
        trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
        states = Counter(t.state for t in trials)
        mine = [t for t in trials if t.user_attrs.get("run_key") == parent["id"]]
        assert len(mine) == N_TRIALS and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in mine)
        assert states[TrialState.FAIL] == 0 and len(trials) == N_TRIALS, states
        assert len({t.user_attrs["worker"] for t in mine}) >= 2
        assert {t.user_attrs["flow_run_id"] for t in mine} <= {c["id"] for c in children}

        listed = json.loads(procs.run(_bin(["mnist-flow", "registry", "list", "--json"]), env=env,
                                      timeout=60).stdout)
        assert [v["version"] for v in listed] == [1] and "champion" in listed[0]["aliases"]

        dashboard_port = procs.free_port()
        dashboard = procs.start("dashboard", _bin(commands.dashboard("127.0.0.1", dashboard_port)), env=env,
                                log_dir=logs)
        started.append(dashboard)
        studies_url = f"http://127.0.0.1:{dashboard_port}/api/studies"
        procs.wait_http(studies_url, proc=dashboard, timeout=60)
        assert summary.study_name in httpx.get(studies_url, timeout=10).text
    assert not procs.leftovers(e2e_token), "a process outlived the server and workers"
