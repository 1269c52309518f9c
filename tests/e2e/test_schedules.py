"""Schedules, pauses and data triggers of the unattended service: a real server, `make deploy`, real workers.

3. A deployment of the `mnist` flow with the `train` deployment's settings and a short interval: the
   scheduler creates runs while no worker is up; after three missed slots a worker comes back and exactly
   one of them runs (and completes); the others are cancelled by the deployment's concurrency limit
   (collision strategy CANCEL_NEW), so there is no backlog.
4. The nightly schedule paused by an operator stays paused after `make deploy`, and the automations are
   not duplicated.
5. A changed data folder makes the data check emit `mnist-flow.data.changed`, whose trigger starts exactly
   one `mnist/train` run on that folder (which completes); unchanged data start none.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import procs
import pytest
import yaml
from service_helpers import TINY, Service, registered, state_type

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

INTERVAL_S = 6


def _when(run: dict) -> datetime:
    return datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00"))


def _interval_copy(tmp: Path) -> Path:
    """deployments/prefect.yaml with only `train`, renamed, on a short interval with tiny budgets."""
    document = yaml.safe_load((procs.REPO / "deployments" / "prefect.yaml").read_text())
    (train,) = [d for d in document["deployments"] if d["name"] == "train"]
    train = {**train, "name": "train-every-few-seconds", "triggers": [],
             "schedules": [{"interval": INTERVAL_S, "slug": "test-interval", "parameters": TINY}]}
    document["deployments"] = [train]
    path = tmp / "prefect-interval.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_after_three_missed_slots_exactly_one_scheduled_run_catches_up(workers: Service, tmp_path: Path) -> None:
    svc = workers
    name = "mnist/train-every-few-seconds"
    procs.run([str(procs.BIN / "prefect"), "deploy", "--prefect-file", str(_interval_copy(tmp_path)), "--all",
               "--no-prompt"], env={**svc.env, "PWD": str(procs.REPO)}, timeout=180)
    deployment = svc.deployment(name)
    assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    try:
        deadline = time.monotonic() + 90
        while True:  # no worker: the scheduler's runs pile up, Late
            # (the newest slot due is marked Late only 5-9 s after it: LATE_RUNS_AFTER_SECONDS plus the service's
            # loop, longer than the interval on a busy machine, so "three of them Late" is what is waited for)
            now = datetime.now(UTC)
            late = [r for r in svc.runs_of(name) if _when(r) < now and r["state"]["name"] == "Late"]
            if len(late) >= 3:
                break
            assert time.monotonic() < deadline, f"the scheduler did not create the runs: {svc.runs_of(name)}"
            time.sleep(1)
        back = datetime.now(UTC)
        missed = [r["id"] for r in svc.runs_of(name) if _when(r) < back]
        svc.start_worker("worker-catch-up")
        deadline = time.monotonic() + 180
        while not (done := [r for r in svc.runs_of(name) if state_type(r) == "COMPLETED"]):
            assert time.monotonic() < deadline, f"no scheduled run completed\n{svc.logs()}"
            time.sleep(1)
    finally:
        svc.post(f"/deployments/{deployment['id']}/pause_deployment")
    (first,) = done
    started = datetime.fromisoformat(first["start_time"].replace("Z", "+00:00"))
    # every run due when the worker came back competed for the slot: the one that won ran, the others were
    # cancelled, none waits to run after it
    due = [r for r in svc.runs_of(name) if _when(r) <= started]
    assert len(missed) >= 3 and set(missed) <= {r["id"] for r in due}
    assert first["auto_scheduled"] and first["id"] in {r["id"] for r in due}
    others = [r for r in due if r["id"] != first["id"]]
    assert others and all(state_type(r) == "CANCELLED" for r in others), [(r["name"], state_type(r)) for r in due]
    assert all("concurrency limit" in (r["state"]["message"] or "") for r in others)


def _nightly(svc: Service) -> dict:
    deployment = svc.deployment("mnist/train")
    (schedule,) = deployment["schedules"]
    return schedule


def _automation_names(svc: Service) -> list[str]:
    return sorted(a["name"] for a in svc.post("/automations/filter"))


def test_a_paused_nightly_schedule_stays_paused_after_make_deploy(workers: Service) -> None:
    svc = workers
    schedule = _nightly(svc)
    assert schedule["active"] is True and schedule["slug"] == "nightly-retrain"
    automations = _automation_names(svc)
    deployment_id = svc.deployment("mnist/train")["id"]
    response = httpx.patch(f"{svc.api_url}/deployments/{deployment_id}/schedules/{schedule['id']}",
                                 json={"active": False}, timeout=20)
    response.raise_for_status()
    procs.run(["make", "-o", "install", "deploy"], env=svc.env, timeout=240)
    after = _nightly(svc)
    assert after["active"] is False and after["id"] == schedule["id"]
    assert after["schedule"]["cron"] == "0 2 * * *"
    assert _automation_names(svc) == automations  # updated in place, none added
    assert automations.count("mnist-flow: crash zombie flow runs") == 1
    assert automations.count("mnist-flow: retry crashed training runs") == 1
    httpx.patch(f"{svc.api_url}/deployments/{deployment_id}/schedules/{schedule['id']}",
                      json={"active": True}, timeout=20).raise_for_status()


def _write_data(folder: Path, drop: int) -> None:
    from mnist_flow.data import datasets as data
    from mnist_flow.data import idx

    bundle = data.load_dataset("mnist", "sample", cache_dir=Path("/nonexistent"))
    arrays = {"train_images": bundle.train_images[drop:], "train_labels": bundle.train_labels[drop:],
              "test_images": bundle.test_images, "test_labels": bundle.test_labels}
    folder.mkdir(parents=True, exist_ok=True)
    for field_name, base in data.FILES.items():
        idx.write_idx(folder / base, arrays[field_name])


def _check(svc: Service, folder: Path) -> dict:
    run_id = svc.run("mnist-data-check/check", {"dataset": "mnist", "source": "dir", "data_dir": str(folder),
                                                "n_trials": 2, "max_epochs": 1, "final_epochs": 1})
    run = svc.wait(run_id, lambda r: state_type(r) in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"),
                   timeout=120, what="finished")
    assert state_type(run) == "COMPLETED", svc.logs()
    return run


def _triggered(svc: Service, folder: Path) -> list[dict]:
    return [r for r in svc.runs_of("mnist/train") if r["parameters"].get("data_dir") == str(folder)]


def test_changed_data_trigger_exactly_one_training_run_and_unchanged_data_none(workers: Service,
                                                                              tmp_path: Path) -> None:
    svc = workers
    folder = tmp_path / "digits"
    _write_data(folder, drop=0)
    svc.start_worker("worker-data")
    _check(svc, folder)  # first look: the fingerprint is recorded
    time.sleep(4)
    assert _triggered(svc, folder) == []

    _write_data(folder, drop=100)  # the data changed
    _check(svc, folder)
    deadline = time.monotonic() + 60
    while not (runs := _triggered(svc, folder)):
        assert time.monotonic() < deadline, "no mnist/train run was triggered\n" + svc.logs()
        time.sleep(1)
    (run,) = runs
    assert run["parameters"] == {"dataset": "mnist", "source": "dir", "data_dir": str(folder), "n_trials": 2,
                                 "max_epochs": 1, "final_epochs": 1}
    done = svc.wait(run["id"], lambda r: state_type(r) in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"),
                    timeout=180, what="finished")
    assert state_type(done) == "COMPLETED", svc.logs()
    assert any(v.flow_run_id == run["id"] for v in registered(svc.env))

    _check(svc, folder)  # unchanged since: nothing
    time.sleep(5)
    assert len(_triggered(svc, folder)) == 1
