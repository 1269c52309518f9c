"""Helpers of the reliability tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from testlib import free_port, seed_prefect_home

REPO = Path(__file__).resolve().parents[2]

#: A tiny, fast search: the bundled sample, narrow layers, big batches.
FAST_TUNE = ["--source", "sample", "--hidden1-min", "64", "--hidden1-max", "64", "--hidden2-min", "64",
             "--hidden2-max", "64", "--batch-size", "256"]


# --- environments and processes ------------------------------------------------------------------------------


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a child process: no inherited MNIST_FLOW_* / PREFECT_* state, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MNIST_FLOW_", "PREFECT_"))}
    env.update({"MNIST_FLOW_HOME": str(home), "MNIST_FLOW_THREADS": "1", "PYTHONWARNINGS": "ignore",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(home.parent / "prefect-home")})
    env.update(extra)
    seed_prefect_home(env["PREFECT_HOME"])
    return env


def mnist_flow(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``mnist-flow ARGS`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "mnist_flow.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO))


def flow_script(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python flows/mnist.py ARGS`` in a fresh interpreter."""
    return subprocess.run([sys.executable, str(REPO / "flows" / "mnist.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO))


def written_files(home: Path) -> list[str]:
    """Everything under ``home`` (relative paths): a refused run must leave this empty."""
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")) if home.exists() else []


def dead_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    return free_port()


