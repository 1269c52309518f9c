"""Migrations: empty and existing databases, next to Optuna, and from concurrent processes."""

from __future__ import annotations

import optuna
import pytest
from registry_helpers import run_concurrently
from sqlalchemy import inspect, text

from mnist_flow.registry import migrations
from mnist_flow.storage import db

MIGRATE_SCRIPT = """
import sys, time
from mnist_flow.storage import db
from mnist_flow.registry import migrations
start_at, url = float(sys.argv[1]), sys.argv[2]
time.sleep(max(0.0, start_at - time.time()))
engine = db.make_engine(url)
migrations.upgrade(engine)
engine.dispose()
"""


def _version_rows(url: str) -> list[str]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(f"SELECT version_num FROM {migrations.VERSION_TABLE}")).scalars())
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrate_empty_sqlite_creates_tables_and_one_version_row(registry, sqlite_url):
    registry.migrate()
    assert {"mnist_flow_model_versions", "mnist_flow_aliases", "mnist_flow_decisions",
            "mnist_flow_alembic_version"} <= _tables(sqlite_url)
    assert _version_rows(sqlite_url) == [migrations.head_revision()]


def test_migrate_twice_is_a_no_op(registry, sqlite_url):
    registry.migrate()
    registry.migrate()
    assert _version_rows(sqlite_url) == [migrations.head_revision()]


@pytest.mark.parametrize("optuna_first", [True, False])
def test_migrations_coexist_with_optuna_tables(registry, sqlite_url, optuna_first):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db.sqlite_path(sqlite_url).parent.mkdir(parents=True, exist_ok=True)  # plain Optuna does not create it
    if optuna_first:
        optuna.create_study(study_name="s", storage=sqlite_url)
        registry.migrate()
    else:
        registry.migrate()
        optuna.create_study(study_name="s", storage=sqlite_url)
    registry.migrate()
    tables = _tables(sqlite_url)
    assert {"alembic_version", "mnist_flow_alembic_version", "studies", "mnist_flow_model_versions"} <= tables
    assert _version_rows(sqlite_url) == [migrations.head_revision()]
    study = optuna.load_study(study_name="s", storage=db.optuna_storage(sqlite_url))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2


def test_concurrent_migrations_on_fresh_sqlite_file(sqlite_url):
    run_concurrently(MIGRATE_SCRIPT, [[sqlite_url]] * 4)
    assert _version_rows(sqlite_url) == [migrations.head_revision()]


def test_concurrent_migrations_on_fresh_postgres_database(pg_url):
    run_concurrently(MIGRATE_SCRIPT, [[pg_url]] * 4)
    assert _version_rows(pg_url) == [migrations.head_revision()]
    assert "mnist_flow_model_versions" in _tables(pg_url)
