"""Helpers shared by the registry tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import torch

from mnist_flow.registry.store import Lineage, Registry
from mnist_flow.training.model import MLP


def tiny_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP((8,)).eval()


def register(reg: Registry, name: str = "mnist", *, seed: int = 0, accuracy: float = 0.9,
             fingerprint: str = "fp-1", study_name: str | None = None, trial_number: int | None = None,
             flow_run_id: str | None = None, **kwargs: object):
    lineage = Lineage("mnist", fingerprint, study_name, trial_number, flow_run_id, seed)
    return reg.register(name, tiny_model(seed), sidecar={"classes": list(range(10))}, params={"hidden": [8]},
                        metrics={"val_accuracy": accuracy, "test_accuracy": accuracy}, lineage=lineage, **kwargs)


def run_concurrently(script: str, args_per_process: list[list[str]], timeout: float = 60) -> list[str]:
    """Run ``script`` in one Python process per argument list, released together; return their stdouts."""
    start_at = time.time() + 3.0  # time to import everything before the race starts
    code = textwrap.dedent(script)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(start_at), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in args_per_process]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"worker failed:\n{err}"
        outputs.append(out)
    return outputs
