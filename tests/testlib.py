"""Helpers shared by the test layers (import with ``from testlib import ...``; conftest modules are not importable)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

IN_CI = bool(os.environ.get("CI"))
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def require_fashion_mnist() -> Path:
    """The Debian package's Fashion-MNIST: a failure in CI (which installs it), a skip elsewhere."""
    if not FASHION_DIR.is_dir():
        message = "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return FASHION_DIR


# PostgreSQL 15 on 127.0.0.1:5432 (trust auth); .ci/run starts it. Not an MNIST_FLOW_* variable: those are settings.
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_admin():
    """A fresh autocommit admin connection: a failure in CI (which starts the server), a skip elsewhere."""
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def file_server(route: Callable[[str], bytes | None], requests: list[str] | None = None) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 (a free port) answering GET ``path`` with ``route(path)`` (None: 404).

    Yields its base URL; every requested path is appended to ``requests``. Stopped on exit.
    """
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if requests is not None:
                requests.append(self.path)
            body = route(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def group_has_live_member(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in the process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@functools.cache
def _prefect_db_template() -> Path | None:
    """The migrated Prefect database of this test session (built on first use; None if that failed)."""
    folder = Path(tempfile.mkdtemp(prefix="prefect-db-template-"))
    atexit.register(shutil.rmtree, folder, True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(folder), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    try:  # Prefect's own command: creates prefect.db and runs every migration, as a server's first start does
        subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database", "reset", "-y"],
                       env=env, capture_output=True, timeout=300, check=True)
    except (OSError, subprocess.SubprocessError):
        pass
    return folder / "prefect.db" if (folder / "prefect.db").is_file() else None


def seed_prefect_home(prefect_home: str | Path) -> None:
    """Give a new PREFECT_HOME a copy of a migrated Prefect database, as a home that has run before has.

    A server's first start in a fresh home runs every one of Prefect's migrations: 16 s of CPU to its health
    check against 5.5 s with the database in place (measured on 2 cores), paid by every flow run's temporary
    server and every ``prefect server start`` of the service tests. The flows/ and review/ tests' Prefect
    test harness still starts on a fresh database. A home that cannot be a folder (a test's on purpose) or
    that has a database already is left alone.
    """
    home = Path(prefect_home)
    if (home / "prefect.db").exists() or (template := _prefect_db_template()) is None:
        return
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    shutil.copyfile(template, home / "prefect.db")
