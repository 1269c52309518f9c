"""A parallel `make run`: the trials in the flow's process and a single-threaded trial process (Prefect's
ProcessPoolTaskRunner).

The run uses Prefect's temporary local API, as `make run` does on a new machine. Exactly n_trials of the
run finish, none fails, both processes ran some (each records its host:pid), the trial process's log lines
reach the flow run's output, a champion is registered, and no process outlives the run.
A trial process killed mid-trial (SIGKILL, which breaks Prefect's whole process pool) costs only the
trials that were running: the flow's own tune task retries their configurations and the run still
finishes exactly n_trials.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import procs
import pytest
from optuna.trial import TrialState

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_TRIALS = 8
#: Batches of 4 (epochs of about a second; at batch 16 they took 0.3-0.45 s): the flow's process alone must
#: not finish the trials in the seconds the trial process takes to start (in the whole suite, at batch 16
#: the flow's process ran all 8 trials before the trial process ran any).
ARGS = f"--source sample --n-trials {N_TRIALS} --max-epochs 3 --final-epochs 2 --batch-size 4 --workers 2 --json"


def test_make_run_with_two_trial_processes_finishes_exactly_n_trials_and_registers_a_champion(
        tmp_path: Path, e2e_token: str) -> None:
    env = procs.base_env(tmp_path, e2e_token, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    result = procs.run(["make", "-o", "install", "run", f"ARGS={ARGS}"], env=env, timeout=600)
    out = result.stdout
    summary, _ = json.JSONDecoder().raw_decode(out[out.index("{\n"):])
    assert summary["trials"]["finished"] == N_TRIALS
    assert summary["model"]["version"] == 1 and summary["model"]["champion"] is True
    assert "running the trials in this process and 1 more single-threaded process(es)" in out
    assert "trial worker 1 of 2" in out and "trial worker 1 ran trial(s)" in out  # its logs reach the run
    assert "Starting temporary server" in out and out.count("Starting temporary server") == 1  # one shared API

    db = Path(env["MNIST_FLOW_HOME"]) / "mnist-flow.db"
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{db}")
    trials = study.get_trials()
    states = Counter(t.state for t in trials)
    assert states[TrialState.FAIL] == 0 and len(trials) == N_TRIALS, states
    assert len({t.user_attrs["run_key"] for t in trials}) == 1  # a fresh home: all are this run's
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    workers = Counter(t.user_attrs["worker"] for t in trials)
    assert len(workers) == 2, workers  # the flow's process and the trial process

    listed = json.loads(procs.run([str(procs.BIN / "mnist-flow"), "registry", "list", "--json"], env=env,
                                  timeout=120).stdout)
    assert [v["version"] for v in listed] == [1] and "champion" in listed[0]["aliases"]
    assert not procs.leftovers(e2e_token), "a trial process outlived the run"


#: Batches of 4: each epoch lasts about a second, so the trial process gets trials (the flow's process runs
#: trials too, from the start) and there is time to kill it mid-trial. (The search space stays the default:
#: a re-queued seed configuration outside narrowed bounds is refused by Optuna.)
KILL_ARGS = ["--source", "sample", "--n-trials", "5", "--max-epochs", "6", "--final-epochs", "1", "--workers", "2",
             "--batch-size", "4", "--json"]


def _start_flow(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python flows/mnist.py` with KILL_ARGS in its own session, its output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(procs.REPO / "flows" / "mnist.py"), *KILL_ARGS], env=env,
                                cwd=procs.REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _trial_process_mid_trial(run, db: Path, log: Path, timeout: float = 400) -> int:
    """The pid of a trial process (not the flow's) with a RUNNING trial past its first epoch.

    Read-only, with sqlite3: opening an Optuna storage on the database while the flow creates it would race
    its schema creation (both would stamp Optuna's alembic version)."""
    import sqlite3
    import time

    query = ("SELECT a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
             "WHERE t.state = 'RUNNING' AND a.key = 'worker' AND EXISTS "
             "(SELECT 1 FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.5)
        if not db.exists():
            continue
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2) as con:
                rows = con.execute(query).fetchall()
        except sqlite3.Error:  # the tables not there yet, or the database busy: look again
            continue
        pids = [int(json.loads(row[0]).rsplit(":", 1)[1]) for row in rows]
        others = [pid for pid in pids if pid != run.pid]  # the flow's process runs trials too
        if others:
            return others[0]
    raise AssertionError("no trial process was seen mid-trial\n" + procs.tail(log))


def test_a_trial_process_killed_mid_trial_costs_only_its_trial_and_the_run_still_finishes_exactly(
        tmp_path: Path, e2e_token: str) -> None:
    import os
    import signal

    env = procs.base_env(tmp_path, e2e_token, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
                         MNIST_FLOW_HEARTBEAT_INTERVAL="1", MNIST_FLOW_HEARTBEAT_GRACE="3")
    db = Path(env["MNIST_FLOW_HOME"]) / "mnist-flow.db"
    log = tmp_path / "run.log"
    run = _start_flow(env, log)
    try:
        victim = _trial_process_mid_trial(run, db, log)
        os.kill(victim, signal.SIGKILL)
        assert run.wait(timeout=600) == 0, procs.tail(log, 8000)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    text = log.read_text()
    summary_json, _ = json.JSONDecoder().raw_decode(text[text.index("{\n"):])
    assert summary_json["trials"]["finished"] == 5 and summary_json["model"]["champion"] is True
    study = optuna.load_study(study_name=summary_json["study"], storage=f"sqlite:///{db}")
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 5 and 1 <= len(failed) <= 2  # the killed trial (and the one the broken pool stopped)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    assert all(t.number in retried for t in failed)  # each lost configuration ran again
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert not procs.leftovers(e2e_token), "a trial process outlived the run"


def test_the_trial_processes_end_with_a_flow_process_killed_mid_trial(tmp_path: Path, e2e_token: str) -> None:
    """SIGKILL of the flow's process leaves no trial process behind (they would finish a trial of a crashed
    run, then wait on the dead pool's queue for ever): each ends within seconds, by its parent's sentinel."""
    import signal
    import time

    env = procs.base_env(tmp_path, e2e_token, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    db = Path(env["MNIST_FLOW_HOME"]) / "mnist-flow.db"
    log = tmp_path / "run.log"
    run = _start_flow(env, log)
    try:
        trial_process = _trial_process_mid_trial(run, db, log)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
        deadline = time.monotonic() + 20
        while procs.leftovers(e2e_token) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = procs.leftovers(e2e_token)
        assert not left, f"outlived the flow's process: {left} (a trial process was {trial_process})"
    finally:
        procs.kill_leftovers(e2e_token)


def _changed_copy_of_the_sample(folder: Path) -> Path:
    """The bundled sample's four IDX files with one training pixel changed: other data (another fingerprint,
    so a new study) of the same dataset, `mnist`."""
    import gzip
    import shutil

    sample = procs.REPO / "src" / "mnist_flow" / "sample"
    folder.mkdir()
    for path in sample.glob("*.gz"):
        shutil.copy(path, folder / path.name)
    images = folder / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(images.read_bytes()))
    raw[16 + 14 * 28 + 14] ^= 0xFF  # a pixel in the middle of the first image
    images.write_bytes(gzip.compress(bytes(raw)))
    return folder


def test_a_parallel_run_on_new_data_queues_the_champions_parameters_first(tmp_path: Path, e2e_token: str) -> None:
    """The champion's parameters are the warm start of a new study of its dataset in a parallel run too: the
    study is opened before the trial processes start, with the seed configuration and the champion queued."""
    env = procs.base_env(tmp_path, e2e_token, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    flow = [sys.executable, str(procs.REPO / "flows" / "mnist.py"), "--n-trials", "2", "--max-epochs", "1",
            "--final-epochs", "1", "--final-seeds", "1", "--json"]
    # one trial: the seed configuration, its rate raised into narrowed bounds, so that the champion's
    # parameters are not the seed configuration's (a point already queued is not queued twice)
    first = procs.run([*flow, "--source", "sample", "--workers", "1", "--n-trials", "1", "--lr-min", "0.05"],
                      env=env, timeout=600).stdout
    champion, _ = json.JSONDecoder().raw_decode(first[first.index("{\n"):])
    data = _changed_copy_of_the_sample(tmp_path / "changed")
    second = procs.run([*flow, "--source", "dir", "--data-dir", str(data), "--workers", "2"], env=env,
                       timeout=600).stdout
    summary, _ = json.JSONDecoder().raw_decode(second[second.index("{\n"):])
    assert summary["study"] != champion["study"] and summary["trials"]["finished"] == 2

    db = Path(env["MNIST_FLOW_HOME"]) / "mnist-flow.db"
    trials = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{db}").get_trials()
    assert "baseline" in trials[0].user_attrs and trials[0].params["lr"] == pytest.approx(0.01)
    assert trials[1].user_attrs.get("warm_start") == "champion of an earlier study"
    best = champion["best"]["params"]
    assert best["lr"] == pytest.approx(0.05)
    assert {k: trials[1].params[k] for k in ("lr", "momentum", "hidden1", "hidden2")} == pytest.approx(
        {k: best[k] for k in ("lr", "momentum", "hidden1", "hidden2")})
    assert not procs.leftovers(e2e_token), "a trial process outlived the run"
