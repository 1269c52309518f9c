"""Two `make run` at once on the same MNIST_FLOW_HOME (each with its own temporary Prefect server)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from rel_helpers import REPO, clean_env

from mnist_flow.registry.store import Registry


@pytest.mark.slow
def test_two_flow_runs_at_once_on_one_home_both_register_unique_versions_and_one_champion(
        tmp_path: Path, reliability) -> None:
    home = tmp_path / "home"
    args = [sys.executable, str(REPO / "flows" / "mnist.py"), "--source", "sample", "--n-trials", "2",
            "--max-epochs", "1", "--final-epochs", "1", "--hidden1-min", "64", "--hidden1-max", "64",
            "--hidden2-min", "64", "--hidden2-max", "64", "--batch-size", "256", "--json"]
    procs = []
    start = time.monotonic()
    for i in range(2):
        # two temporary Prefect servers starting at once on 2 shared cores need more than the default 20 s
        env = clean_env(home, PREFECT_HOME=str(tmp_path / f"prefect-{i}"),
                        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
        (tmp_path / f"prefect-{i}").mkdir(exist_ok=True)  # (clean_env made it, with a migrated database)
        procs.append(subprocess.Popen(args, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=420) for p in procs]
    took = time.monotonic() - start
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    reg = Registry(f"sqlite:///{home / 'mnist-flow.db'}", str(home / "artifacts"))
    try:
        versions = reg.list_versions("mnist")
        champions = [v.version for v in versions if "champion" in v.aliases]
        for v in versions:
            reg.load("mnist", v.version)  # artifact present, checksum matches
    finally:
        reg.dispose()
    numbers = [v.version for v in versions]
    assert sorted(numbers) == [1, 2] and len(set(v.idempotency_key for v in versions)) == 2
    assert len(champions) == 1
    reliability.record("two `python flows/mnist.py` runs at once, same MNIST_FLOW_HOME, separate PREFECT_HOME",
                       "both finish; versions unique; champion alias on exactly one version",
                       f"both exit 0 in {took:.0f} s; versions {sorted(numbers)}; champion v{champions[0]}",
                       group="faults")
