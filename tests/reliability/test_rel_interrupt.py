"""Ctrl-C, SIGKILL and errors inside runs, through real processes: exit codes, one message, nothing left behind.

* Ctrl-C (SIGINT to the process group, as a terminal sends it) of `mnist-flow tune`, `mnist-flow train` and
  `python flows/mnist.py` (trials in the flow's process, or in two trial processes; and `kill -INT` of the flow's
  process alone): exit 130, one line, no traceback; the interrupted trials are FAIL with their reason, none is
  left RUNNING, no process is left behind.
* SIGKILL of `python flows/mnist.py`: the temporary Prefect server it started stops listening too.
* A user error raised after Prefect created the run (corrupt data): one message on the terminal and in the
  flow-run log (read from the temporary server's own database), no traceback anywhere.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from rel_helpers import REPO, clean_env
from testlib import group_has_live_member

from mnist_flow.errors import INTERRUPTED
from mnist_flow.search.study import INTERRUPTED_REASON

#: Wide layers on the bundled sample: an epoch lasts a second or more, so a trial is caught mid-way. One
#: worker: the trial runs in the interrupted process (the flow script is also run with two trial processes).
SLOW_TRIALS = ["--source", "sample", "--hidden1-min", "2048", "--hidden1-max", "2048", "--hidden2-min", "1024",
               "--hidden2-max", "1024", "--n-trials", "50", "--max-epochs", "20", "--workers", "1"]


def _as_at_a_terminal() -> None:
    os.setpgid(0, 0)  # a process group of its own, as a shell gives a foreground job
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # (a background job would inherit SIG_IGN)


def _popen(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A child in its own process group whose SIGINT is handled as at a terminal."""
    return subprocess.Popen(args, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_at_a_terminal)


def _running_trial(db: Path) -> bool:
    """Whether a trial is RUNNING with at least one epoch reported (read-only, through SQLite)."""
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2) as con:
            return bool(con.execute(
                "SELECT 1 FROM trials t WHERE t.state = 'RUNNING' AND EXISTS (SELECT 1 FROM trial_intermediate_values "
                "v WHERE v.trial_id = t.trial_id)").fetchone())
    except sqlite3.Error:
        return False


def _interrupt_mid_trial(proc: subprocess.Popen, db: Path, timeout: float = 180, *,
                         group: bool = True) -> tuple[str, str]:
    """Ctrl-C once a trial is mid-way: SIGINT to the process group, as a terminal sends it (``group=False``:
    to the process alone, as `kill -INT` does)."""
    deadline = time.monotonic() + timeout
    while not _running_trial(db):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no trial started in time"
        time.sleep(0.05)
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"still running 60 s after the interrupt:\n{err[-6000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _trials(db: Path) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).trials


def _check_interrupted(proc: subprocess.Popen, err: str, db: Path, running: int = 1) -> tuple[list[int], int]:
    """Exit 130, our one line, no traceback; the trials that were running (1 to ``running``) FAIL with the
    reason, none left RUNNING, no process of the group left. Returns the failed trials' numbers and the count."""
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.splitlines().count(INTERRUPTED) == 1, err  # (Prefect's run log lines may come around it)
    trials = _trials(db)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert 1 <= len(failed) <= running, failed
    assert all(t.user_attrs.get("fail_reason") == INTERRUPTED_REASON for t in failed), failed
    deadline = time.monotonic() + 10
    while group_has_live_member(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_has_live_member(proc.pid), "a process of the interrupted run is still running"
    return [t.number for t in failed], len(trials)


@pytest.mark.slow
def test_ctrl_c_of_mnist_flow_train_exits_130_with_one_line(home: Path, reliability) -> None:
    env = clean_env(home)
    proc = _popen([sys.executable, "-m", "mnist_flow.cli", "train", "--source", "sample", "--epochs", "200",
                   "--hidden", "2048,1024"], env)
    deadline = time.monotonic() + 180
    while _cpu_seconds(proc.pid) < TRAINING_CPU_S:  # past the imports and the data: training (for minutes)
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == [INTERRUPTED], err
    reliability.record("Ctrl-C (SIGINT) of `mnist-flow train`", "exit 130, one line, no traceback",
                       f"exit {proc.returncode}, stderr {len(err.strip().splitlines())} line, no traceback",
                       group="faults")


#: CPU seconds after which `mnist-flow train` is training: its imports and the sample take about 3 s of CPU.
TRAINING_CPU_S = 8.0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _temp_server_port(err: str) -> int:
    match = re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", err)
    assert match, err
    return int(match.group(1))


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _flow_env(home: Path) -> dict[str, str]:
    return clean_env(home, PREFECT_HOME=str(home.parent / "prefect-home"))


FLOW = [str(REPO / "flows" / "mnist.py")]
#: What is interrupted: (command, extra flags, SIGINT to the group as a terminal does, or to the process alone).
ENTRIES = {
    "mnist-flow tune": (["-m", "mnist_flow.cli", "tune"], [], True),
    "python flows/mnist.py": (FLOW, [], True),
    "python flows/mnist.py --workers 2": (FLOW, ["--workers", "2"], True),
    "python flows/mnist.py --workers 2` with `kill -INT` of its process": (FLOW, ["--workers", "2"], False),
}


@pytest.mark.slow
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_ctrl_c_mid_trial_exits_130_with_one_line_and_records_the_trial_as_failed(
        entry: str, home: Path, reliability) -> None:
    command, extra, group = ENTRIES[entry]
    proc = _popen([sys.executable, *command, *SLOW_TRIALS, *extra], _flow_env(home))
    _, err = _interrupt_mid_trial(proc, home / "mnist-flow.db", group=group)
    numbers, total = _check_interrupted(proc, err, home / "mnist-flow.db", running=2 if extra else 1)
    server = ""
    if "Starting temporary server" in err:  # the flow script: its temporary Prefect server is stopped too
        port = _temp_server_port(err)
        deadline = time.monotonic() + 10
        while _listening(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _listening(port)
        server = f"; temporary server on :{port} stopped"
    how = "SIGINT" if not group else "Ctrl-C (SIGINT to the process group)"
    reliability.record(f"{how} of `{entry}` mid-trial",
                       "exit 130, one line of ours, no traceback; the trials FAIL with their reason, none RUNNING, "
                       "no process left",
                       f"exit {proc.returncode}, one line “{INTERRUPTED[:40]}…”, no traceback; trial(s) "
                       f"{', '.join(f'#{n}' for n in numbers)} FAIL (fail_reason “{INTERRUPTED_REASON}”), 0 of "
                       f"{total} RUNNING, no process left{server}", group="faults")


@pytest.mark.slow
def test_sigkill_of_the_flow_script_takes_its_temporary_prefect_server_down(home: Path, reliability) -> None:
    env = _flow_env(home)
    proc = subprocess.Popen([sys.executable, str(REPO / "flows" / "mnist.py"), *SLOW_TRIALS], env=env,
                            cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    try:
        for line in proc.stderr:  # the server is up once the flow run begins
            seen += line
            if "Beginning flow run" in line:
                break
        port = _temp_server_port(seen)
        assert _listening(port)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = time.monotonic()
    while _listening(port) and time.monotonic() - killed_at < 30:
        time.sleep(0.1)
    gone_after = time.monotonic() - killed_at
    assert not _listening(port), "the temporary Prefect server still listens 30 s after its flow was killed"
    assert gone_after < 5
    reliability.record("SIGKILL of `python flows/mnist.py` while its temporary Prefect server runs",
                       "the server dies with it (no listener left)",
                       f"port {port} closed {gone_after:.1f} s after the kill", group="faults")


@pytest.mark.slow
def test_an_error_raised_inside_the_run_is_one_message_on_the_terminal_and_in_the_flow_run_log(
        home: Path, tmp_path: Path, reliability) -> None:
    folder = tmp_path / "idx"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(b"not an IDX file")
    env = _flow_env(home)
    proc = subprocess.run([sys.executable, str(REPO / "flows" / "mnist.py"), "--source", "dir", "--data-dir",
                           str(folder)], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 2, err
    assert "Traceback" not in err and 'File "' not in err, err
    assert "Beginning flow run" in err  # the error came after Prefect had created the run
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "train-images-idx3-ubyte" in ours[0] and proc.stdout == ""
    # what the run logged through Prefect's API: the temporary server's database
    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as con:
        logged = [row[0] for row in con.execute("SELECT message FROM log WHERE flow_run_id IS NOT NULL")]
    failures = [m for m in logged if "DataError" in m]
    assert failures and not [m for m in logged if "Traceback" in m or 'File "' in m], logged
    assert any("Fix: " in m and "train-images-idx3-ubyte" in m for m in failures), failures
    reliability.record("corrupt data found by the `fetch_data` task, after Prefect created the run "
                       "(`python flows/mnist.py --source dir`)",
                       "exit 2; one message on the terminal and in the flow-run log; no traceback anywhere",
                       f"exit 2, 1 error line, 0 tracebacks on stderr; flow-run log: {len(failures)} one-line "
                       f"records of the DataError with its fix, 0 tracebacks in {len(logged)} records",
                       group="bad input")
