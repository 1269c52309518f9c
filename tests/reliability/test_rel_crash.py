"""Crashes: a tuning process SIGKILLed mid-trial, a run killed while registering, a crashed flow run retried."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from rel_helpers import REPO, clean_env, mnist_flow

from mnist_flow import pipeline
from mnist_flow.params import RunParams
from mnist_flow.registry.store import Registry
from mnist_flow.settings import Settings

RUN_KEY = "nightly-0001"
HEARTBEAT = {"MNIST_FLOW_HEARTBEAT_INTERVAL": "1", "MNIST_FLOW_HEARTBEAT_GRACE": "2"}


#: The run that gets killed: the seed trial (512-256, enqueued first) finishes in about a second, then every
#: sampled trial is a 4096-1024 MLP whose epochs last a second or more each: seconds to catch one mid-trial.
MAX_EPOCHS = 3
KILL_RUN = ["--source", "sample", "--hidden1-min", "4096", "--hidden1-max", "4096", "--hidden2-min", "1024",
            "--hidden2-max", "1024", "--batch-size", "256", "--n-trials", "3", "--max-epochs", str(MAX_EPOCHS)]
#: A trial seen at the same epoch this long after is past that epoch's pruning decision, training the next one.
SETTLED_S = 0.3


def _running_mid_trial(db: Path) -> tuple[int, int, int] | None:
    """(number, reported epochs, finished trials) of a RUNNING trial with 1 to MAX_EPOCHS - 1 epochs reported.

    Read through the study storage itself (the trials' state and their reported intermediate values);
    None until such a trial runs after at least one trial has finished.
    """
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2) as con:
            rows = con.execute(
                "SELECT t.number, t.state, (SELECT COUNT(*) FROM trial_intermediate_values v "
                "WHERE v.trial_id = t.trial_id) FROM trials t").fetchall()
    except sqlite3.Error:
        return None
    finished = sum(state in ("COMPLETE", "PRUNED") for _, state, _ in rows)
    running = [(number, epochs) for number, state, epochs in rows
               if state == "RUNNING" and 1 <= epochs < MAX_EPOCHS]
    return (*running[0], finished) if running and finished >= 1 else None


def _wait_until_mid_epoch(db: Path, proc: subprocess.Popen, timeout: float = 150) -> tuple[int, int]:
    """(trial number, finished trials) once a trial has stayed RUNNING at one epoch for SETTLED_S.

    Right after reporting an epoch a trial may still be pruned; seen again at that epoch a moment later,
    it survived the pruner and is busy with an epoch of a second or more: a safe moment to kill it,
    whatever the pruner's rungs are.
    """
    deadline = time.monotonic() + timeout
    candidate: tuple[int, int] | None = None
    since = 0.0
    while True:
        assert proc.poll() is None, "the tune process ended before it could be killed mid-trial"
        assert time.monotonic() < deadline, "no trial was caught between two epochs in time"
        found = _running_mid_trial(db)
        if found is not None and found[:2] == candidate and time.monotonic() - since >= SETTLED_S:
            return found[0], found[2]
        if found is not None and found[:2] != candidate:
            candidate, since = found[:2], time.monotonic()
        time.sleep(0.02)


def _study(db: Path) -> optuna.Study:
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


@pytest.mark.slow
def test_sigkill_mid_trial_then_rerun_fails_the_trial_retries_its_config_and_redoes_nothing(
        home: Path, reliability) -> None:
    env = clean_env(home, **HEARTBEAT)
    db = home / "mnist-flow.db"
    args = ["tune", *KILL_RUN, "--run-key", RUN_KEY, "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "mnist_flow.cli", *args], env=env, cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed, finished_before = _wait_until_mid_epoch(db, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    before = {t.number: t.datetime_complete for t in _study(db).trials if t.state.is_finished()}
    assert _study(db).trials[killed].state == TrialState.RUNNING

    time.sleep(2.5)  # let the killed trial's heartbeat go stale (grace 2 s)
    rerun = mnist_flow(args, env)
    assert rerun.returncode == 0, rerun.stderr

    study = _study(db)
    trials = study.trials
    mine = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and t.user_attrs.get("run_key") == RUN_KEY]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert trials[killed].state == TrialState.FAIL
    assert len(mine) == 3
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == trials[killed].params
    # finished trials are untouched (same completion time) and the study holds exactly one extra trial
    assert {t.number: t.datetime_complete for t in trials if t.number in before} == before
    assert len(trials) == 3 + 1
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    reliability.record(
        "SIGKILL of `mnist-flow tune` mid-trial, then the same command again (same --run-key)",
        "killed trial FAIL, its configuration retried (failed_trial), 3/3 trials, none redone",
        f"trial #{killed} FAIL, retried as #{retries[0].number} ({retries[0].state.name}); "
        f"{finished_before} finished before the kill kept, {len(mine)}/3 finished, 0 lost, 0 RUNNING left",
        group="faults")


# --- killed while registering ------------------------------------------------------------------------------------

_KILL_DURING_REGISTER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from mnist_flow.registry import store as reg_mod
    from mnist_flow.training.model import MLP
    from mnist_flow.registry.store import Lineage, Registry

    database_url, artifacts, key, kill = sys.argv[1:5]
    reg = Registry(database_url, artifacts)
    if kill == "after-artifacts":
        # the artifacts are on disk, the row is not: die right where a crash hurts most
        original = reg_mod.Registry._write
        def dying_write(self, fn):
            if fn.__name__ == "insert":
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, fn)
        reg_mod.Registry._write = dying_write
    elif kill == "mid-artifact":
        import mnist_flow.storage.fsutil as fsutil  # the local artifact store's atomic write renames here
        original_replace = fsutil.os.replace
        def dying_replace(src, dst):
            if str(dst).endswith("model.safetensors"):
                os.kill(os.getpid(), signal.SIGKILL)
            return original_replace(src, dst)
        fsutil.os.replace = dying_replace
    torch.manual_seed(0)
    version = reg.register("mnist", MLP((8,)).eval(), sidecar={"classes": list(range(10))}, params={},
                           metrics={"test_accuracy": 0.9}, lineage=Lineage("mnist", "fp", study_name="s", trial_number=3, flow_run_id=None), idempotency_key=key)
    print(version.version)
""")


def _register_in_child(database_url: str, artifacts: Path, key: str, kill: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILL_DURING_REGISTER, database_url, str(artifacts), key, kill],
                          capture_output=True, text=True, timeout=120, env=clean_env(artifacts.parent))


@pytest.mark.parametrize("kill", ["mid-artifact", "after-artifacts"])
def test_killed_while_registering_leaves_no_broken_version_and_rerun_registers_once(
        tmp_path: Path, kill: str, reliability) -> None:
    database_url = f"sqlite:///{tmp_path / 'mnist-flow.db'}"
    artifacts = tmp_path / "artifacts"
    key = f"{RUN_KEY}:mnist-study:3"

    crashed = _register_in_child(database_url, artifacts, key, kill)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    registry = Registry(database_url, str(artifacts))
    try:
        assert registry.list_versions() == []  # no row without its artifact
        for attempt in range(2):  # the rerun, then a second (retried) rerun
            again = _register_in_child(database_url, artifacts, key, "none")
            assert again.returncode == 0, again.stderr
            assert again.stdout.strip() == "1"
        versions = registry.list_versions()
        assert [v.version for v in versions] == [1]
        model, _, loaded = registry.load("mnist", 1)  # checksum verified before loading
        assert loaded.idempotency_key == key
        temp_files = sorted(p.name for p in artifacts.rglob("*") if p.name.endswith(".tmp"))
    finally:
        registry.dispose()
    # a temp file orphaned by SIGKILL is never referenced and never read: ignored, and a dot-file
    assert all(name.startswith(".") for name in temp_files)
    assert not [v for v in versions if v.artifact_uri.endswith(".tmp")]
    reliability.record(
        f"run SIGKILLed while registering ({'during the atomic artifact write' if kill == 'mid-artifact' else 'after the artifacts, before the row'}), then rerun twice",
        "no version without artifact or with a wrong checksum; rerun registers exactly once",
        f"0 versions after the crash; after 2 reruns: {len(versions)} version (v1, checksum OK); "
        f"{len(temp_files)} orphaned temp file(s), never referenced", group="faults")


# --- a crashed flow run retried ----------------------------------------------------------------------------------


class _Crash(Exception):
    """The injected crash (not a RuntimeError, which Optuna catches per trial: the run dies)."""


def test_retried_run_with_the_same_run_key_resumes_the_study_instead_of_starting_over(
        tmp_path: Path, reliability, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(home=tmp_path / "home")
    params = RunParams.parse(source="sample", n_trials=3, max_epochs=1, hidden1_min=64, hidden1_max=64,
                                      hidden2_min=64, hidden2_max=64, batch_size=256)
    bundle = pipeline.load_data(params, settings)
    prepared = pipeline.prepare(bundle, val_fraction=params.val_fraction, seed=0)
    flow_run_id = "6b0c1f6e-0000-4000-8000-000000000001"  # a Prefect retry keeps the flow run id = run key
    calls = {"n": 0}

    from mnist_flow.search import study as tune_lib
    real_train = tune_lib.train_model

    def crash_on_second_trial(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Crash("worker lost")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(tune_lib, "train_model", crash_on_second_trial)
    with pytest.raises(_Crash):
        pipeline.tune(prepared, params, settings.resolved_database_url, run_key=flow_run_id,
                      flow_run_id=flow_run_id, heartbeat_interval=1, heartbeat_grace=1)
    monkeypatch.setattr(tune_lib, "train_model", real_train)
    first = {t.number: t.datetime_complete for t in _study(settings.home_path / "mnist-flow.db").trials
             if t.state.is_finished() and t.state != TrialState.FAIL}

    study = pipeline.tune(prepared, params, settings.resolved_database_url, run_key=flow_run_id,
                          flow_run_id=flow_run_id, heartbeat_interval=1, heartbeat_grace=1).study
    trials = study.trials
    mine = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and t.user_attrs.get("run_key") == flow_run_id]
    assert len(first) == 1
    assert {n: d for n, d in ((t.number, t.datetime_complete) for t in trials) if n in first} == first
    assert len(mine) == 3 and len(trials) == 4  # 1 kept + 1 crashed + 2 new, not 3 + 3
    assert trials[1].state == TrialState.FAIL
    assert study.user_attrs["dataset"] == "mnist" and len({t.number for t in trials}) == 4
    reliability.record(
        "flow run crashes in its 2nd trial; Prefect retries it (same flow run id = run key)",
        "the study resumes: the finished trial is kept, only the missing trials run",
        f"1 trial kept, crashed trial FAIL, 2 more run: {len(mine)}/3 finished in {len(trials)} trials "
        "(not 3 new ones)", group="faults")


# --- killed anywhere between training and the gate's decision (issue 15, class 5) ----------------------------------

_KILL_AROUND_THE_GATE = textwrap.dedent("""
    import os, signal, sys
    from mnist_flow import pipeline
    from mnist_flow.storage import fsutil
    from mnist_flow.registry import store as reg_mod
    from mnist_flow.registry.store import Registry
    from mnist_flow.settings import Settings
    from mnist_flow.training.loop import train_model
    from mnist_flow.params import RunParams, TrainConfig

    database_url, artifacts, home, key, kill = sys.argv[1:6]

    def die(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    settings = Settings(home=home)
    params = RunParams.parse(source="sample")
    prepared = pipeline.prepare(pipeline.load_data(params, settings), val_fraction=0.1, seed=0)
    config = TrainConfig(hidden=(16,), epochs=1, seed=1)
    s = prepared.splits
    model, history = train_model(config, s.train_x, s.train_y, s.val_x, s.val_y)
    test = pipeline.evaluate_test(model, prepared)
    if kill == "scoring the champion":
        pipeline.evaluate_test = die  # the gate evaluates the champion on the test set next
    elif kill == "writing the weights":
        replace = fsutil.os.replace
        fsutil.os.replace = lambda src, dst: die() if str(dst).endswith("model.safetensors") else replace(src, dst)
    elif kill in ("before the row", "after the commit"):
        write = reg_mod.Registry._write
        def dying_write(self, fn):
            if fn.__name__ == "insert" and kill == "before the row":
                die()
            result = write(self, fn)
            if fn.__name__ == "insert":
                die()
            return result
        reg_mod.Registry._write = dying_write
    elif kill == "inside the transaction":
        log = reg_mod.Registry._log
        def dying_log(*args, **kwargs):
            log(*args, **kwargs)
            die()  # the row and the decision are in the session, not committed
        reg_mod.Registry._log = staticmethod(dying_log)
    candidate = pipeline.Candidate(prepared, model, config, history, test, study_name="mnist-study", trial_number=7,
                                   run_key=key, flow_run_id=None)
    with Registry(database_url, artifacts) as registry:
        if kill == "between register and gate (older flow)":
            pipeline.register_challenger(registry, candidate)
            die()
        pipeline.register_and_decide(registry, candidate, margin=0.0, alpha=0.05, require_study=True)
""")

KILL_POINTS = ["scoring the champion", "writing the weights", "before the row", "inside the transaction",
               "after the commit", "between register and gate (older flow)"]


@pytest.fixture(scope="module")
def champion_inputs() -> tuple:
    """The sample data, the champion's model (seed 0) and the challenger's (seed 1, as in the killed child)."""
    from mnist_flow.params import RunParams, TrainConfig
    from mnist_flow.training.loop import train_model

    params = RunParams.parse(source="sample")
    prepared = pipeline.prepare(pipeline.load_data(params, Settings(home=Path("/nonexistent"))),
                                val_fraction=0.1, seed=0)
    s = prepared.splits
    trained = []
    for seed in (0, 1):
        config = TrainConfig(hidden=(16,), epochs=1, seed=seed)
        model, history = train_model(config, s.train_x, s.train_y, s.val_x, s.val_y)
        trained.append((prepared, model, config, history, pipeline.evaluate_test(model, prepared)))
    return tuple(trained)


def _champion_world(home: Path, inputs: tuple) -> None:
    """A home with a study and a champion v1, registered and decided by the pipeline."""
    from mnist_flow.storage.db import dispose_storage, optuna_storage

    settings = Settings(home=home)
    storage = optuna_storage(settings.resolved_database_url)
    optuna.create_study(storage=storage, study_name="mnist-study", direction="maximize")
    dispose_storage(storage)
    prepared, model, config, history, test = inputs[0]
    with Registry.from_settings(settings) as registry:
        version, decision = pipeline.register_and_decide(
            registry,
            pipeline.Candidate(prepared, model, config, history, test, study_name="mnist-study", trial_number=3,
                               run_key="run-1", flow_run_id=None),
            margin=0.0, alpha=0.05)
    assert (version.version, decision.outcome) == (1, "first")


def _gate_child(home: Path, kill: str) -> subprocess.CompletedProcess:
    settings = Settings(home=home)
    return subprocess.run([sys.executable, "-c", _KILL_AROUND_THE_GATE, settings.resolved_database_url,
                           settings.resolved_artifacts_url, str(home), "run-2", kill], check=False, capture_output=True,
                          text=True, timeout=180, env=clean_env(home))


@pytest.mark.slow
@pytest.mark.parametrize("kill", KILL_POINTS)
def test_sigkill_at_any_point_of_register_and_gate_leaves_one_version_with_one_decision(
        kill: str, champion_inputs: tuple, tmp_path: Path, reliability) -> None:
    home = tmp_path / "home"
    _champion_world(home, champion_inputs)
    crashed = _gate_child(home, kill)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    with Registry.from_settings(Settings(home=home)) as registry:
        after_kill = [(v.version, len([d for d in registry.history() if d["challenger_version"] == v.version]))
                      for v in registry.list_versions()]
    # at the kill: v1 with its decision, and a v2 only with its decision (except the older flow's window)
    undecided = [v for v, n in after_kill if n == 0]
    assert undecided == ([2] if kill.startswith("between") else [])
    prepared, model, config, history, test = champion_inputs[1]
    answers = []
    for _ in range(2):  # the rerun (a new process would do the same: nothing is kept in memory), and its retry
        with Registry.from_settings(Settings(home=home)) as registry:
            version, decision = pipeline.register_and_decide(
                registry,
                pipeline.Candidate(prepared, model, config, history, test, study_name="mnist-study", trial_number=7,
                                   run_key="run-2", flow_run_id=None),
                margin=0.0, alpha=0.05, require_study=True)
        answers.append((version.version, decision.outcome, decision.p_value))
    assert answers[0] == answers[1] and answers[0][0] == 2
    with Registry.from_settings(Settings(home=home)) as registry:
        versions = registry.list_versions()
        history = registry.history()
        champion = registry.champion("mnist")
        for v in versions:
            registry.load("mnist", v.version)  # every version has its files, checksum verified
    gate = [d for d in history if d["actor"] == "gate"]
    assert [v.version for v in versions] == [1, 2]
    assert sorted(d["challenger_version"] for d in gate) == [1, 2] and len(history) == 2
    assert champion.version == (2 if gate[-1]["outcome"] == "promoted" else 1)
    reliability.record(f"SIGKILL {kill}, then the same run again (same run key), retried once more",
                       "exactly one new version with exactly one decision; champion alias matches it",
                       f"after the kill: {len(after_kill) - 1} new version(s), {len(undecided)} undecided; after "
                       f"the reruns: versions {[v.version for v in versions]}, one gate decision each "
                       f"(v2 {gate[-1]['outcome']}), champion v{champion.version}", group="faults")


def _versions_and_decisions(db: Path) -> tuple[list[int], list[int]] | None:
    """(versions, challenger versions of gate decisions) read from the registry tables, None until they exist."""
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2) as con:
            versions = [row[0] for row in con.execute("SELECT version FROM mnist_flow_model_versions")]
            decided = [row[0] for row in con.execute(
                "SELECT challenger_version FROM mnist_flow_decisions WHERE actor = 'gate'")]
    except sqlite3.Error:
        return None
    return versions, decided


@pytest.mark.slow
def test_a_flow_run_killed_the_moment_its_version_appears_leaves_it_decided(home: Path, reliability) -> None:
    """SIGKILL of `python flows/mnist.py` as soon as a version row can be seen: its decision is already there."""
    db = home / "mnist-flow.db"
    env = clean_env(home, PREFECT_HOME=str(home.parent / "prefect"))
    args = ["--source", "sample", "--hidden1-min", "64", "--hidden1-max", "64", "--hidden2-min", "64",
            "--hidden2-max", "64", "--batch-size", "256", "--n-trials", "1", "--max-epochs", "1", "--final-epochs", "1"]
    proc = subprocess.Popen([sys.executable, str(REPO / "flows" / "mnist.py"), *args], env=env, cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = None
    try:
        deadline = time.monotonic() + 300
        while True:
            found = _versions_and_decisions(db)
            if found is not None and found[0]:
                os.kill(proc.pid, signal.SIGKILL)
                seen = found
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no version was registered in time"
            time.sleep(0.005)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    after = _versions_and_decisions(db)
    assert proc.returncode == -signal.SIGKILL
    assert seen == ([1], [1]) and after == ([1], [1])  # the version was never visible without its decision
    with Registry(f"sqlite:///{db}", str(home / "artifacts")) as registry:
        assert registry.champion("mnist").version == 1
        registry.load("mnist", 1)  # and never without its files
    reliability.record("`python flows/mnist.py` SIGKILLed the moment its version row becomes visible (polled every 5 ms)",
                       "the version already has its gate decision and its files (no register/gate window)",
                       f"seen at the kill: versions {seen[0]}, decisions for {seen[1]}; v1 champion, loads",
                       group="faults")
