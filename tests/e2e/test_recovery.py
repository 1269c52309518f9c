"""Dead and hung runs recover by themselves: a real Prefect server, `make deploy`, real process workers.

1. SIGKILL of the worker and of its flow-run process mid-tune: the zombie automation marks the run
   Crashed within the heartbeat bound, the retry automation schedules it again, a restarted worker
   resumes it (same flow run, so the same run key and study trials) and exactly one version is registered.
2. A trial stuck in its first epoch (its thread loops and never reports; Optuna's heartbeat thread goes
   on beating) is failed by the watchdog within its limit and its configuration retried in the same run;
   the run completes with exactly n_trials finished, without a crash.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from service_helpers import TINY, ZOMBIE_S, Service, injected, registered, state_type, study_trials

from mnist_flow.search.watchdog import HUNG_ATTR, RETRY_ATTR

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FINISHED = ("COMPLETE", "PRUNED")
#: Kill to Crashed: the trigger fires ZOMBIE_S after the last heartbeat, which came before the kill; the
#: server evaluates proactive triggers every 5 s; 15 s more for a loaded machine.
CRASH_BOUND_S = ZOMBIE_S + 20


def _finished(trials: list) -> list:
    return [t for t in trials if t.state in FINISHED]


def _wait_for_trials(svc: Service, run_id: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(_finished(study_trials(svc.env, run_id))) < count:
        assert time.monotonic() < deadline, f"{count} trial(s) of {run_id} not finished in {timeout} s\n{svc.logs()}"
        time.sleep(0.3)


def test_a_killed_worker_and_flow_run_are_crashed_retried_and_register_once(workers: Service) -> None:
    svc = workers
    from service_helpers import flow_run_pids

    before = len(registered(svc.env))
    # epochs of 1 s: the sample's 0.1 s ones let all four trials end between two polls on a slow machine
    slow = injected(svc.env, E2E_EPOCH_SECONDS="1")
    worker = svc.start_worker("worker-1", **slow)
    run_id = svc.run("mnist/train", {**TINY, "n_trials": 4})
    svc.wait(run_id, lambda r: state_type(r) == "RUNNING", timeout=120, what="running")
    _wait_for_trials(svc, run_id, 1, timeout=120)  # mid-tune: one trial done, the others to come
    pids = flow_run_pids(svc.token, run_id)
    assert pids, "no process runs the flow run"
    os.killpg(worker.pgid, signal.SIGKILL)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    worker.stop()
    assert len(_finished(study_trials(svc.env, run_id))) < 4
    svc.start_worker("worker-2", **slow)  # what systemd or a container restart policy does

    svc.wait(run_id, lambda r: any(s["type"] == "CRASHED" for s in svc.state_history(r["id"])),
             timeout=CRASH_BOUND_S + 30, what="crashed")
    crashed_after = time.monotonic() - killed
    run = svc.wait(run_id, lambda r: state_type(r) in ("COMPLETED", "FAILED", "CANCELLED"), timeout=240,
                   what="completed")
    assert state_type(run) == "COMPLETED", svc.logs()
    print(f"killed -> Crashed in {crashed_after:.0f} s; killed -> Completed in {time.monotonic() - killed:.0f} s")
    assert crashed_after <= CRASH_BOUND_S
    history = [(s["type"], s["name"]) for s in svc.state_history(run_id)]
    crash = [s for s in svc.state_history(run_id) if s["type"] == "CRASHED"]
    assert len(crash) == 1 and "heartbeat" in crash[0]["message"], history
    assert ("SCHEDULED", "AwaitingRetry") in history, history
    assert run["run_count"] == 2

    mine = study_trials(svc.env, run_id)  # same flow run, same run key: the study was resumed, not restarted
    assert len(_finished(mine)) == 4
    versions = registered(svc.env)
    assert len(versions) == before + 1
    assert [v.flow_run_id for v in versions].count(run_id) == 1


def test_a_hung_trial_is_failed_and_retried_and_the_run_completes(workers: Service) -> None:
    svc = workers
    marker = svc.tmp / "hung-once"
    before = len(registered(svc.env))
    # tests/e2e/inject/sitecustomize.py makes the second trial loop forever in its first epoch
    svc.start_worker("worker-hang", **injected(svc.env, E2E_HANG_ONCE=str(marker)))
    run_id = svc.run("mnist/train", {**TINY, "n_trials": 3, "seed": 1})
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert time.monotonic() < deadline, "the trial was never made to hang\n" + svc.logs()
        time.sleep(0.2)
    hung = time.monotonic()
    run = svc.wait(run_id, lambda r: state_type(r) in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"), timeout=240,
                   what="completed")
    assert state_type(run) == "COMPLETED", svc.logs()
    print(f"hung -> Completed in {time.monotonic() - hung:.0f} s")
    assert run["run_count"] == 1  # failed and retried inside the run: no crash, no second run

    mine = study_trials(svc.env, run_id)
    (failed,) = [t for t in mine if t.state == "FAIL"]
    assert failed.user_attrs[HUNG_ATTR].startswith("no progress for")
    (retried,) = [t for t in _finished(mine) if t.user_attrs.get(RETRY_ATTR) == failed.number]
    assert retried.params == failed.params  # its configuration was run again, for the same run
    assert len(_finished(mine)) == 3
    assert len(registered(svc.env)) == before + 1
