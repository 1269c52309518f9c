"""mnist-flow as a service, with real processes on loopback: server, `make deploy`, a worker, deployment runs.

One scenario, run with the Prefect server on SQLite and on PostgreSQL: two runs of `mnist/train`
complete, the first registers the champion, the second records a promotion decision (also shown as
a Prefect artifact), and the deployment carries the nightly cron with its timezone. Every process the
test started is stopped (checked by an environment token, see procs.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import procs
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUN = ["deployment", "run", "mnist/train", "--param", "source=sample", "--param", "n_trials=2", "--param",
       "max_epochs=1", "--param", "final_epochs=1", "--watch"]


def _prefect(*args: str, env: dict, timeout: float = 120) -> str:
    return procs.run([str(procs.BIN / "prefect"), *args], env=env, timeout=timeout).stdout


def _registry(*args: str, env: dict) -> list:
    out = procs.run([str(procs.BIN / "mnist-flow"), "registry", *args, "--json"], env=env, timeout=60).stdout
    return json.loads(out)


def _champions(env: dict) -> list[int]:
    """Champion versions, read in-process (a third `mnist-flow` start costs seconds on a busy machine)."""
    from mnist_flow.registry.store import Registry
    from mnist_flow.settings import Settings

    settings = Settings(home=Path(env["MNIST_FLOW_HOME"]), database_url=env.get("MNIST_FLOW_DATABASE_URL"))
    registry = Registry.from_settings(settings)
    try:
        return [v.version for v in registry.list_versions() if "champion" in v.aliases]
    finally:
        registry.dispose()


def _run_deployment(env: dict) -> None:
    out = _prefect(*RUN, env=env, timeout=240)
    assert "Completed" in out, out[-4000:]


def _decision_artifacts(api_url: str) -> list[dict]:
    body = {"artifacts": {"key": {"any_": ["promotion-decision"]}}}
    response = httpx.post(f"{api_url}/artifacts/filter", json=body, timeout=10)
    response.raise_for_status()
    return response.json()


def _service_scenario(tmp: Path, token: str, *, prefect_db: str | None, registry_db: str | None) -> None:
    extra = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    if registry_db:
        extra["MNIST_FLOW_DATABASE_URL"] = registry_db
    env = procs.base_env(tmp, token, **extra)
    start = time.monotonic()

    def mark(what: str) -> None:  # phase timings, shown with -rP or on failure
        print(f"{time.monotonic() - start:6.1f}s {what}")

    with procs.prefect_server(tmp, env, database_url=prefect_db) as server:
        mark("server healthy")
        procs.run(["make", "-o", "install", "deploy"], env=server.env, timeout=180)
        mark("make deploy")
        worker = procs.start("worker", ["make", "-o", "install", "worker"], env=server.env, log_dir=tmp / "logs")
        try:
            _run_deployment(server.env)
            mark("first run completed")
            versions = _registry("list", env=server.env)
            assert [v["version"] for v in versions] == [1]
            assert "champion" in versions[0]["aliases"]

            _run_deployment(server.env)
            mark("second run completed")
            history = _registry("history", env=server.env)
            assert len(history) == 2, history
            assert history[0]["outcome"] == "first"
            assert history[1]["challenger_version"] == 2 and history[1]["champion_version"] == 1
            assert history[1]["outcome"] in ("promoted", "kept") and history[1]["reason"]
            assert _champions(server.env) == [1 if history[1]["outcome"] == "kept" else 2]
            artifacts = _decision_artifacts(server.api_url)
            assert len(artifacts) == 2 and all(a["type"] == "markdown" for a in artifacts)
            assert any(f"Outcome: {history[1]['outcome']}" in a["data"] for a in artifacts)

            # (REST, not `prefect deployment inspect --output json`: Prefect 3.9.1 cannot serialise the
            # deployment's trigger there, "Type is not JSON serializable: set")
            deployment = httpx.get(f"{server.api_url}/deployments/name/mnist/train", timeout=10).json()
            (schedule,) = deployment["schedules"]
            assert schedule["schedule"]["cron"] == "0 2 * * *"
            assert schedule["schedule"]["timezone"] == "UTC"
            assert schedule["slug"] and schedule["parameters"]["source"] == "download"
            assert deployment["enforce_parameter_schema"] is True
            assert deployment["global_concurrency_limit"]["limit"] == 1
            assert deployment["work_pool_name"] == "mnist"
            assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
            step = deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
            assert Path(step["directory"]) == procs.REPO
            mark("deployment inspected")
        except BaseException:
            print("--- worker log ---\n" + procs.tail(worker.log, 8000))
            print("--- server log ---\n" + procs.tail(server.proc.log, 4000))
            raise
        finally:
            worker.stop()
    assert not procs.leftovers(token), "a process outlived the server and worker"


def test_deployment_runs_register_and_decide_on_sqlite_server(tmp_path: Path, e2e_token: str) -> None:
    _service_scenario(tmp_path, e2e_token, prefect_db=None, registry_db=None)


def test_deployment_runs_register_and_decide_on_postgres_server(tmp_path: Path, e2e_token: str,
                                                                pg_database) -> None:
    prefect_db = pg_database("prefect").replace("postgresql://", "postgresql+asyncpg://")
    registry_db = pg_database("registry").replace("postgresql://", "postgresql+psycopg://")
    _service_scenario(tmp_path, e2e_token, prefect_db=prefect_db, registry_db=registry_db)
