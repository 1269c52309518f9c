"""A run's trial budget holds across processes: exactly n_trials finish, never more, none lost.

The processes here are real (``python -c`` and ``mnist-flow tune``), started together on one study.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mnist_flow.search.budget import SURPLUS_ATTR, Step, TrialBudget, trial_lock
from mnist_flow.search.study import run_study

REPO = Path(__file__).resolve().parents[2]

# One process of the gate test: a trivial objective (no training), so the test measures the budget only.
_GATE_WORKER = textwrap.dedent("""
    import os, sys, time, random, warnings
    warnings.simplefilter("ignore")
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from mnist_flow.pipeline import study_storage
    from mnist_flow.search.budget import trial_lock
    from mnist_flow.search.study import run_study
    url, name, run_key, n, barrier, processes = sys.argv[1:4] + [int(sys.argv[4]), sys.argv[5], int(sys.argv[6])]
    storage = study_storage(url, heartbeat_interval=1, heartbeat_grace=30)
    study = optuna.load_study(study_name=name, storage=storage)
    lock = trial_lock(url, name)
    def objective(trial):
        trial.set_user_attr("worker", str(os.getpid()))
        time.sleep(random.uniform(0.0, 0.05))
        return trial.suggest_float("x", 0, 1)
    # A file barrier: start together, once every interpreter has imported everything, however long that took.
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 120
    while len(os.listdir(barrier)) < processes:
        if time.monotonic() > deadline:
            sys.exit(f"barrier: only {len(os.listdir(barrier))} of {processes} processes arrived in 120 s")
        time.sleep(0.005)
    run_study(study, objective, n_trials=n, run_key=run_key, lock=lock, poll_seconds=0.1)
""")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MNIST_FLOW_", "PREFECT_"))}
    env.update({"MNIST_FLOW_HOME": str(home), "MNIST_FLOW_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    return env


def _run_gate_workers(url: str, processes: int, n_trials: int, tmp_path: Path) -> optuna.Study:
    name = "budget"
    optuna.create_study(storage=url, study_name=name, direction="maximize")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    args = [url, name, "run-a", str(n_trials), str(barrier), str(processes)]
    procs = [subprocess.Popen([sys.executable, "-c", _GATE_WORKER, *args],
                              env=_env(tmp_path / "home"), cwd=str(REPO), stderr=subprocess.PIPE, text=True)
             for _ in range(processes)]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    for proc, err in zip(procs, errors):
        assert proc.returncode == 0, err[-3000:]
        assert "database is locked" not in err
    return optuna.load_study(study_name=name, storage=url)


def _assert_exact_budget(study: optuna.Study, n_trials: int, processes: int) -> None:
    trials = study.get_trials()
    states = Counter(t.state for t in trials)
    mine = [t for t in trials if t.state.is_finished() and t.user_attrs.get("run_key") == "run-a"
            and t.state != TrialState.FAIL]
    assert len(mine) == n_trials, states
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0
    # no surplus trial was needed: the lock is held from the count to the tag
    assert not [t for t in trials if SURPLUS_ATTR in t.user_attrs]
    assert states[TrialState.FAIL] == 0
    # all processes passed the barrier together, so the trials really were shared (not run by the first one alone)
    assert len({t.user_attrs["worker"] for t in mine}) >= min(2, processes)


@pytest.mark.slow
def test_four_processes_on_one_sqlite_study_finish_exactly_n_trials(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = _run_gate_workers(url, processes=4, n_trials=30, tmp_path=tmp_path)
    _assert_exact_budget(study, 30, 4)


@pytest.mark.slow
def test_four_processes_on_one_postgresql_study_finish_exactly_n_trials(tmp_path: Path, pg_url: str) -> None:
    study = _run_gate_workers(pg_url, processes=4, n_trials=30, tmp_path=tmp_path)
    _assert_exact_budget(study, 30, 4)


@pytest.mark.slow
def test_four_mnist_flow_tune_processes_share_one_sqlite_study_without_database_is_locked(tmp_path: Path) -> None:
    home = tmp_path / "home"
    args = ["tune", "--source", "sample", "--hidden1-min", "64", "--hidden1-max", "128", "--hidden2-min", "64",
            "--hidden2-max", "64", "--batch-size", "256", "--n-trials", "6", "--max-epochs", "2",
            "--run-key", "four", "--json"]
    procs = [subprocess.Popen([sys.executable, "-m", "mnist_flow.cli", *args], env=_env(home), cwd=str(REPO),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    for proc, err in zip(procs, errors):
        assert proc.returncode == 0, err[-3000:]
        assert "database is locked" not in err.lower()
    storage = f"sqlite:///{home / 'mnist-flow.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6 and all(t.user_attrs["run_key"] == "four" for t in finished)
    assert len(trials) == 6, [t.state for t in trials]


def _stale_storage(tmp_path: Path, grace: int = 1) -> optuna.storages.RDBStorage:
    from mnist_flow.pipeline import study_storage

    return study_storage(f"sqlite:///{tmp_path / 'stale.db'}", heartbeat_interval=1, heartbeat_grace=grace)


def test_a_run_whose_last_slot_runs_on_a_dead_worker_waits_then_retries_that_trial(tmp_path: Path) -> None:
    # SQLite stores the heartbeat to the second and Optuna compares it with a finer clock: a trial is stale
    # between grace - 1 and grace seconds after its last heartbeat
    storage = _stale_storage(tmp_path, grace=2)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # a worker that then died
    dead.set_user_attr("run_key", "k")
    started = time.monotonic()  # before the heartbeat: it is stale (about) a grace period after it
    storage.record_heartbeat(dead._trial_id)
    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        return trial.suggest_float("x", 0, 1)

    run_study(study, objective, n_trials=1, run_key="k", poll_seconds=0.2)
    trials = study.get_trials()
    assert trials[dead.number].state == TrialState.FAIL
    assert len(trials) == 2 and trials[1].state == TrialState.COMPLETE
    assert trials[1].system_attrs["failed_trial"] == dead.number and trials[1].user_attrs["run_key"] == "k"
    assert ran == [1] and time.monotonic() - started >= 1.0  # it waited for the grace period, then ran the retry


def test_a_requeued_trial_of_another_run_keeps_its_run(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 0.5}, user_attrs={"run_key": "other"})
    run_study(study, lambda t: t.suggest_float("x", 0, 1), n_trials=2, run_key="mine")
    owners = Counter(t.user_attrs["run_key"] for t in study.get_trials(states=(TrialState.COMPLETE,)))
    assert owners == {"other": 1, "mine": 2}


def test_a_trial_popped_past_the_budget_ends_before_any_work_and_does_not_count() -> None:
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 0.1})  # untagged (like the seed configuration), first in the queue
    study.enqueue_trial({"x": 0.9}, user_attrs={"run_key": "k"})  # the run's re-queued trial
    ran: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.suggest_float("x", 0, 1))
        return ran[-1]

    run_study(study, objective, n_trials=1, run_key="k")
    trials = study.get_trials()
    assert ran == [0.9]
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs[SURPLUS_ATTR] == "k"
    assert "run_key" not in trials[0].user_attrs
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE]


def test_the_budget_waits_while_the_free_slots_are_running_elsewhere() -> None:
    study = optuna.create_study(direction="maximize")
    running = study.ask()
    running.set_user_attr("run_key", "k")
    budget = TrialBudget(1, "k")
    assert budget.begin(study) is Step.WAIT
    study.tell(running, 1.0)
    assert budget.begin(study) is Step.DONE


def test_the_lock_follows_the_database(tmp_path: Path) -> None:
    from mnist_flow.storage.locks import AdvisoryLock, FileLock, ThreadLock

    sqlite_lock = trial_lock(f"sqlite:///{tmp_path / 'a.db'}", "s")
    assert isinstance(sqlite_lock, FileLock) and sqlite_lock.path.startswith(str(tmp_path / "a.db"))
    assert isinstance(trial_lock("sqlite:///:memory:", "s"), ThreadLock)
    assert isinstance(trial_lock("postgresql+psycopg://u:p@127.0.0.1:1/db", "s"), AdvisoryLock)


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from mnist_flow.search.budget import trial_lock
    lock = trial_lock(sys.argv[1], "s")
    print("ready", flush=True)
    lock.acquire()
    print(time.time(), flush=True)
    lock.release()
""")

#: How long the other process must stay blocked once it is about to acquire: a broken lock lets it through in ms.
_BLOCKED_FOR_S = 1.5


def _stdout_lines(proc: subprocess.Popen) -> queue.Queue:
    """The process's stdout lines as they come (None at the end), read by a thread so waits can time out."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _assert_excludes_another_process(url: str, tmp_path: Path) -> None:
    lock = trial_lock(url, "s")
    lock.acquire()
    try:
        other = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, url], env=_env(tmp_path / "home"), cwd=str(REPO),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except BaseException:
        lock.release()
        raise
    try:
        try:
            lines = _stdout_lines(other)
            try:
                first = lines.get(timeout=120)  # however long the interpreter takes to import
            except queue.Empty:
                pytest.fail("the other process did not get ready to acquire the lock in 120 s")
            assert first == "ready", other.stderr.read()[-2000:] if first is None else first
            early: list[str | None] = []
            try:  # it is now in acquire(): it must stay blocked there while the lock is held here
                early.append(lines.get(timeout=_BLOCKED_FOR_S))
            except queue.Empty:
                pass
            assert not early and other.poll() is None, f"got past acquire() while the lock was held: {early}"
            released = time.time()
        finally:
            lock.release()
        try:  # released here, it goes on
            acquired_at = lines.get(timeout=60)
        except queue.Empty:
            pytest.fail("the other process did not acquire the lock within 60 s of its release")
        assert other.wait(timeout=60) == 0, other.stderr.read()[-2000:]
        assert acquired_at is not None and float(acquired_at) >= released
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()


def test_the_sqlite_lock_excludes_another_process(tmp_path: Path) -> None:
    _assert_excludes_another_process(f"sqlite:///{tmp_path / 'study.db'}", tmp_path)


def test_the_postgresql_lock_excludes_another_process(tmp_path: Path, pg_url: str) -> None:
    _assert_excludes_another_process(pg_url, tmp_path)


class _RecordingLock:
    """Records, at each release, whether the newest trial already carried the run key."""

    def __init__(self, study: optuna.Study) -> None:
        self.study, self.held, self.tagged_at_release = study, False, []

    def acquire(self) -> None:
        assert not self.held
        self.held = True

    def release(self) -> None:
        self.held = False
        trials = self.study.get_trials(deepcopy=False)
        if trials and trials[-1].state == TrialState.RUNNING:
            self.tagged_at_release.append(trials[-1].user_attrs.get("run_key"))


def test_a_new_trial_is_tagged_with_its_run_before_the_lock_is_released() -> None:
    study = optuna.create_study(direction="maximize")
    lock = _RecordingLock(study)

    def objective(trial: optuna.Trial) -> float:
        assert not lock.held  # the training itself runs without the lock
        return trial.suggest_float("x", 0, 1)

    run_study(study, objective, n_trials=3, run_key="k", lock=lock)
    assert lock.tagged_at_release == ["k", "k", "k"]
