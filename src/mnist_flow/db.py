"""Database plumbing shared by the registry and the Optuna studies.

One place decides how an engine is built (SQLite pragmas, PostgreSQL pre-ping), how URLs are
shown (passwords masked), and how transient errors are retried before they become a
:class:`~mnist_flow.errors.DatabaseUnavailableError`.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from mnist_flow.errors import ConfigError, DatabaseUnavailableError
from mnist_flow.locks import AdvisoryLock, FileLock, Lock, ThreadLock

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_S = 30
POSTGRES_CONNECT_TIMEOUT_S = 10
UNAVAILABLE_FIX = "check that the database is running and reachable; set MNIST_FLOW_DATABASE_URL"

# scheme://user:password@  -> the password is everything up to the last '@' before a '/' or blank.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^\s/]*)@")
# libpq keyword form: password=secret
_KW_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'[^']*'|\"[^\"]*\"|[^\s,;)]+)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """Return ``url`` (or any text containing URLs) with every password replaced by ``***``."""
    masked = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}***@", str(url))
    return _KW_PASSWORD.sub(lambda m: f"{m.group('head')}***", masked)


def _parse(url: str):  # noqa: ANN202 - sqlalchemy URL
    try:
        return make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"Invalid database URL {mask_url(url)!r}: {mask_url(str(exc))}.",
            fix="Use e.g. sqlite:////abs/path/mnist-flow.db or postgresql+psycopg://user:pass@host/db "
            "in MNIST_FLOW_DATABASE_URL.",
        ) from None


def is_sqlite(url: str) -> bool:
    """True when ``url`` points to SQLite."""
    return _parse(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, or None for in-memory databases."""
    database = _parse(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first, so switching to WAL waits for other writers instead of failing.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _engine_kwargs(url: str) -> dict[str, Any]:
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "postgresql" and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
    return kwargs


def _prepare_sqlite_folder(url: str) -> None:
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str) -> Engine:
    """Build an engine: SQLite gets WAL, a 30 s busy timeout and foreign keys; PostgreSQL pre-pings."""
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        _prepare_sqlite_folder(url)
    try:
        engine = create_engine(url, **_engine_kwargs(url))
    except ImportError as exc:
        raise ConfigError(
            f"No database driver for {mask_url(url)!r}: {exc}.",
            fix="Use sqlite:/// or postgresql+psycopg:// URLs (psycopg 3 is installed with mnist-flow).",
        ) from None
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def unavailable(url: str, exc: BaseException | None = None) -> DatabaseUnavailableError:
    """A DatabaseUnavailableError for ``url`` whose text never shows a password."""
    cause = ""
    if exc is not None:
        detail = getattr(exc, "orig", None) or exc
        first_line = str(detail).strip().splitlines()[0] if str(detail).strip() else type(detail).__name__
        cause = f": {mask_url(first_line)}"
    return DatabaseUnavailableError(f"Cannot use the database {mask_url(url)}{cause}", fix=UNAVAILABLE_FIX)


def is_transient(exc: BaseException) -> bool:
    """Whether an OperationalError is worth retrying (lock contention, lost connection)."""
    if not isinstance(exc, OperationalError):
        return False
    if getattr(exc, "connection_invalidated", False):
        return True
    message = str(getattr(exc, "orig", exc)).lower()
    module = type(getattr(exc, "orig", exc)).__module__
    if module.startswith("sqlite3"):
        return "locked" in message or "busy" in message
    return True  # server databases report connection trouble and deadlocks as OperationalError


def retry_db(fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.1, max_delay: float = 2.0,
             url: str = "") -> T:
    """Call ``fn``, retrying transient OperationalErrors with exponential backoff (capped at ``max_delay``).

    Past the budget (or on a connection error that is not transient) a DatabaseUnavailableError
    naming the masked ``url`` is raised.
    """
    attempts = max(1, attempts)
    for attempt in range(attempts):
        try:
            return fn()
        except OperationalError as exc:
            if not is_transient(exc):
                message = str(getattr(exc, "orig", exc)).lower()
                if "unable to open" in message or "disk i/o" in message:
                    raise unavailable(url, exc) from None
                raise
            if attempt == attempts - 1:
                raise unavailable(url, exc) from None
            # jitter keeps competing processes from retrying in lock-step
            time.sleep(min(max_delay, base_delay * (2**attempt)) * (1 + random.random()))
    raise AssertionError("unreachable")


def check_database(url: str) -> None:
    """Open one connection to ``url``; raise DatabaseUnavailableError (masked URL, fix) if that fails."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError as exc:
        raise unavailable(url, exc) from None
    finally:
        engine.dispose()


def optuna_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
                   failed_trial_callback: Callable[..., None] | None = None):  # noqa: ANN201 - optuna type
    """An Optuna RDBStorage on ``url`` with the same SQLite pragmas and PostgreSQL pre-ping as make_engine."""
    import optuna

    kwargs: dict[str, Any] = {}
    if heartbeat_interval is not None:
        kwargs["heartbeat_interval"] = heartbeat_interval
    if grace_period is not None:
        kwargs["grace_period"] = grace_period
    if failed_trial_callback is not None:
        kwargs["heartbeat_stale_trial_callback"] = failed_trial_callback
    sqlite = is_sqlite(url)
    if sqlite:
        _prepare_sqlite_folder(url)
        # WAL is a property of the file: set it once up front so Optuna's table creation already uses it.
        engine = make_engine(url)
        try:
            retry_db(lambda: engine.connect().close(), url=url)
        finally:
            engine.dispose()

    def build() -> Any:
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **kwargs)
        except DBAPIError as exc:
            if isinstance(exc, OperationalError):
                raise
            raise unavailable(url, exc) from None

    # Optuna creates its tables on first use; processes starting together on a new database would race.
    with database_lock(url, "optuna-schema"):
        storage = retry_db(build, url=url)
    if sqlite:
        event.listen(storage.engine, "connect", _sqlite_on_connect)
        storage.engine.dispose()  # connections opened before the listener lacked the pragmas
    return storage


def database_lock(url: str, name: str) -> Lock:
    """A lock named ``name`` shared by every process using the database at ``url`` (see mnist_flow.locks)."""
    backend = _parse(url).get_backend_name()
    if backend == "postgresql":
        engine = make_engine(url)

        def connect() -> Any:
            try:
                return retry_db(engine.connect, url=url)
            except DBAPIError as exc:
                raise unavailable(url, exc) from None

        return AdvisoryLock(connect, name, on_close=engine.dispose)
    path = sqlite_path(url) if backend == "sqlite" else None
    if path is not None:
        safe = hashlib.sha256(name.encode()).hexdigest()[:12]
        return FileLock(f"{path}.{safe}.lock")
    return ThreadLock()


def dispose_storage(storage: Any) -> None:
    """Close an Optuna RDBStorage's session and pooled connections (other storages: nothing to do).

    SQLAlchemy replaces a disposed pool with an empty one, so a study on ``storage`` stays readable:
    a later read opens a fresh connection.
    """
    remove_session = getattr(storage, "remove_session", None)
    if callable(remove_session):
        remove_session()
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()
