"""Rules for running a study's trials in several processes (``workers > 1``).

One machine, a few workers: SQLite is fine (WAL and a busy timeout, see :mod:`mnist_flow.db`), and
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

from mnist_flow.db import is_sqlite, mask_url
from mnist_flow.errors import ConfigError

#: Work pool types whose flow runs are subprocesses of a worker on the worker's own machine.
LOCAL_POOL_TYPES = frozenset({"process"})

SHARED_FIX = ("Use a PostgreSQL study database (MNIST_FLOW_DATABASE_URL=postgresql+psycopg://user:pass@host/db) "
              "and a shared artifact store (MNIST_FLOW_ARTIFACTS_URL=s3://bucket/mnist-flow, or "
              "file:///mnt/shared/artifacts for a mount every machine sees), or run the workers on one machine "
              "(MNIST_FLOW_MULTI_HOST=false and a process work pool).")


def leaves_this_machine(*, multi_host: bool, pool_type: str | None) -> bool:
    """Whether trial workers may run on other machines (see the module docstring for the rule)."""
    return multi_host or (pool_type is not None and pool_type not in LOCAL_POOL_TYPES)


def is_local_path(artifacts_url: str) -> bool:
    """A plain path (no URL scheme): this machine's disk. ``file://`` URLs declare a shared mount."""
    return "://" not in artifacts_url


def check_shared_state(database_url: str, artifacts_url: str, *, workers: int, multi_host: bool,
                       pool_type: str | None = None) -> None:
    """Refuse SQLite or local-disk artifacts when ``workers > 1`` may run on several machines."""
    if workers <= 1 or not leaves_this_machine(multi_host=multi_host, pool_type=pool_type):
        return
    why = ("MNIST_FLOW_MULTI_HOST=true" if multi_host else f"the work pool is of type {pool_type!r}, "
           "whose flow runs do not share this machine's disk")
    problems = []
    if is_sqlite(database_url):
        problems.append(f"the study database is SQLite ({mask_url(database_url)}), a file on one machine")
    if is_local_path(artifacts_url):
        problems.append(f"the artifacts are on this machine's disk ({artifacts_url})")
    if problems:
        raise ConfigError(f"workers={workers} may run on several machines ({why}), but "
                          + " and ".join(problems) + ".", fix=SHARED_FIX)


def available_cpus() -> int:
    """CPUs this process may use (its affinity mask, so containers' limits are respected where set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """Each of ``workers`` trial processes on one machine gets an equal share of the CPUs (at least 1)."""
    return max(1, (cpus if cpus is not None else available_cpus()) // max(1, workers))


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads when the user chose a number (MNIST_FLOW_THREADS); else keep torch's."""
    if threads:
        import torch

        torch.set_num_threads(threads)
