"""The database unreachable for a while: SQLite busy, PostgreSQL stopped and restarted, past the retry budget."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from rel_helpers import dead_port
from testlib import PrivatePostgres, private_postgres_missing

from mnist_flow.cli import main as cli_main
from mnist_flow.errors import DatabaseUnavailableError
from mnist_flow.registry.store import Lineage, Registry
from mnist_flow.storage import db
from mnist_flow.training.model import MLP

NO_PRIVATE_PG = private_postgres_missing()


def _register(reg: Registry, key: str):
    torch.manual_seed(0)
    return reg.register("mnist", MLP((8,)).eval(), sidecar={"classes": list(range(10))}, params={},
                        metrics={"test_accuracy": 0.9}, lineage=Lineage("mnist", "fp"),
                        idempotency_key=key)


class _RecordingClock:
    """Stands in for the ``time`` module inside mnist_flow.storage.db: backoff sleeps are recorded, not slept."""

    def __init__(self, delays: list[float]) -> None:
        self.sleep = delays.append
        self.monotonic, self.time = time.monotonic, time.time


def _hold_exclusive_lock(path: Path, seconds: float, locked: threading.Event,
                         times: dict[str, float] | None = None) -> None:
    con = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        con.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(seconds)
        if times is not None:
            times["releasing"] = time.monotonic()  # nobody else can have written before this instant
        con.execute("COMMIT")
    finally:
        con.close()


def test_sqlite_locked_by_another_writer_for_2s_registration_waits_and_succeeds(tmp_path: Path,
                                                                               reliability) -> None:
    path = tmp_path / "mnist-flow.db"
    reg = Registry(f"sqlite:///{path}", str(tmp_path / "artifacts"))
    reg.migrate()
    locked = threading.Event()
    times: dict[str, float] = {}
    holder = threading.Thread(target=_hold_exclusive_lock, args=(path, 2.0, locked, times))
    holder.start()
    try:
        assert locked.wait(5)
        start = time.monotonic()
        version = _register(reg, "busy-1")
        done = time.monotonic()
        waited = done - start
    finally:
        holder.join()
        reg.dispose()
    # it waited for the other writer: an ordering, not a duration, so a slow machine cannot break it
    assert version.version == 1 and done > times["releasing"]
    reliability.record("SQLite database locked (BEGIN EXCLUSIVE) by another connection for 2 s during a registry write",
                       "the write waits/retries and succeeds", f"registered v1 after {waited:.1f} s, no error",
                       group="faults")


def test_sqlite_busy_past_the_retry_budget_names_the_database_and_the_fix(tmp_path: Path, reliability,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_S", 0.05)
    delays: list[float] = []
    monkeypatch.setattr(db, "time", _RecordingClock(delays))
    path = tmp_path / "mnist-flow.db"
    reg = Registry(f"sqlite:///{path}", str(tmp_path / "artifacts"))
    reg.migrate()
    locked = threading.Event()
    holder = threading.Thread(target=_hold_exclusive_lock, args=(path, 3.0, locked))
    holder.start()
    try:
        assert locked.wait(5)
        with pytest.raises(DatabaseUnavailableError) as caught:
            _register(reg, "busy-2")
    finally:
        holder.join()
        reg.dispose()
    text = str(caught.value)
    assert str(path) in text and "locked" in text and caught.value.fix and "MNIST_FLOW_DATABASE_URL" in text
    assert len(delays) == 7 and delays[-1] > 4 * delays[0]  # 8 attempts with exponential backoff
    assert Registry(f"sqlite:///{path}", str(tmp_path / "artifacts")).list_versions() == []
    reliability.record("SQLite locked for longer than the retry budget",
                       "DatabaseUnavailableError naming the database and the fix",
                       f"{len(delays) + 1} attempts, backoff {delays[0]:.2f}..{delays[-1]:.2f} s, then: "
                       f"{text.splitlines()[0][:90]}…", group="faults")


@pytest.mark.skipif(bool(NO_PRIVATE_PG), reason=str(NO_PRIVATE_PG))
def test_postgres_stopped_and_restarted_during_a_registry_write_retries_and_succeeds(tmp_path: Path,
                                                                                     reliability) -> None:
    # A private server: stopping the machine's own would fail any test running beside this one (pytest -n 2).
    with PrivatePostgres() as pg:
        url = pg.createdb("registry").replace("postgresql://", "postgresql+psycopg://")
        reg = Registry(url, str(tmp_path / "artifacts"))
        reg.migrate()
        _register(reg, "before")  # a pooled connection exists and will be broken by the restart
        outage: dict[str, float] = {}

        def restart() -> None:
            pg.start()
            outage["up"] = time.monotonic()

        try:
            pg.stop()  # fast shutdown, as `pg_ctlcluster stop`: every connection is closed
            outage["down"] = time.monotonic()
            restarter = threading.Timer(2.0, restart)
            restarter.start()
            try:
                start = time.monotonic()
                version = _register(reg, "during-outage")
                took = time.monotonic() - start
            finally:
                restarter.join()
        finally:
            reg.dispose()
    assert version.version == 2
    reliability.record("PostgreSQL stopped, restarted 2 s later, while a registry write runs",
                       "the write retries with backoff and succeeds",
                       f"server down {outage['up'] - outage['down']:.1f} s; registered v2 after {took:.1f} s",
                       group="faults")


def test_unreachable_postgres_past_the_budget_masks_the_password_and_says_what_to_do(
        tmp_path: Path, reliability, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(db, "time", _RecordingClock([]))
    url = f"postgresql+psycopg://mnist:s3cret-pw@127.0.0.1:{dead_port()}/registry"
    reg = Registry(url, str(tmp_path / "artifacts"))
    with pytest.raises(DatabaseUnavailableError) as caught:
        _register(reg, "x")
    text = str(caught.value)
    assert "s3cret-pw" not in text and "mnist:***@127.0.0.1" in text and "Fix:" in text

    # the CLI in-process (backoff sleeps skipped): one message, exit 2
    monkeypatch.setenv("MNIST_FLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MNIST_FLOW_DATABASE_URL", url)
    code = cli_main(["registry", "list"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "s3cret-pw" not in out + err and "***" in err
    assert "Traceback" not in err and err.startswith("error: Cannot use the database")
    reliability.record("PostgreSQL unreachable (URL with a password) past the retry budget, library and "
                       "`mnist-flow registry list`",
                       "error names the masked URL and the fix; exit 2, no traceback",
                       err.strip().replace("\n", " ")[:160], group="faults")


# --- the database lost or damaged (issue 15, class 3) -------------------------------------------------------------

def _populated(home: Path) -> Path:
    """A home whose database holds an Optuna study (one finished trial) and one registered model."""
    import optuna

    url = f"sqlite:///{home / 'mnist-flow.db'}"
    storage = db.optuna_storage(url)
    study = optuna.create_study(storage=storage, study_name="mnist-study", direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    db.dispose_storage(storage)
    with Registry(url, str(home / "artifacts")) as reg:
        torch.manual_seed(0)
        reg.register("mnist", MLP((8,)).eval(), sidecar={"classes": list(range(10))}, params={},
                     metrics={"test_accuracy": 0.9}, lineage=Lineage("mnist", "fp", study_name="mnist-study", trial_number=0), require_study=True)
    return home / "mnist-flow.db"


def _damage(path: Path, how: str) -> None:
    if how == "corrupt":
        with open(path, "r+b") as handle:  # the header and the first pages overwritten: not a database any more
            handle.write(os.urandom(8192))
        for extra in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            extra.unlink(missing_ok=True)
        return
    statements = {
        "registry revision": "UPDATE mnist_flow_alembic_version SET version_num = 'ffff9999'",
        "optuna revision": "UPDATE alembic_version SET version_num = 'v99.0.0.z'",
        "registry table dropped": "DROP TABLE mnist_flow_decisions",
        "optuna table dropped": "DROP TABLE trial_values",
    }
    with sqlite3.connect(path) as con:
        con.execute(statements[how])


DAMAGE = [("corrupt", ["registry", "list"], "damaged or not a database"),
          ("corrupt", ["report", "--out", "{out}"], "damaged or not a database"),
          ("registry revision", ["registry", "history"], "schema revision this mnist-flow does not know"),
          ("optuna revision", ["report", "--out", "{out}"], "cannot be used by this Optuna"),
          ("registry table dropped", ["registry", "history"], "mnist_flow_decisions"),
          ("optuna table dropped", ["report", "--out", "{out}"], "trial_values"),
          ("optuna table dropped", ["tune", "--source", "sample", "--n-trials", "1", "--max-epochs", "1"],
           "trial_values")]


@pytest.mark.parametrize("how,args,expected", DAMAGE, ids=[f"{d[0]}-{d[1][0]}" for d in DAMAGE])
def test_a_damaged_database_gives_one_clear_message(how: str, args: list[str], expected: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                    reliability) -> None:
    path = _populated(tmp_path / "home")
    _damage(path, how)
    monkeypatch.setenv("MNIST_FLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MNIST_FLOW_THREADS", "1")
    before = path.read_bytes() if how == "corrupt" else None
    capsys.readouterr()  # what building the database printed
    code = cli_main([a.format(out=tmp_path / "report") for a in args])
    out, err = capsys.readouterr()
    assert code == 2, err
    message = err[err.find("error: "):]  # `tune` prints its run key first
    assert "error: " in err and expected in message and "\nFix: " in message
    assert "Traceback" not in out + err and len(message.strip().splitlines()) == 2
    if before is not None:
        assert path.read_bytes() == before  # the damaged file is left as it is, for the user to inspect
    reliability.record(f"database damaged ({how}), then `mnist-flow {' '.join(args[:2])}`",
                       "one message naming the cause and the fix, exit 2, no traceback",
                       message.splitlines()[0][:130], group="faults")


@pytest.mark.parametrize("args", [["registry", "list"], ["registry", "history"], ["registry", "show", "1"],
                                  ["report", "--out", "{out}"], ["dashboard", "--port", "0"]])
def test_a_mistyped_sqlite_path_is_not_created_by_read_only_commands(args: list[str], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture,
                                                                    reliability) -> None:
    typo = tmp_path / "hoem" / "mnist-flow.db"
    monkeypatch.setenv("MNIST_FLOW_DATABASE_URL", f"sqlite:///{typo}")
    monkeypatch.setenv("MNIST_FLOW_HOME", str(tmp_path / "home"))
    code = cli_main([a.format(out=tmp_path / "report") for a in args])
    _, err = capsys.readouterr()
    assert code == 2 and str(typo) in err and "Traceback" not in err
    assert not typo.exists() and not typo.parent.exists()
    reliability.record(f"mistyped SQLite path, `mnist-flow {' '.join(args[:2])}`",
                       "says there is no database there; creates nothing", err.splitlines()[0][:110],
                       group="bad input")


def _tiny_run(home: Path) -> tuple:
    from mnist_flow import pipeline
    from mnist_flow.params import RunParams
    from mnist_flow.settings import Settings

    settings = Settings(home=home)
    params = RunParams.parse(source="sample", n_trials=1, max_epochs=1, final_epochs=1, hidden1_min=64,
                                      hidden1_max=64, hidden2_min=64, hidden2_max=64, batch_size=256)
    prepared = pipeline.prepare(pipeline.load_data(params, settings), val_fraction=0.1, seed=0)
    url = settings.resolved_database_url
    tuned = pipeline.tune(prepared, params, url, run_key="lost-db")
    study, best = tuned.study, tuned.best
    config = pipeline.final_config(best, params)
    model, history = pipeline.fit_best(prepared, config)
    return prepared, study, best, model, config, history, pipeline.evaluate_test(model, prepared), settings


@pytest.mark.parametrize("loss", ["deleted", "replaced"])
def test_database_deleted_or_replaced_mid_run_registers_nothing(loss: str, tmp_path: Path, reliability) -> None:
    import optuna

    from mnist_flow import pipeline
    from mnist_flow.errors import MnistFlowError

    home = tmp_path / "home"
    prepared, study, best, model, config, history, test, settings = _tiny_run(home)
    path = home / "mnist-flow.db"
    for suffix in ("", "-wal", "-shm"):  # what `rm mnist-flow.db*` does between the tune and the register stage
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    if loss == "replaced":  # another study database in its place (e.g. restored from the wrong backup)
        storage = db.optuna_storage(settings.resolved_database_url)
        optuna.create_study(storage=storage, study_name="another-study")
        db.dispose_storage(storage)
    with Registry.from_settings(settings) as reg, pytest.raises(MnistFlowError) as caught:
        pipeline.register_and_decide(
            reg,
            pipeline.Candidate(prepared, model, config, history, test, study_name=study.study_name,
                               trial_number=best.number, run_key="lost-db", flow_run_id=None),
            margin=0.0, alpha=0.05, require_study=True)  # as the flow's register stage does
    text = str(caught.value)
    assert study.study_name in text and "not registered" in text and "Fix:" in text
    if loss == "deleted":
        assert not path.exists()  # no new, empty database with a champion pointing at nothing
    else:
        with Registry.from_settings(settings) as reg:
            assert reg.list_versions() == [] and reg.history() == []
    reliability.record(f"SQLite database {loss} between the tune and the register stage",
                       "registration refused (the study is gone), no new database, no champion",
                       text.splitlines()[0][:130], group="faults")


def _tune_done(path: Path, n_trials: int) -> bool:
    """Whether the study in ``path`` has ``n_trials`` finished trials and none running (read-only)."""
    if not path.exists():
        return False
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2) as con:
            states = [row[0] for row in con.execute("SELECT state FROM trials")]
    except sqlite3.Error:
        return False
    return sum(s in ("COMPLETE", "PRUNED") for s in states) >= n_trials and "RUNNING" not in states


@pytest.mark.slow
def test_a_flow_run_whose_database_is_deleted_during_the_final_fit_registers_nothing(tmp_path: Path,
                                                                                    reliability) -> None:
    import sys

    from rel_helpers import FAST_TUNE, REPO, clean_env

    home = tmp_path / "home"
    path = home / "mnist-flow.db"
    env = clean_env(home, PREFECT_HOME=str(tmp_path / "prefect"))
    # two quick trials, then a final fit of a few seconds (a wide network) to delete the database in
    args = [*FAST_TUNE, "--n-trials", "2", "--max-epochs", "1", "--final-epochs", "40", "--workers", "1", "--hidden1-max", "2048",
            "--hidden1-min", "2048"]
    proc = subprocess.Popen([sys.executable, str(REPO / "flows" / "mnist.py"), *args], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not _tune_done(path, 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the tune stage did not finish in time"
            time.sleep(0.05)
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 2, err[-3000:]
    assert "no longer exists" in err and "not registered" in err
    assert not path.exists()  # no new, empty database holding a champion whose study is gone
    reliability.record("`python flows/mnist.py`: the SQLite database deleted after the tune stage, during the final fit",
                       "the register stage refuses (the study is gone): exit 2, no new database, no champion",
                       "exit 2: " + err[err.find("The database"):][:110], group="faults")
