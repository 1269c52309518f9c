"""Real processes for end-to-end tests: start in their own process group, wait for health, always stop.

Every process started here carries ``E2E_TOKEN`` in its environment, and so do its children (the
worker's flow-run processes start their own sessions, so a group kill alone would miss them):
:func:`leftovers` finds any that survived by that token. Reused by the scale-out tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from testlib import free_port, group_has_live_member, process_alive, seed_prefect_home

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
TOKEN_VAR = "E2E_PROCESS_TOKEN"  # not MNIST_FLOW_*: load_settings() refuses unknown ones


def tail(path: Path, chars: int = 4000) -> str:
    """The end of a log file (empty when missing)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


@dataclass
class Proc:
    """A process started in a new session; ``stop()`` ends its whole process group."""

    name: str
    popen: subprocess.Popen
    log: Path
    stopped: bool = field(default=False)

    @property
    def pgid(self) -> int:
        return self.popen.pid  # start_new_session: the leader's pid is the group id

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the group, wait, then SIGKILL whatever is left of it."""
        if self.stopped:
            return
        self.stopped = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_exists(self.pgid):
            self.popen.poll()
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader keeps the group "existing"; reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    return group_has_live_member(pgid)


def start(name: str, cmd: Sequence[str], *, env: Mapping[str, str], log_dir: Path,
          cwd: Path = REPO) -> Proc:
    """Start ``cmd`` in its own session, stdout and stderr to ``log_dir/name.log``."""
    log = log_dir / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        popen = subprocess.Popen(list(cmd), env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    return Proc(name, popen, log)


def run(cmd: Sequence[str], *, env: Mapping[str, str], timeout: float, cwd: Path = REPO,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion in its own session (killed as a group on timeout)."""
    popen = subprocess.Popen(list(cmd), env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        out, _ = popen.communicate()
        raise AssertionError(f"{' '.join(cmd)} ran past {timeout}s; output:\n{out[-6000:]}") from None
    result = subprocess.CompletedProcess(list(cmd), popen.returncode, out, "")
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}; output:\n{out[-6000:]}")
    return result


def wait_http(url: str, *, proc: Proc, timeout: float = 90.0) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log) if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited {proc.popen.returncode} before {url} answered:\n"
                                 f"{tail(proc.log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s:\n{tail(proc.log)}")


def new_token() -> str:
    return uuid.uuid4().hex


def leftovers(token: str) -> list[int]:
    """Pids of live processes whose environment carries ``TOKEN_VAR=token``."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                pid = int(environ.parent.name)
                if pid != os.getpid() and process_alive(pid):
                    found.append(pid)
        except (OSError, ValueError):
            continue
    return found


def kill_leftovers(token: str) -> list[int]:
    """SIGKILL every surviving process that carries ``token``; returns their pids."""
    pids = leftovers(token)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


@dataclass
class PrefectServer:
    """A running ``prefect server start``: its API URL and the environment clients should use."""

    api_url: str
    env: dict[str, str]
    proc: Proc


def base_env(tmp: Path, token: str, **extra: str) -> dict[str, str]:
    """An environment for service processes: own PREFECT_HOME and MNIST_FLOW_HOME, analytics off, no profile."""
    # No inherited Prefect profile or mnist-flow setting (load_settings() refuses unknown MNIST_FLOW_*).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MNIST_FLOW_"))}
    env.update({
        TOKEN_VAR: token,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(tmp / "prefect"),
        "MNIST_FLOW_HOME": str(tmp / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_COLORS": "false",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        **extra,
    })
    (tmp / "prefect").mkdir(parents=True, exist_ok=True)
    seed_prefect_home(env["PREFECT_HOME"])
    return env


@contextlib.contextmanager
def prefect_server(tmp: Path, env: Mapping[str, str], *, database_url: str | None = None,
                   timeout: float = 120.0) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free loopback port (SQLite in PREFECT_HOME, or ``database_url``)."""
    port = free_port()
    server_env = dict(env)
    if database_url:
        server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    proc = start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                    str(port), "--analytics-off"], env=server_env, log_dir=tmp / "logs")
    try:
        api_url = f"http://127.0.0.1:{port}/api"
        wait_http(f"{api_url}/health", proc=proc, timeout=timeout)
        yield PrefectServer(api_url, {**env, "PREFECT_API_URL": api_url}, proc)
    finally:
        proc.stop()


@contextlib.contextmanager
def stopped_at_exit(started: list[Proc], *, log_chars: int = 6000, timeout: float = 15.0) -> Iterator[list[Proc]]:
    """Stop every process in ``started`` (last first) at the end; print their logs if the body failed."""
    try:
        yield started
    except BaseException:
        for proc in started:
            print(f"--- {proc.name} log ---\n" + tail(proc.log, log_chars))
        raise
    finally:
        for proc in reversed(started):
            proc.stop(timeout=timeout)
