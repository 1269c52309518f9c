"""Several hosts for real: two trial workers in their own network namespaces, on PostgreSQL, one link cut.

Each trial worker (`make worker`, one flow run at a time) runs in a namespace of its own, joined to this
machine by a veth pair (tests/e2e/netns.py); it reaches the Prefect server and a private PostgreSQL (the
study database) only over TCP, by their address on the first link. A `mnist` run with workers=2 (trial_runner=deployment) starts two
runs of `mnist-trials/worker`, one per namespace. Mid-trial the first namespace's link is pulled: its
trial stops beating and is failed after the heartbeat grace and retried by the other worker; its flow run
stops beating and is marked Crashed by the zombie automation, so the parent stops waiting for it. The study
still finishes exactly n_trials for the run, and the model is registered once.
"""

from __future__ import annotations

import os
import time

import netns
import procs
import pytest
from service_helpers import FAST, Service, flow_run_pids, injected, registered, state_type, study_trials

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))]

N_TRIALS = 6


def _net_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_two_trial_workers_on_two_hosts_finish_exactly_n_trials_with_one_link_cut(tmp_path, e2e_token) -> None:
    logs = tmp_path / "logs"
    with netns.hosts(2) as (a, b), netns.private_postgres(a.host_addr, e2e_token, logs) as pg:
        study_db = pg.replace("postgresql://", "postgresql+psycopg://")
        env = procs.base_env(tmp_path, e2e_token, **FAST, MNIST_FLOW_DATABASE_URL=study_db)
        port = procs.free_port()
        api_url = f"http://{a.host_addr}:{port}/api"
        server = procs.start("prefect-server", [str(procs.BIN / "prefect"), "server", "start", "--host",
                                                a.host_addr, "--port", str(port), "--analytics-off"],
                             env=env, log_dir=logs)
        started = [server]
        try:
            with procs.stopped_at_exit(started, log_chars=5000, timeout=5):
                procs.wait_http(f"{api_url}/health", proc=server, timeout=120)
                env["PREFECT_API_URL"] = api_url
                procs.run(["make", "-o", "install", "deploy"], env=env, timeout=240)
                svc = Service(tmp_path, e2e_token, api_url, env, server)
                # epochs of 1.5 s: a trial worker that starts seconds after the other (seen: 7 s on a busy
                # machine) must still find trials to run, and the test must catch one mid-trial
                slow = injected(env, E2E_EPOCH_SECONDS="1.5")
                for host in (a, b):
                    worker = procs.start(f"worker-{host.ns}", host.command(["make", "-o", "install", "worker"]),
                                         env={**env, **slow, "WORKER_ARGS": "--limit 1"}, log_dir=logs)
                    started.append(worker)
                    svc.workers.append(worker)
                # the parent runs here, outside the namespaces; only the trial workers run inside
                parent = procs.start("parent", [str(procs.BIN / "python"), "flows/mnist.py", "--workers", "2", "--trial-runner", "deployment",
                                                "--n-trials", str(N_TRIALS), "--source", "sample", "--max-epochs", "4",
                                                "--final-epochs", "1"], env=env, log_dir=logs)
                started.append(parent)

                children = _wait_for_children(svc, 2, timeout=240)
                where = {}
                deadline = time.monotonic() + 180
                while len(where) < 2:  # which namespace runs which trial worker
                    for child in children:
                        for pid in flow_run_pids(e2e_token, child):
                            where[_net_inode(pid)] = child
                    assert time.monotonic() < deadline, f"trial workers not running in both namespaces\n{svc.logs()}"
                    time.sleep(0.5)
                by_ns = {a.net_inode(): a, b.net_inode(): b}
                run_key = svc.flow_run(children[0])["parameters"]["run_key"]
                deadline = time.monotonic() + 180
                while True:  # pull the cable of a host while it runs a trial
                    running = [t.user_attrs.get("flow_run_id") for t in study_trials(env, run_key) if t.state == "RUNNING"]
                    victims = [inode for inode, child in where.items() if child in running]
                    if victims:
                        break
                    assert time.monotonic() < deadline, f"no trial ran in a namespace\n{svc.logs()}"
                    time.sleep(0.2)
                cut_host = by_ns[victims[0]]
                child_a = where[victims[0]]
                (child_b,) = [child for child in where.values() if child != child_a]
                cut_host.cut()
                cut = time.monotonic()
                deadline = time.monotonic() + 300
                while parent.alive():
                    assert time.monotonic() < deadline, f"the run did not finish\n{procs.tail(parent.log)}\n{svc.logs()}"
                    time.sleep(1)
                out = procs.tail(parent.log, 20000)
                assert parent.popen.returncode == 0, out
                print(f"link cut -> run finished in {time.monotonic() - cut:.0f} s")

                trials = study_trials(env, run_key)
                finished = [t for t in trials if t.state in ("COMPLETE", "PRUNED")]
                assert len(finished) == N_TRIALS, [(t.number, t.state) for t in trials]
                assert any(t.state == "FAIL" and t.user_attrs.get("flow_run_id") == child_a for t in trials)
                assert {t.user_attrs.get("flow_run_id") for t in finished} >= {child_b}
                assert state_type(svc.flow_run(child_b)) == "COMPLETED"
                crashed = svc.flow_run(child_a)
                assert state_type(crashed) == "CRASHED" and "heartbeat" in crashed["state"]["message"]
                assert [v.version for v in registered(env)] == [1]
        finally:
            procs.kill_leftovers(e2e_token)  # the cut worker's flow-run process hangs on its dead link


def _wait_for_children(svc: Service, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            runs = svc.runs_of("mnist-trials/worker")
        except Exception:
            runs = []
        if len(runs) >= count:
            return [r["id"] for r in runs]
        assert time.monotonic() < deadline, f"the parent started no trial workers\n{svc.logs()}"
        time.sleep(0.5)
