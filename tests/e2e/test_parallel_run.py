"""A parallel `make run`: the trials in two single-threaded processes (Prefect's ProcessPoolTaskRunner).

The run uses Prefect's temporary local API, as `make run` does on a new machine. Exactly n_trials of the
run finish, none fails, two processes other than the flow's ran them (each records its host:pid), their
log lines reach the flow run's output, a champion is registered, and no process outlives the run.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import procs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_TRIALS = 6
ARGS = f"--source sample --n-trials {N_TRIALS} --max-epochs 3 --final-epochs 2 --workers 2 --json"


def test_make_run_with_two_trial_processes_finishes_exactly_n_trials_and_registers_a_champion(
        tmp_path: Path, e2e_token: str) -> None:
    env = procs.base_env(tmp_path, e2e_token, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    result = procs.run(["make", "-o", "install", "run", f"ARGS={ARGS}"], env=env, timeout=600)
    out = result.stdout
    summary, _ = json.JSONDecoder().raw_decode(out[out.index("{\n"):])
    assert summary["trials"]["finished"] == N_TRIALS
    assert summary["model"]["version"] == 1 and summary["model"]["champion"] is True
    assert "trial worker 1 of 2" in out and "trial worker 2 of 2" in out  # the processes' logs reach the run
    assert "Starting temporary server" in out and out.count("Starting temporary server") == 1  # one shared API

    db = Path(env["MNIST_FLOW_HOME"]) / "mnist-flow.db"
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{db}")
    trials = study.get_trials()
    states = Counter(t.state for t in trials)
    assert states[TrialState.FAIL] == 0 and len(trials) == N_TRIALS, states
    assert len({t.user_attrs["run_key"] for t in trials}) == 1  # a fresh home: all are this run's
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    workers = Counter(t.user_attrs["worker"] for t in trials)
    assert len(workers) == 2, workers

    listed = json.loads(procs.run([str(procs.BIN / "mnist-flow"), "registry", "list", "--json"], env=env,
                                  timeout=120).stdout)
    assert [v["version"] for v in listed] == [1] and "champion" in listed[0]["aliases"]
    assert not procs.leftovers(e2e_token), "a trial process outlived the run"
