"""Dashboard notes on trials, and the dashboard server on the study database."""

from __future__ import annotations

import json
import threading
import urllib.request

import optuna
import pytest

from mnist_flow.errors import ConfigError
from mnist_flow.review import dashboard
from mnist_flow.review.dashboard import annotate_finished_trial, annotate_trials, make_dashboard_server, read_note


def _by_state(study: optuna.Study, state: str) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == state]


def test_every_completed_trial_got_a_note_with_its_per_epoch_curve_while_the_study_ran(world):
    complete = _by_state(world.study, "COMPLETE")
    assert len(complete) >= 2
    for trial in complete:
        note = read_note(world.study, trial)
        assert note.startswith(f"## Trial {trial.number}\n")
        for epoch, (acc, loss) in enumerate(zip(trial.user_attrs["val_accuracy"], trial.user_attrs["train_loss"]),
                                            start=1):
            assert f"| {epoch} | {acc:.4f} | {loss:.4f} |" in note
        assert "`lr`=" in note and "`momentum`=" in note
    assert all(read_note(world.study, t) == "" for t in _by_state(world.study, "PRUNED"))


def test_annotating_with_the_registered_version_names_it_on_its_trial_once(world):
    study, version = world.study, world.version
    trial = next(t for t in study.trials if t.number == version.trial_number)

    assert annotate_trials(study, {version.trial_number: version}) == 1
    assert annotate_trials(study, {version.trial_number: version}) == 0  # unchanged notes are not rewritten

    note = read_note(study, trial)
    assert f"Registered model: **mnist v{version.version}** (champion)" in note
    others = [t for t in _by_state(study, "COMPLETE") if t.number != trial.number]
    assert all("Registered model: none" in read_note(study, t) for t in others)


def test_a_note_that_cannot_be_written_does_not_stop_the_study(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(dashboard, "annotate_trials", broken)
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2, callbacks=[annotate_finished_trial])

    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert "could not write the dashboard note of trial #1: database is locked" in caplog.text


def test_the_dashboard_server_serves_the_study_with_its_user_attributes(world):
    server = make_dashboard_server(world.database_url, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/api/studies", timeout=30) as response:
            studies = json.load(response)["study_summaries"]
        study = next(s for s in studies if s["study_name"] == world.study.study_name)
        attrs = {a["key"]: a["value"] for a in study["user_attrs"]}
        assert {"dataset", "fingerprint", "search_space"} <= set(attrs)
        with urllib.request.urlopen(f"{base}/dashboard", timeout=30) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        server.shutdown()
        server.server_close()


def test_the_dashboard_refuses_a_sqlite_database_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="No study database at") as caught:
        make_dashboard_server(f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists() and "Run the flow" in caught.value.fix


def test_the_dashboard_reports_a_port_in_use(world):
    first = make_dashboard_server(world.database_url, "127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match=rf"Cannot listen on 127.0.0.1:{first.server_address[1]}"):
            make_dashboard_server(world.database_url, "127.0.0.1", first.server_address[1])
    finally:
        first.server_close()


def test_a_study_keeps_writing_trials_and_notes_while_the_dashboard_polls_it(tmp_path):
    from mnist_flow.storage.db import optuna_storage

    url = f"sqlite:///{tmp_path / 'busy.db'}"
    study = optuna.create_study(storage=optuna_storage(url), study_name="busy", direction="maximize")
    server = make_dashboard_server(url, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/api/studies"
    stop, polls, errors = threading.Event(), [], []

    def poll() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"{base}/{study._study_id}?after=0", timeout=30) as response:
                    polls.append(len(json.load(response)["trials"]))
            except Exception as exc:
                errors.append(exc)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("val_accuracy", [0.5, 0.6])
        return trial.suggest_float("lr", 1e-3, 0.3, log=True)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        study.optimize(objective, n_trials=30, callbacks=[annotate_finished_trial])
    finally:
        stop.set()
        poller.join(timeout=30)
        server.shutdown()
        server.server_close()

    assert not errors and len(polls) >= 3
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 30
    assert all(read_note(study, t).startswith(f"## Trial {t.number}") for t in study.trials)


@pytest.mark.parametrize(("bind", "allowed", "host", "ok"), [
    ("127.0.0.1", (), "127.0.0.1:8080", True),
    ("127.0.0.1", (), "localhost:8080", True),
    ("127.0.0.1", (), "[::1]:8080", True),
    ("127.0.0.1", (), "LOCALHOST:8080", True),
    ("127.0.0.1", (), "evil.example:8080", False),  # DNS rebinding: the attacker's name, our address
    ("127.0.0.1", (), "127.0.0.1:8081", False),
    ("127.0.0.1", (), "127.0.0.1", False),  # no port means 80
    ("127.0.0.1", (), "127.0.0.1:80x", False),
    ("127.0.0.1", (), "", False),
    ("127.0.0.1", (), "[::1", False),
    ("::1", (), "[::1]:8080", True),
    ("0.0.0.0", (), "10.1.2.3:8080", True),  # every interface: any IP address, no names
    ("0.0.0.0", (), "evil.example:8080", False),
    ("0.0.0.0", ("box.lan",), "box.lan:8080", True),
    ("10.1.2.3", (), "localhost:8080", False),
])
def test_the_dashboard_accepts_only_hosts_that_name_its_bound_address(bind, allowed, host, ok):
    guard = dashboard.GuardedApp(lambda environ, start: [b"ok"], bind, allowed_hosts=allowed)
    guard.port = 8080
    assert guard.host_allowed(host) is ok


def test_a_read_only_dashboard_passes_reads_and_refuses_every_other_method():
    calls, statuses = [], []
    guard = dashboard.GuardedApp(lambda environ, start: calls.append(environ["REQUEST_METHOD"]) or [b"ok"],
                                 "127.0.0.1")
    guard.port = 8080
    for method in ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "PROPFIND"):
        body = guard({"REQUEST_METHOD": method, "HTTP_HOST": "127.0.0.1:8080", "PATH_INFO": "/incompatible-rdb-schema"},
                     lambda status, headers: statuses.append(status))
        if method not in ("GET", "HEAD", "OPTIONS"):
            assert b"read-only" in b"".join(body)
    assert calls == ["GET", "HEAD", "OPTIONS"] and statuses == ["403 Forbidden"] * 5
