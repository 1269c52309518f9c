"""Hosts for real on one machine: network namespaces joined to this one by veth pairs, and a private PostgreSQL.

Every namespace is named ``mf<hex>-<n>`` and gets one veth pair on its own /30 of 10.231.<b>.0/24
(host side .1, .5, ...; namespace side .2, .6, ...), so all traffic stays on links made here. Processes
in a namespace reach this machine's services only by the host-side addresses, over TCP. Namespaces and
links are always removed at the end (also after a failure).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import procs


def available() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if not Path(_pg_bin("initdb")).exists():
        return "needs PostgreSQL's initdb"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "needs a postgres system user to run a private PostgreSQL"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Host:
    """One namespace: its name, the host-side interface, and both ends' addresses."""

    ns: str
    host_if: str
    host_addr: str
    ns_addr: str

    def command(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def cut(self) -> None:
        """Pull the cable: the host side of the link goes down (packets are dropped, no reset is sent)."""
        _ip("link", "set", self.host_if, "down")

    def net_inode(self) -> int:
        return os.stat(f"/run/netns/{self.ns}").st_ino


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """``count`` namespaces, each linked to this machine; the first host address is the services' address."""
    tag = uuid.uuid4().hex[:6]
    block = random.randint(0, 255)
    made: list[Host] = []
    try:
        for n in range(count):
            base = 4 * n
            host = Host(f"mf{tag}-{n}", f"mf{tag}h{n}", f"10.231.{block}.{base + 1}", f"10.231.{block}.{base + 2}")
            _ip("netns", "add", host.ns)
            made.append(host)
            _ip("link", "add", host.host_if, "type", "veth", "peer", "name", f"mf{tag}n{n}", "netns", host.ns)
            _ip("addr", "add", f"{host.host_addr}/30", "dev", host.host_if)
            _ip("link", "set", host.host_if, "up")
            _ip("-n", host.ns, "addr", "add", f"{host.ns_addr}/30", "dev", f"mf{tag}n{n}")
            _ip("-n", host.ns, "link", "set", f"mf{tag}n{n}", "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")
            # the services listen on the first host address; reach it through this link's host side
            if n:
                _ip("-n", host.ns, "route", "add", f"{made[0].host_addr}/32", "via", host.host_addr)
        yield made
    finally:
        for host in made:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", host.host_if)  # removes both ends
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", host.ns)


def _pg_bin(name: str) -> str:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    return shutil.which(name) or f"/usr/lib/postgresql/15/bin/{name}"


@contextlib.contextmanager
def private_postgres(address: str, token: str, log_dir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL (initdb in a temp folder, run as `postgres`) listening on ``address`` only.

    Yields a driver-less URL of its database ``mnist``. Trust auth, for the 10.231/16 test links only.
    """
    folder = Path(tempfile.mkdtemp(prefix="mnist-flow-pg-", dir="/tmp"))
    user = pwd.getpwnam("postgres")
    os.chown(folder, user.pw_uid, user.pw_gid)
    data = folder / "data"
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, _pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    with (data / "pg_hba.conf").open("a") as hba:
        hba.write("host all all 10.231.0.0/16 trust\n")
    port = procs.free_port()
    env = {"PATH": os.environ["PATH"], procs.TOKEN_VAR: token}
    server = procs.start("postgres", [*as_postgres, _pg_bin("postgres"), "-D", str(data), "-p", str(port),
                                      "-c", f"listen_addresses={address}", "-c", f"unix_socket_directories={folder}",
                                      "-c", "fsync=off", "-c", "max_connections=200"], env=env, log_dir=log_dir)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([_pg_bin("pg_isready"), "-h", address, "-p", str(port)],
                             capture_output=True).returncode != 0:
            if not server.alive() or time.monotonic() > deadline:
                raise AssertionError(f"private PostgreSQL did not start:\n{procs.tail(server.log)}")
            time.sleep(0.3)
        subprocess.run([_pg_bin("createdb"), "-h", address, "-p", str(port), "-U", "postgres", "mnist"], check=True,
                       capture_output=True)
        yield f"postgresql://postgres@{address}:{port}/mnist"
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
