"""Security: safetensors only, tampered artifacts refused, passwords masked, loopback binds, confined paths."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import pytest
import torch
from rel_helpers import REPO

from mnist_flow import pipeline
from mnist_flow.cli import main as cli_main
from mnist_flow.errors import ArtifactIntegrityError, ConfigError
from mnist_flow.registry import artifacts
from mnist_flow.registry import store as registry_lib
from mnist_flow.registry.store import Lineage, Registry
from mnist_flow.training.model import MLP

UNSAFE = re.compile(r"\btorch\.load\b|\bimport pickle\b|\bpickle\.loads?\b|\bcloudpickle\b|\bdill\b|"
                    r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|\bjoblib\.load\b|\btorch\.jit\.load\b")


def _register(reg: Registry, key: str | None = None, name: str = "mnist"):
    torch.manual_seed(0)
    return reg.register(name, MLP((8,)).eval(), sidecar={"classes": list(range(10))}, params={},
                        metrics={"test_accuracy": 0.9}, lineage=Lineage("mnist", "fp"),
                        idempotency_key=key)


def test_no_code_path_unpickles_weights(reliability) -> None:
    sources = sorted((REPO / "src" / "mnist_flow").rglob("*.py")) + sorted((REPO / "flows").glob("*.py"))
    hits = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in sources
            for n, line in enumerate(p.read_text().splitlines(), 1) if UNSAFE.search(line)]
    assert hits == []
    assert "safetensors" in inspect.getsource(MLP.from_safetensors)
    reliability.record("grep src/ and flows/ for torch.load, pickle, weights_only=False, allow_pickle",
                       "weights are only read with safetensors", f"{len(sources)} files, 0 hits",
                       group="security")


def test_tampered_artifact_is_refused_with_a_message_that_says_so(tmp_path: Path, reliability) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'db.sqlite'}", str(tmp_path / "artifacts"))
    version = _register(reg)
    weights = Path(version.artifact_uri.removeprefix("file://"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ArtifactIntegrityError) as caught:
        reg.load("mnist", 1)
    reg.dispose()
    text = str(caught.value)
    assert "modified" in text and version.artifact_sha256 in text and "Fix:" in text
    reliability.record("one byte of a registered model.safetensors flipped, then loaded",
                       "refused before deserialising, message says the file was modified",
                       f"ArtifactIntegrityError: “{text.split(':')[0][-40:]}: … the file was modified”",
                       group="security")


def test_database_passwords_are_masked_in_show_summary_logs_and_repr(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture, reliability) -> None:
    secret = "Sup3r-s3cret"
    url = pg_url.replace("postgres@", f"postgres:{secret}@")  # trust auth: the password is accepted and unused
    monkeypatch.setenv("MNIST_FLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MNIST_FLOW_DATABASE_URL", url)
    reg = Registry(url, str(tmp_path / "artifacts"))
    _register(reg)
    caplog.set_level(logging.DEBUG)
    seen = [repr(reg), pipeline.dashboard_command(url)]
    for args in (["registry", "show", "1", "--json"], ["registry", "show", "1"], ["registry", "list"],
                 ["registry", "history"]):
        assert cli_main(args) == 0
        out, err = capsys.readouterr()
        seen += [out, err]
    pipeline.study_storage(url, heartbeat_interval=5, heartbeat_grace=10)  # logs of opening the study storage
    seen.append(caplog.text)
    reg.dispose()
    leaks = [text[max(0, text.find(secret) - 200):text.find(secret) + 50] for text in seen if secret in text]
    assert leaks == []
    assert "***" in seen[0] and "***" in seen[1]
    reliability.record("PostgreSQL URL with a password: `registry show/list/history`, repr, dashboard command, logs",
                       "password never shown (masked as ***)", f"{len(seen)} outputs checked, 0 contain the password",
                       group="security")


def test_servers_bind_loopback_by_default(reliability) -> None:
    from mnist_flow.review import dashboard

    makefile = (REPO / "Makefile").read_text()
    assert dashboard.DEFAULT_HOST == "127.0.0.1"
    assert inspect.signature(dashboard.make_dashboard_server).parameters["host"].default == "127.0.0.1"
    assert "PREFECT_SERVER_API_HOST ?= 127.0.0.1" in makefile  # Prefect's setting, also for the temporary API
    assert "prefect server start --host 127.0.0.1" in makefile  # make server
    wildcard = [str(p.relative_to(REPO)) for p in [*(REPO / "src").rglob("*.py"), *(REPO / "flows").glob("*.py")]
                if re.search(r"[\"']0\.0\.0\.0[\"']", p.read_text())]
    assert wildcard == []
    reliability.record("default bind address of the dashboard server and the Prefect server (make run)",
                       "127.0.0.1 unless the user chooses otherwise",
                       "dashboard 127.0.0.1, PREFECT_SERVER_API_HOST 127.0.0.1, make server --host 127.0.0.1, no 0.0.0.0 in src/ or flows/",
                       group="security")


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../../b", "..", ".hidden", "a\\b", "a b", ""])
def test_names_aliases_and_paths_cannot_escape_the_artifact_root(name: str, tmp_path: Path, reliability) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'db.sqlite'}", str(tmp_path / "root" / "artifacts"))
    with pytest.raises(ConfigError):
        _register(reg, name=name)
    _register(reg)
    with pytest.raises(ConfigError):
        reg.set_alias("mnist", name, 1)
    with pytest.raises(ConfigError):
        artifacts.validate_relpath(f"mnist/{name}/model.safetensors" if name else "")
    reg.dispose()
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and "artifacts" not in p.parts
               and not p.name.startswith("db.sqlite")]
    assert outside == []
    assert registry_lib.NAME_PATTERN.match(name) is None
    reliability.record(f"model name / alias / artifact path {name[:20]!r}", "refused (ConfigError), nothing written "
                       "outside the artifact root", "refused x3, 0 files outside the root", group="security")


# --- passwords with URL delimiters: / @ : % # ? and blanks, raw and URL-encoded (issue 15, class 1) ---------------

#: (password as written in the URL, what SQLAlchemy hands the driver, a fragment that must never be shown)
ODD_PASSWORDS = [
    ("pa/ssS3cretPW", "pa/ssS3cretPW", "ssS3cret"),
    ("se cret S3cretPW", "se cret S3cretPW", "S3cretPW"),
    ("a:b%c#d?e S3cretPW", "a:b%c#d?e S3cretPW", "b%c#d"),
    ("p%40ss%2Fw%3Ard%20S3cretPW", "p@ss/w:rd S3cretPW", "S3cretPW"),
    ("x%25y%23z%3Fq%20S3cretPW", "x%y#z?q S3cretPW", "S3cretPW"),
]


def _fragments(written: str, decoded: str, fragment: str) -> list[str]:
    return [written, decoded, fragment, "S3cret"]


def _leaks(texts: list[str], fragments: list[str]) -> list[str]:
    return [f"{frag!r} in …{text[max(0, text.find(frag) - 60):text.find(frag) + 30]}…" for text in texts
            for frag in fragments if frag in text]


@pytest.mark.parametrize("written,decoded,fragment", ODD_PASSWORDS)
def test_odd_passwords_are_masked_by_the_parser_and_in_free_text(written: str, decoded: str, fragment: str,
                                                                   reliability) -> None:
    from sqlalchemy.engine import make_url

    from mnist_flow.storage.db import mask_url

    url = f"postgresql+psycopg://mnist:{written}@db.example:5432/registry"
    assert make_url(url).password == decoded  # the URL is valid: SQLAlchemy hands the driver this password
    texts = [mask_url(url), mask_url(f"Cannot use the database {url}: refused\nFix: x"), mask_url(f"'{url}'"),
             mask_url(f"error for {decoded!r} and {url}", url), mask_url(f"password='{decoded}' host=db")]
    assert _leaks(texts, _fragments(written, decoded, fragment)) == []
    assert all("***" in t for t in texts) and "mnist:***@db.example:5432/registry" in texts[0]
    reliability.record(f"mask a database URL whose password is {written!r} (raw delimiters or URL-encoded)",
                       "password masked as ***, host/port/database kept",
                       f"{texts[0]}; 5 text forms, 0 leaks", group="security")


def test_a_raw_at_sign_in_the_password_is_refused_without_showing_it(reliability) -> None:
    from mnist_flow.storage.db import make_engine

    url = "postgresql+psycopg://mnist:p@ssS3cretPW@db.example/registry"
    with pytest.raises(ConfigError) as caught:
        make_engine(url)
    text = str(caught.value)
    assert "ssS3cret" not in text and "***" in text and "%40" in text
    reliability.record("database URL with a raw '@' in its password",
                       "refused before connecting: says to URL-encode it (%40), password not shown",
                       text.splitlines()[0][:120], group="security")


@pytest.mark.parametrize("written,decoded,fragment", ODD_PASSWORDS)
def test_unreachable_postgres_with_an_odd_password_never_shows_it(written: str, decoded: str, fragment: str,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture, reliability) -> None:
    from rel_helpers import dead_port

    from mnist_flow.errors import DatabaseUnavailableError
    from mnist_flow.storage import db

    monkeypatch.setattr(db.time, "sleep", lambda _s: None)  # backoff sleeps skipped, attempts kept
    url = f"postgresql+psycopg://mnist:{written}@127.0.0.1:{dead_port()}/registry"
    reg = Registry(url, str(tmp_path / "artifacts"))
    with pytest.raises(DatabaseUnavailableError) as caught:
        _register(reg)
    monkeypatch.setenv("MNIST_FLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MNIST_FLOW_DATABASE_URL", url)
    code = cli_main(["registry", "list"])
    out, err = capsys.readouterr()
    texts = [str(caught.value), repr(reg), out, err, pipeline.dashboard_command(url)]
    assert _leaks(texts, _fragments(written, decoded, fragment)) == []
    assert code == 2 and err.startswith("error: Cannot use the database postgresql+psycopg://mnist:***@127.0.0.1")
    reliability.record(f"PostgreSQL unreachable, password {written!r}: registry error, `registry list`, repr, "
                       "dashboard command", "one message with the masked URL, exit 2, password never shown",
                       err.splitlines()[0][:110], group="security")


@pytest.mark.slow
def test_a_real_flow_run_on_postgres_with_an_odd_password_shows_it_nowhere(pg_url: str, tmp_path: Path,
                                                                          reliability) -> None:
    """stdout/stderr of `python flows/mnist.py`, and the Prefect server's own log and artifact tables."""
    import sqlite3

    from rel_helpers import FAST_TUNE, clean_env, flow_script

    written = "p/a:ss%w#o?r d%40S3cretPW"  # raw / : % # ? and a blank; '@' URL-encoded
    url = pg_url.replace("postgres@", f"postgres:{written}@")  # trust auth: accepted, unused
    home = tmp_path / "home"
    env = clean_env(home, MNIST_FLOW_DATABASE_URL=url, PREFECT_HOME=str(tmp_path / "prefect"),
                    MNIST_FLOW_DASHBOARD_URL="http://admin:dashS3cretPW@127.0.0.1:8080/")
    done = flow_script([*FAST_TUNE, "--n-trials", "2", "--max-epochs", "1", "--final-epochs", "1"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as con:
        logs = [row[0] for row in con.execute("SELECT message FROM log")]
        artifacts = [" ".join(map(str, row)) for row in con.execute("SELECT key, description, data FROM artifact")]
    summary = [line for line in logs if "summary:" in line]
    texts = [done.stdout, done.stderr, *logs, *artifacts]
    assert _leaks(texts, [written, "S3cret", "ss%w#o", "o?r d"]) == []
    assert summary and "postgres:***@" in summary[0] and "postgres:***@" in done.stdout
    assert {a.split()[0] for a in artifacts} >= {"promotion-decision", "mnist-summary", "optuna-dashboard"}
    reliability.record("real flow run (`python flows/mnist.py`) on PostgreSQL, password with / : % # ? blank and "
                       "%40, a dashboard URL with credentials",
                       "password in no output, no Prefect flow-run log line, no Prefect artifact",
                       f"{len(logs)} log lines and {len(artifacts)} artifacts on the Prefect server and the summary "
                       "checked: 0 leaks (summary shows postgres:***@)", group="security")


# --- the dashboard: read-only by default, only for its own Host ------------------------------------------------


def _dashboard_process(database: Path, *extra: str):
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_FLOW_")}
    env.update({"MNIST_FLOW_DATABASE_URL": f"sqlite:///{database}", "MNIST_FLOW_HOME": str(database.parent / "h")})
    proc = subprocess.Popen([sys.executable, "-m", "mnist_flow.cli", "dashboard", "--port", str(port), *extra],
                            env=env, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.communicate()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        assert time.monotonic() < deadline, "the dashboard did not listen in time"
        time.sleep(0.2)


def _request(port: int, method: str, path: str, *, host: str | None = None, origin: str | None = None,
             body: dict | None = None) -> tuple[int, dict]:
    """A real HTTP request (http.client), with the Host and Origin a browser or an attacker's page would send."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest(method, path, skip_host=True)
    conn.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
    if origin:
        conn.putheader("Origin", origin)
    data = json.dumps(body).encode() if body is not None else b""
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, {}


@pytest.mark.slow
def test_the_dashboard_is_read_only_and_answers_only_its_own_host(tmp_path: Path, reliability) -> None:
    import optuna

    database = tmp_path / "studies.db"
    url = f"sqlite:///{database}"
    study = optuna.create_study(storage=url, study_name="precious")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    proc, port = _dashboard_process(database)
    try:
        reads = _request(port, "GET", "/api/studies")
        refused = {f"{method} {path}": _request(port, method, path, body=body) for method, path, body in (
            ("DELETE", "/api/studies/1", None), ("POST", "/api/studies", {"study_name": "new", "directions": []}),
            ("PUT", "/api/studies/1/note", {"version": 0, "body": "defaced"}),
            ("POST", "/api/studies/1/rename", {"study_name": "gone"}), ("PATCH", "/api/studies/1", {}))}
        rebound = [_request(port, "GET", "/api/studies", host=host)[0]
                   for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "")]
        localhost = _request(port, "GET", "/api/studies", host=f"localhost:{port}")[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert reads[0] == 200 and [s["study_name"] for s in reads[1]["study_summaries"]] == ["precious"]
    assert {m: r[0] for m, r in refused.items()} == dict.fromkeys(refused, 403)
    assert all("read-only" in r[1]["reason"] and "--allow-write" in r[1]["reason"] for r in refused.values())
    assert rebound == [421] * 4 and localhost == 200
    assert optuna.get_all_study_names(url) == ["precious"] and len(optuna.load_study(
        study_name="precious", storage=url).trials) == 2
    reliability.record("`DELETE /api/studies/1`, POST, PUT note, rename, PATCH to a running `mnist-flow dashboard`; "
                       "GET with a rebound Host (evil.example), a wrong port, no Host",
                       "writes refused 403 with one message (read-only unless --allow-write); other Hosts 421; "
                       "the study intact",
                       f"{len(refused)}/{len(refused)} writes 403, {len(rebound)}/{len(rebound)} foreign Hosts 421, "
                       "localhost and 127.0.0.1 200; study and its 2 trials intact", group="security")


@pytest.mark.slow
def test_with_allow_write_the_dashboard_edits_but_refuses_cross_site_writes(tmp_path: Path, reliability) -> None:
    import optuna

    database = tmp_path / "studies.db"
    url = f"sqlite:///{database}"
    optuna.create_study(storage=url, study_name="notes").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    proc, port = _dashboard_process(database, "--allow-write")
    try:
        own = _request(port, "PUT", "/api/studies/1/note", body={"version": 1, "body": "reviewed"},
                       origin=f"http://127.0.0.1:{port}")
        cross = _request(port, "PUT", "/api/studies/1/note", body={"version": 2, "body": "defaced"},
                         origin="http://evil.example")
        rebound = _request(port, "DELETE", "/api/studies/1", host="evil.example")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert own[0] in (200, 204), own
    assert cross[0] == 403 and "Cross-site" in cross[1]["reason"]
    assert rebound[0] == 421 and optuna.get_all_study_names(url) == ["notes"]
    reliability.record("`mnist-flow dashboard --allow-write`: a note edited from its own page, the same PUT from "
                       "another Origin, a DELETE with a rebound Host",
                       "own edit accepted; cross-site write 403; foreign Host 421",
                       f"own PUT {own[0]}, cross-site PUT {cross[0]}, rebound DELETE {rebound[0]}; study kept",
                       group="security")
