"""Engines, URL masking, retries and unreachable databases."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from mnist_flow.errors import DatabaseUnavailableError
from mnist_flow.registry.store import Registry
from mnist_flow.storage import db

UNREACHABLE = "postgresql+psycopg://u:secret@127.0.0.1:1/x"


def test_mask_url_hides_password_in_url():
    assert db.mask_url("postgresql+psycopg://user:s3cr%40t@db.example:5432/mnist") == \
        "postgresql+psycopg://user:***@db.example:5432/mnist"


def test_mask_url_hides_passwords_inside_longer_text():
    text_in = "could not reach postgresql+psycopg://alice:hunter2@h/db (and password=topsecret) after 3 tries"
    masked = db.mask_url(text_in)
    assert "hunter2" not in masked and "topsecret" not in masked
    assert "postgresql+psycopg://alice:***@h/db" in masked


def test_mask_url_leaves_urls_without_password_alone():
    assert db.mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert db.mask_url("postgresql://bob@h/db") == "postgresql://bob@h/db"


def test_make_engine_creates_sqlite_folder_and_sets_pragmas(tmp_path):
    url = f"sqlite:///{tmp_path / 'a' / 'b' / 'x.db'}"
    engine = db.make_engine(url)
    assert not (tmp_path / "a" / "b" / "x.db").exists()  # nothing opened yet
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


def test_an_unreachable_database_names_its_masked_url_and_the_fix():
    from mnist_flow.registry.store import Registry

    registry = Registry(UNREACHABLE, "/nonexistent/artifacts")
    with pytest.raises(DatabaseUnavailableError) as info:
        registry.list_versions("mnist")
    message = str(info.value)
    assert "secret" not in message
    assert "u:***@127.0.0.1:1/x" in message
    assert "MNIST_FLOW_DATABASE_URL" in message


def test_registry_on_unreachable_database_raises_masked_error(tmp_path):
    reg = Registry(UNREACHABLE, str(tmp_path / "art"))
    with pytest.raises(DatabaseUnavailableError) as info:
        reg.names()
    assert "secret" not in str(info.value) and "***" in str(info.value)


def _locked() -> OperationalError:
    import sqlite3

    return OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))


def test_retry_db_retries_transient_errors_then_succeeds():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _locked()
        return "ok"

    assert db.retry_db(flaky, attempts=5, base_delay=0.001) == "ok"
    assert len(calls) == 3


def test_retry_db_gives_up_with_database_unavailable():
    calls = []

    def always_locked():
        calls.append(1)
        raise _locked()

    with pytest.raises(DatabaseUnavailableError, match="check that the database is running"):
        db.retry_db(always_locked, attempts=3, base_delay=0.001, url="postgresql://a:pw@h/d")
    assert len(calls) == 3


def test_optuna_storage_applies_sqlite_pragmas(sqlite_url):
    storage = db.optuna_storage(sqlite_url)
    with storage.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    storage.engine.dispose()
