"""Helpers of the unattended-service tests: one Prefect server + `make deploy`, the REST API, flow-run processes.

The tests talk to the server over its REST API with httpx (each `prefect` CLI start costs seconds on a busy
machine) and find a flow run's process by the ``PREFECT__FLOW_RUN_ID`` the process worker gives it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import procs

#: Flow-run heartbeats every 30 s (Prefect's minimum) and a run silent for 40 s is a zombie.
HEARTBEAT_S = 30
ZOMBIE_S = 40
#: What the worker, the server's scheduler and its late-run service need to react within seconds.
FAST = {
    "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S), "ZOMBIE_SECONDS": str(ZOMBIE_S),
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS": "5",
    # trials: heartbeats every second, a dead trial is failed after 4 s; a stuck one after 5x its epochs (>= 6 s)
    "MNIST_FLOW_HEARTBEAT_INTERVAL": "1", "MNIST_FLOW_HEARTBEAT_GRACE": "4",
    "MNIST_FLOW_HANG_MULTIPLE": "5", "MNIST_FLOW_HANG_MIN_SECONDS": "6",
    "MNIST_FLOW_THREADS": "1",
}
#: tests/e2e/inject/sitecustomize.py, put on a process's PYTHONPATH by :func:`injected`.
INJECT = Path(__file__).parent / "inject"
TINY = {"source": "sample", "n_trials": 3, "max_epochs": 2, "final_epochs": 1}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


@dataclass
class Service:
    """A Prefect server with the project deployed (`make deploy`) and the environment of its workers."""

    tmp: Path
    token: str
    api_url: str
    env: dict[str, str]
    server: procs.Proc
    workers: list[procs.Proc] = field(default_factory=list)

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.api_url}{path}", timeout=20)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict | None = None) -> Any:
        response = httpx.post(f"{self.api_url}{path}", json=body or {}, timeout=20)
        response.raise_for_status()
        return response.json() if response.content else None

    def deployment(self, name: str) -> dict:
        return self.get(f"/deployments/name/{name}")

    def run(self, name: str, parameters: dict) -> str:
        """Create a flow run of the deployment ``flow/name``; returns its id."""
        deployment = self.deployment(name)
        return self.post(f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters})["id"]

    def flow_run(self, run_id: str) -> dict:
        return self.get(f"/flow_runs/{run_id}")

    def state_history(self, run_id: str) -> list[dict]:
        return sorted(self.get(f"/flow_run_states/?flow_run_id={run_id}"), key=lambda s: s["timestamp"])

    def runs_of(self, name: str) -> list[dict]:
        body = {"flow_runs": {"deployment_id": {"any_": [self.deployment(name)["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}
        return self.post("/flow_runs/filter", body)

    def wait(self, run_id: str, until: Callable[[dict], bool], *, timeout: float, what: str) -> dict:
        """Poll the flow run until ``until(run)``; fail with its state history (and the logs) if it does not."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(run_id)
            if until(run):
                return run
            if time.monotonic() > deadline:
                history = [(s["type"], s["name"], s.get("message")) for s in self.state_history(run_id)]
                raise AssertionError(f"flow run {run_id} not {what} within {timeout:.0f} s; states {history}\n"
                                     + self.logs())
            time.sleep(0.5)

    def start_worker(self, name: str = "worker", **extra: str) -> procs.Proc:
        worker = procs.start(name, ["make", "-o", "install", "worker"], env={**self.env, **extra},
                             log_dir=self.tmp / "logs")
        self.workers.append(worker)
        return worker

    def cancel_unfinished(self) -> list[str]:
        """Force every run that is not final to Cancelled (which frees the deployment's concurrency slot), so
        that a test that failed mid-run does not get the next test's runs cancelled by CANCEL_NEW."""
        runs = self.post("/flow_runs/filter", {"flow_runs": {"state": {"type": {"not_any_": sorted(FINAL)}}}})
        runs = [run for run in runs if not run.get("auto_scheduled")]  # the nightly schedule's own runs stay
        for run in runs:
            self.post(f"/flow_runs/{run['id']}/set_state",
                      {"state": {"type": "CANCELLED", "message": "cancelled by the test teardown"}, "force": True})
        return [run["id"] for run in runs]

    def logs(self) -> str:
        parts = [f"--- {w.name} log ---\n{procs.tail(w.log, 5000)}" for w in self.workers]
        return "\n".join([*parts, f"--- server log ---\n{procs.tail(self.server.log, 3000)}"])


def injected(env: dict[str, str], **faults: str) -> dict[str, str]:
    """The variables that give a started process the test-only faults of tests/e2e/inject/sitecustomize.py
    (``E2E_HANG_ONCE``, ``E2E_EPOCH_SECONDS``)."""
    return {"PYTHONPATH": f"{INJECT}:{env.get('PYTHONPATH', '')}", **faults}


def state_type(run: dict) -> str:
    return (run.get("state") or {}).get("type", "")


@contextlib.contextmanager
def service(tmp: Path, token: str, **extra: str) -> Iterator[Service]:
    """A Prefect server on SQLite with `make deploy` done; every worker and the server stopped afterwards."""
    env = procs.base_env(tmp, token, **{**FAST, **extra})
    with procs.prefect_server(tmp, env) as server:
        procs.run(["make", "-o", "install", "deploy"], env=server.env, timeout=240)
        svc = Service(tmp, token, server.api_url, server.env, server.proc)
        try:
            yield svc
        finally:
            for worker in svc.workers:
                worker.stop()


def flow_run_pids(token: str, run_id: str | None = None) -> list[int]:
    """Pids of the live processes (of this test) running the flow run ``run_id`` (any flow run: None)."""
    prefix = f"PREFECT__FLOW_RUN_ID={run_id or ''}".encode()
    found = []
    for pid in procs.leftovers(token):
        with contextlib.suppress(OSError):
            variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if any(v == prefix if run_id else v.startswith(prefix) for v in variables):
                found.append(pid)
    return found


def wait_for_flow_run_processes(token: str, timeout: float = 60.0) -> list[int]:
    """Wait until no flow-run process of this test is left (a finished run's process exits by itself,
    seconds after its final state); returns those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := flow_run_pids(token)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@dataclass(frozen=True)
class Trial:
    """A trial as stored (read with plain SQL: opening an Optuna storage could race the flow creating it)."""

    number: int
    state: str
    params: dict[str, float]
    user_attrs: dict[str, Any]


def study_trials(env: dict, run_key: str | None = None) -> list[Trial]:
    """Every trial in the service's study database (optionally only those of one run)."""
    import json

    import sqlalchemy as sa

    url = env.get("MNIST_FLOW_DATABASE_URL") or f"sqlite:///{Path(env['MNIST_FLOW_HOME']) / 'mnist-flow.db'}"
    if url.startswith("sqlite") and not Path(url.removeprefix("sqlite:///")).exists():
        return []
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            tables = sa.inspect(connection).get_table_names()
            if not {"trials", "trial_params", "trial_user_attributes"} <= set(tables):
                return []
            rows = connection.execute(sa.text("SELECT trial_id, number, state FROM trials")).all()
            params = connection.execute(sa.text("SELECT trial_id, param_name, param_value FROM trial_params")).all()
            attrs = connection.execute(sa.text("SELECT trial_id, key, value_json FROM trial_user_attributes")).all()
    finally:
        engine.dispose()
    by_params: dict[int, dict] = {}
    for trial_id, name, value in params:
        by_params.setdefault(trial_id, {})[name] = value
    by_attrs: dict[int, dict] = {}
    for trial_id, key, value in attrs:
        by_attrs.setdefault(trial_id, {})[key] = json.loads(value)
    trials = [Trial(number, state, by_params.get(trial_id, {}), by_attrs.get(trial_id, {}))
              for trial_id, number, state in rows]
    return [t for t in trials if run_key is None or t.user_attrs.get("run_key") == run_key]


def registered(env: dict) -> list:
    """The registry's versions (read in-process)."""
    from mnist_flow.registry.store import Registry
    from mnist_flow.settings import Settings

    settings = Settings(home=Path(env["MNIST_FLOW_HOME"]), database_url=env.get("MNIST_FLOW_DATABASE_URL"))
    if settings.database_url is None and not (Path(env["MNIST_FLOW_HOME"]) / "mnist-flow.db").exists():
        return []
    with Registry.from_settings(settings) as registry:
        return registry.list_versions()
