"""Hosts for real on one machine: network namespaces joined to this one by veth pairs, and a private PostgreSQL.

Every namespace is named ``mf<hex>-<n>`` and gets one veth pair on its own /30 of 10.231.<b>.0/24
(host side .1, .5, ...; namespace side .2, .6, ...), so all traffic stays on links made here. Processes
in a namespace reach this machine's services only by the host-side addresses, over TCP. Namespaces and
links are always removed at the end (also after a failure).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import procs
from testlib import PrivatePostgres, private_postgres_missing


def available() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return private_postgres_missing()


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


@contextlib.contextmanager
def private_postgres(address: str, token: str, log_dir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL (testlib.PrivatePostgres) listening on ``address`` only, trusting the 10.231/16
    test links. Yields a driver-less URL of its database ``mnist``; its log is copied to ``log_dir``."""
    with PrivatePostgres(address, hba=("host all all 10.231.0.0/16 trust",), env={procs.TOKEN_VAR: token}) as pg:
        try:
            yield pg.createdb("mnist")
        finally:
            log_dir.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(pg.log, log_dir / "postgres.log")
