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


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port of ``address`` that was free a moment ago (nothing listens on it)."""
    import socket

    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


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


def _pg_bin(name: str) -> str:
    """A PostgreSQL server program (Debian keeps them in /usr/lib/postgresql/<version>/bin, off the PATH)."""
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    return shutil.which(name) or f"/usr/lib/postgresql/15/bin/{name}"


def private_postgres_missing() -> str | None:
    """Why :class:`PrivatePostgres` cannot run here (None when it can)."""
    import pwd

    if os.geteuid() != 0:
        return "needs root to run a private PostgreSQL as the postgres user"
    if not Path(_pg_bin("initdb")).exists():
        return "needs PostgreSQL's initdb"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "needs a postgres system user to run a private PostgreSQL"
    return None


class PrivatePostgres:
    """A throwaway PostgreSQL cluster of one test: initdb in a temporary folder, run as ``postgres`` on a free
    port of ``address``, fsync off, trust auth. A test that stops the database stops this one: the machine's
    server on 127.0.0.1:5432 stays up for every other test, those of a parallel run's other worker included.

    ``stop()`` is PostgreSQL's fast shutdown (what ``pg_ctlcluster stop`` does: clients are disconnected);
    ``start()`` brings it back on the same port. Use as a context manager; everything is removed on exit.
    """

    def __init__(self, address: str = "127.0.0.1", *, hba: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        import pwd

        self.address = address
        self.folder = Path(tempfile.mkdtemp(prefix="mnist-flow-pg-", dir="/tmp"))
        self.data, self.log = self.folder / "data", self.folder / "postgres.log"
        self._env = {"PATH": os.environ.get("PATH", ""), **(env or {})}
        user = pwd.getpwnam("postgres")
        os.chown(self.folder, user.pw_uid, user.pw_gid)
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        with (self.data / "pg_hba.conf").open("a") as rules:
            rules.writelines(f"{line}\n" for line in hba)
        self.port = free_port(address)  # the server binds it next

    def _run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], env=self._env, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}\n"
                                 + (self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""))
        return done

    def url(self, database: str = "postgres") -> str:
        """A driver-less URL of ``database`` on this server."""
        return f"postgresql://postgres@{self.address}:{self.port}/{database}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (f"-p {self.port} -c listen_addresses={self.address} -c unix_socket_directories={self.folder} "
                   "-c fsync=off -c max_connections=200")
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
                  "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        """Whether its postmaster (the pid in ``postmaster.pid``) is alive."""
        try:
            return process_alive(int((self.data / "postmaster.pid").read_text().split()[0]))
        except (OSError, IndexError, ValueError):
            return False

    def createdb(self, name: str) -> str:
        self._run(_pg_bin("createdb"), "-h", self.address, "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def __enter__(self) -> PrivatePostgres:
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.running():
                self.stop("immediate")
        except AssertionError:
            # A test may have killed it (its processes carry the test's token) a moment before: pg_ctl then
            # found it dying and gave up ("server does not shut down"). Only a server still up is a failure.
            if self.running():
                raise
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
