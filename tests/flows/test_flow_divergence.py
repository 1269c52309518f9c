"""The `mnist` flow when trials truly diverge: they are pruned with the reason recorded, and the run still
completes and registers a finite model (the final fit's own divergences: tests/model/test_stability.py)."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
from flows import mnist as flow_module

pytestmark = pytest.mark.slow


def test_the_flow_completes_and_registers_a_finite_model_when_its_trials_diverge(home):
    # with seed 4 the sampler's first two points have lr 7.96 and 8.28 (they diverge at once); the enqueued
    # seed configuration (lr 0.01, inside these bounds) completes
    summary = flow_module.mnist(source="sample", n_trials=3, max_epochs=2, final_epochs=3, seed=4, workers=1,
                                lr_min=0.01, lr_max=10.0, momentum_min=0.9, momentum_max=0.98, hidden1_min=64,
                                hidden1_max=64, hidden2_min=64, hidden2_max=64)
    assert (summary.trials.finished, summary.trials.complete, summary.trials.pruned) == (3, 1, 2)
    assert summary.best.params["lr"] == 0.01
    assert summary.model.version == 1
    assert all(math.isfinite(v) for v in vars(summary.metrics).values())
    assert summary.final_fit.recoveries == 0 and summary.final_fit.notes
    with sqlite3.connect(home / "mnist-flow.db") as db:
        reasons = [v for (v,) in db.execute("SELECT value_json FROM trial_user_attributes WHERE key = 'diverged'")]
    assert len(reasons) == 2
    assert all("diverged in epoch 1 of 2" in r and "pruned; the study goes on" in r for r in reasons)


def test_a_run_whose_every_trial_diverges_ends_in_one_divergence_message(home):
    from mnist_flow.errors import TrainingDiverged

    # every point of this space (the fitted seed configuration too) has lr 5: all trials diverge
    with pytest.raises(TrainingDiverged, match=r"No trial of the study completed: 2 diverged") as caught:
        flow_module.mnist(source="sample", n_trials=2, max_epochs=2, final_epochs=2, seed=0, workers=1, lr_min=5.0,
                          lr_max=5.0, hidden1_min=64, hidden1_max=64, hidden2_min=64, hidden2_max=64)
    assert "lr_max" in caught.value.fix
