"""Database plumbing shared by the registry and the Optuna studies.

One place decides how an engine is built (SQLite pragmas, PostgreSQL pre-ping), how URLs are
shown (passwords masked), and how transient errors are retried before they become a
:class:`~mnist_flow.errors.DatabaseUnavailableError`.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus, unquote

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from mnist_flow.errors import (
    ConfigError,
    DatabaseDamagedError,
    DatabaseUnavailableError,
    MnistFlowError,
    StorageError,
)
from mnist_flow.storage.locks import AdvisoryLock, FileLock, Lock, ThreadLock

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_S = 30
POSTGRES_CONNECT_TIMEOUT_S = 10
UNAVAILABLE_FIX = "check that the database is running and reachable; set MNIST_FLOW_DATABASE_URL"

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
# scheme://user:password@host: the password runs to the LAST '@' of the line before any other URL, so a raw
# '/', '@', ':', '#', '?' or blank in it cannot end it early (over-masking is the safe side).
_URL_PASSWORD = re.compile(rf"(?P<head>{_SCHEME}[^\s:/@?#]*:)(?P<pw>(?:(?!{_SCHEME})[^\n])*)@")
# libpq keyword form: password=secret
_KW_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'[^']*'|\"[^\"]*\"|[^\s,;)]+)", re.IGNORECASE)
#: shorter "passwords" are not replaced wherever they appear in a text (that would garble it, and hide nothing)
_MIN_SECRET = 3


def _passwords(url: str) -> set[str]:
    """Every spelling of the password(s) in ``url``: as written, URL-decoded, re-encoded, and as SQLAlchemy parses it."""
    found: set[str] = set()
    for match in _URL_PASSWORD.finditer(url):
        raw = match.group("pw")
        found |= {raw, unquote(raw), quote(unquote(raw), safe=""), quote_plus(unquote(raw))}
    try:
        parsed = make_url(url.strip())
    except Exception:  # noqa: BLE001 - any text: not a URL, nothing more to learn
        parsed = None
    if parsed is not None:
        if parsed.password:
            found |= {str(parsed.password), quote(str(parsed.password), safe="")}
        if parsed.host and "@" in parsed.host:  # a raw '@' in the password: SQLAlchemy cut it at the first one
            found.add(parsed.host.rsplit("@", 1)[0])
    return {secret for secret in found if len(secret) >= _MIN_SECRET and secret != "***"}


def mask_url(url: str, *known: str) -> str:
    """Return ``url`` (or any text containing URLs) with every password replaced by ``***``.

    URLs are parsed the way SQLAlchemy's ``make_url`` does, and, as a fallback for text that is not
    one URL, a password is taken to run from ``user:`` to the last ``@`` of its line. Every spelling
    of a password found in ``url`` or in the ``known`` URLs (raw, URL-decoded, re-encoded) is then
    masked wherever it appears, so a driver message that echoes it does not leak it either.
    """
    text = str(url)
    secrets = _passwords(text)
    for other in known:
        if other:
            secrets |= _passwords(str(other))
    masked = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}***@", text)
    masked = _KW_PASSWORD.sub(lambda m: f"{m.group('head')}***", masked)
    for secret in sorted(secrets, key=len, reverse=True):
        masked = masked.replace(secret, "***")
    return masked


def _parse(url: str):
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"Invalid database URL {mask_url(url)!r}: {mask_url(str(exc), url)}.",
            fix="Use e.g. sqlite:////abs/path/mnist-flow.db or postgresql+psycopg://user:pass@host/db "
            "in MNIST_FLOW_DATABASE_URL.",
        ) from None
    if parsed.host and "@" in parsed.host:
        raise ConfigError(
            f"Invalid database URL {mask_url(url)!r}: its password (or user name) holds a raw '@'.",
            fix="URL-encode special characters of the user name and password in MNIST_FLOW_DATABASE_URL: "
            "'@' as %40, '/' as %2F, ':' as %3A, '%' as %25, '#' as %23, '?' as %3F, a blank as %20.",
        )
    return parsed


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
    from mnist_flow.storage.fsutil import raise_storage_error

    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise_storage_error(exc, path, f"the database {path}", fix=STORAGE_FIX)
            raise


STORAGE_FIX = (
    "Free some space or make the folder writable, or set MNIST_FLOW_DATABASE_URL (or MNIST_FLOW_HOME) "
    "to a writable disk with room."
)
DAMAGED_FIX = (
    "Restore the database from a backup, or move it away and set MNIST_FLOW_DATABASE_URL to a new "
    "database (a new one starts with no studies and no models)."
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def permanent_error(url: str, exc: BaseException) -> MnistFlowError | None:
    """The one clear error for a database failure that no retry fixes (else None).

    A corrupt file, a dropped table, a full disk or a read-only database raise this at once,
    instead of a raw driver traceback or a retry loop.
    """
    detail = getattr(exc, "orig", None) or exc
    message = str(detail).lower()
    where = mask_url(url)
    cause = mask_url(_first_line(detail), url)
    code = getattr(detail, "sqlstate", None) or getattr(detail, "pgcode", None) or ""
    if any(s in message for s in ("file is not a database", "malformed", "file is encrypted")):
        return DatabaseDamagedError(
            f"The database {where} is damaged or not a database at all: {cause}.", fix=DAMAGED_FIX
        )
    if "no such table" in message or code == "42P01" or ("relation" in message and "does not exist" in message):
        return DatabaseDamagedError(
            f"The database {where} lacks a table mnist-flow needs ({cause}): it was dropped "
            "or the database was damaged.",
            fix=DAMAGED_FIX,
        )
    if "database or disk is full" in message or code == "53100" or "no space left on device" in message:
        return StorageError(f"Cannot write to the database {where}: the disk is full ({cause}).", fix=STORAGE_FIX)
    if "readonly database" in message or "read-only" in message or code == "25006":
        return StorageError(f"Cannot write to the database {where}: it is read-only ({cause}).", fix=STORAGE_FIX)
    if "unable to open database file" in message:
        path = sqlite_path(url) if is_sqlite(url) else None
        if path is not None and not os.access(path.parent, os.W_OK):
            return StorageError(
                f"Cannot open the database {where}: its folder {path.parent} is read-only or not writable ({cause}).",
                fix=STORAGE_FIX,
            )
    return None


def database_must_exist(url: str, *, fix: str | None = None, message: str | None = None) -> None:
    """Refuse a SQLite URL whose file does not exist (opening it would create an empty database)."""
    path = sqlite_path(url) if is_sqlite(url) else None
    if path is not None and not path.exists():
        raise DatabaseUnavailableError(
            message or f"There is no database at {path}: nothing was ever stored there.",
            fix=fix
            or "Check MNIST_FLOW_HOME and MNIST_FLOW_DATABASE_URL (a mistyped path?), or run the flow "
            "(`make run`) or `mnist-flow tune` first to create it.",
        )


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
        cause = f": {mask_url(first_line, url)}"
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


def retry_db(
    fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.1, max_delay: float = 2.0, url: str = ""
) -> T:
    """Call ``fn``, retrying transient OperationalErrors with exponential backoff (capped at ``max_delay``).

    Past the budget (or on a connection error that is not transient) a DatabaseUnavailableError
    naming the masked ``url`` is raised.
    """
    attempts = max(1, attempts)
    for attempt in range(attempts):
        try:
            return fn()
        except DBAPIError as exc:
            permanent = permanent_error(url, exc)
            if permanent is not None:
                raise permanent from None
            if not isinstance(exc, OperationalError):
                raise
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


def optuna_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    failed_trial_callback: Callable[..., None] | None = None,
):
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
        check_optuna_schema(url)
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **kwargs)
        except DBAPIError as exc:
            if isinstance(exc, OperationalError) or permanent_error(url, exc) is not None:
                raise  # retry_db retries it or turns it into one clear error
            raise unavailable(url, exc) from None
        except RuntimeError as exc:  # Optuna's schema check: a revision this Optuna does not know
            raise DatabaseDamagedError(
                f"The Optuna tables of the database {mask_url(url)} cannot be used by this Optuna "
                f"({optuna.__version__}): {mask_url(_first_line(exc), url)}",
                fix="Install the Optuna version that wrote them (or run `optuna storage upgrade` if it is older), "
                "or set MNIST_FLOW_DATABASE_URL to another database.",
            ) from None

    # Optuna creates its tables on first use; processes starting together on a new database would race.
    with database_lock(url, "optuna-schema"):
        storage = retry_db(build, url=url)
    if sqlite:
        event.listen(storage.engine, "connect", _sqlite_on_connect)
        storage.engine.dispose()  # connections opened before the listener lacked the pragmas
    return storage


def check_optuna_schema(url: str) -> None:
    """Refuse a database whose Optuna tables are partly missing (Optuna would re-create them empty, losing trials).

    A database without Optuna's ``alembic_version`` table has never held a study: nothing to check.
    """
    from optuna.storages._rdb import models

    engine = make_engine(url)
    try:
        tables = set(retry_db(lambda: inspect(engine).get_table_names(), url=url))
    finally:
        engine.dispose()
    if "alembic_version" not in tables:
        return
    missing = sorted(set(models.BaseModel.metadata.tables) - tables)
    if missing:
        raise DatabaseDamagedError(
            f"The database {mask_url(url)} holds Optuna studies but lacks the table(s) {', '.join(missing)}: "
            "they were dropped or the database was damaged.",
            fix=DAMAGED_FIX,
        )


def database_lock(url: str, name: str) -> Lock:
    """A lock named ``name`` shared by every process using the database at ``url`` (see mnist_flow.storage.locks)."""
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
