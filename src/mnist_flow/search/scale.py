"""Rules for running a study's trials in several processes (``workers > 1``).

One machine, a few workers: SQLite is fine (WAL and a busy timeout, see :mod:`mnist_flow.storage.db`), and
so is a local artifacts folder. Each trial process takes its share of the CPU threads.

Several machines: every worker must reach the *same* study database and artifact store, so SQLite
and a local path are refused. The rule is explicit: the work may leave this machine when
``MNIST_FLOW_MULTI_HOST=true`` or when the trial workers' Prefect work pool is not of type
``process`` (docker, kubernetes, ... run each flow run in its own container or pod). A plain path
(``/data/artifacts``) means this machine's disk; write ``file:///mnt/shared/artifacts`` to say that the
path is a mount every machine shares (NFS, a compose volume), or use an object store (``s3://...``).
"""

from __future__ import annotations

import os

from mnist_flow.errors import ConfigError
from mnist_flow.storage.db import is_sqlite, mask_url

#: Work pool types whose flow runs are subprocesses of a worker on the worker's own machine.
LOCAL_POOL_TYPES = frozenset({"process"})

SHARED_FIX = (
    "Use a PostgreSQL study database (MNIST_FLOW_DATABASE_URL=postgresql+psycopg://user:pass@host/db) "
    "and a shared artifact store (MNIST_FLOW_ARTIFACTS_URL=s3://bucket/mnist-flow, or "
    "file:///mnt/shared/artifacts for a mount every machine sees), or run the workers on one machine "
    "(MNIST_FLOW_MULTI_HOST=false and a process work pool)."
)


def leaves_this_machine(*, multi_host: bool, pool_type: str | None) -> bool:
    """Whether trial workers may run on other machines (see the module docstring for the rule)."""
    return multi_host or (pool_type is not None and pool_type not in LOCAL_POOL_TYPES)


def is_local_path(artifacts_url: str) -> bool:
    """A plain path (no URL scheme): this machine's disk. ``file://`` URLs declare a shared mount."""
    return "://" not in artifacts_url


def check_shared_state(
    database_url: str, artifacts_url: str, *, workers: int, multi_host: bool, pool_type: str | None = None
) -> None:
    """Refuse SQLite or local-disk artifacts when ``workers > 1`` may run on several machines."""
    if workers <= 1 or not leaves_this_machine(multi_host=multi_host, pool_type=pool_type):
        return
    why = (
        "MNIST_FLOW_MULTI_HOST=true"
        if multi_host
        else f"the work pool is of type {pool_type!r}, whose flow runs do not share this machine's disk"
    )
    problems = []
    if is_sqlite(database_url):
        problems.append(f"the study database is SQLite ({mask_url(database_url)}), a file on one machine")
    if is_local_path(artifacts_url):
        problems.append(f"the artifacts are on this machine's disk ({artifacts_url})")
    if problems:
        raise ConfigError(
            f"workers={workers} may run on several machines ({why}), but " + " and ".join(problems) + ".",
            fix=SHARED_FIX,
        )


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (``cpu.max``).

    A container limited to 1.5 CPUs (``docker run --cpus 1.5``) on a 16-core host gets 1 (the quota
    rounded down, at least 1); ``os.cpu_count()`` would say 16.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cpus, int(quota))) if quota is not None else max(1, cpus)


def cgroup_cpu_quota(cgroup_root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup v2 (``cpu.max``: quota / period) and its parents; None if unlimited."""
    own = _own_cgroup()
    if own is None:
        return None
    limits = []
    path = os.path.normpath(os.path.join(cgroup_root, own.lstrip("/")))
    root = os.path.normpath(cgroup_root)
    while True:
        try:
            with open(os.path.join(path, "cpu.max")) as f:
                quota, _, period = f.read().strip().partition(" ")
            if quota != "max":
                limits.append(int(quota) / int(period or 100_000))
        except (OSError, ValueError):
            pass
        if path == root or not path.startswith(root):
            break
        path = os.path.dirname(path)
    return min(limits) if limits else None


def _own_cgroup() -> str | None:
    """This process's cgroup v2 path (``0::/...`` in /proc/self/cgroup), or None without cgroup v2."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip() or "/"
    except OSError:
        pass
    return None


#: Memory one trial process needs at its peak (Fashion-MNIST in float32, torch, Optuna, Prefect's engine):
#: ``workers=auto`` starts no more processes than the available memory holds (docs/benchmarks.md).
WORKER_MEMORY_BYTES = 1536 * 2**20


def available_memory() -> int | None:
    """Bytes this process may still use: MemAvailable, capped by the cgroup v2 ``memory.max`` headroom."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    own = _own_cgroup()
    if own is not None:
        base = os.path.join("/sys/fs/cgroup", own.lstrip("/"))
        try:
            with open(os.path.join(base, "memory.max")) as f:
                limit = f.read().strip()
            with open(os.path.join(base, "memory.current")) as f:
                current = int(f.read().strip())
            if limit != "max" and available is not None:
                available = min(available, int(limit) - current)
        except (OSError, ValueError):
            pass
    return available


def resolve_workers(workers: int | str, n_trials: int, cpus: int | None = None, memory: int | None = None) -> int:
    """The number of trial processes: ``workers`` as given, or for ``"auto"`` one per available CPU,
    no more than the trials and than the available memory holds (at least 1)."""
    if workers != "auto":
        return max(1, int(workers))
    cpus = cpus if cpus is not None else available_cpus()
    memory = memory if memory is not None else available_memory()
    by_memory = max(1, memory // WORKER_MEMORY_BYTES) if memory is not None else cpus
    return max(1, min(cpus, n_trials, by_memory))


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """Each of ``workers`` trial processes on one machine gets an equal share of the CPUs (at least 1)."""
    return max(1, (cpus if cpus is not None else available_cpus()) // max(1, workers))


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads when the user chose a number (MNIST_FLOW_THREADS); else keep torch's."""
    if threads:
        import torch

        torch.set_num_threads(threads)
