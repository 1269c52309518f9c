"""Security: safetensors only, tampered artifacts refused, passwords masked, loopback binds, confined paths."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import pytest
import torch
from rel_helpers import REPO

from mnist_flow import artifacts, pipeline, registry as registry_lib
from mnist_flow.cli import main as cli_main
from mnist_flow.errors import ArtifactIntegrityError, ConfigError
from mnist_flow.model import MLP
from mnist_flow.registry import Registry

UNSAFE = re.compile(r"\btorch\.load\b|\bimport pickle\b|\bpickle\.loads?\b|\bcloudpickle\b|\bdill\b|"
                    r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|\bjoblib\.load\b|\btorch\.jit\.load\b")


def _register(reg: Registry, key: str | None = None, name: str = "mnist"):  # noqa: ANN202
    torch.manual_seed(0)
    return reg.register(name, MLP((8,)).eval(), sidecar={"classes": list(range(10))}, params={},
                        metrics={"test_accuracy": 0.9}, dataset_name="mnist", dataset_fingerprint="fp",
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
    from mnist_flow import dashboard

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

    from mnist_flow.db import mask_url

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
    from mnist_flow.db import make_engine

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

    from mnist_flow import db
    from mnist_flow.errors import DatabaseUnavailableError

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
