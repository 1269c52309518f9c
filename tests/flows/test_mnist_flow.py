"""The `mnist` flow end to end on the bundled sample, under a temporary Prefect API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from mnist_flow.errors import ConfigError
from mnist_flow.params import flat_fields
from mnist_flow.registry.store import Registry
from mnist_flow.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
from flows import mnist as flow_module

#: workers=1: the trials in the flow's process (the parallel run: tests/e2e/test_parallel_run.py).
TINY = dict(source="sample", n_trials=3, max_epochs=2, final_epochs=2, seed=0, workers=1)


def test_the_deployment_schema_offers_every_parameter_with_its_default_and_refuses_bad_values():
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(flow_module.mnist)
    properties = schema.properties
    assert list(properties) == list(flat_fields())
    assert properties["n_trials"]["default"] == 20 and properties["n_trials"]["minimum"] == 1
    assert properties["workers"]["default"] == "auto"
    assert properties["momentum_max"]["exclusiveMaximum"] == 1
    assert properties["dataset"]["enum"] == ["mnist", "fashion-mnist"]
    # what `prefect deployment run mnist/train --param ...` gets: values checked by RunParams, flat names back
    assert flow_module.mnist.validate_parameters({"n_trials": "5", "lr_max": 0.1})["lr_max"] == 0.1
    with pytest.raises(ConfigError, match=r"n_trials: must be in \[1, 10000\] \(got 0\)"):
        flow_module.mnist.validate_parameters({"n_trials": 0})
    with pytest.raises(ConfigError, match="lr_max: must be a finite number"):
        flow_module.mnist.validate_parameters({"lr_max": float("inf")})


def test_the_flow_tunes_trains_evaluates_and_registers_a_champion_with_its_lineage(home):
    summary = flow_module.mnist(**TINY)
    assert summary.trials.finished == 3
    assert summary.trials.complete + summary.trials.pruned == 3
    trials = optuna.load_study(study_name=summary.study, storage=load_settings().resolved_database_url).trials
    assert summary.trials.epochs == sum(len(t.intermediate_values) for t in trials) >= 3  # a fresh home
    assert summary.data.source == "sample" and len(summary.data.fingerprint) == 64
    assert summary.model.version == 1 and summary.model.champion is True
    assert set(summary.seconds) == {"data", "tune", "train", "evaluate", "register"}
    assert 0.0 <= summary.metrics.test_accuracy <= 1.0

    registry = Registry.from_settings(load_settings())
    champion = registry.get("mnist", "champion").to_dict()
    assert champion["version"] == 1 and "champion" in champion["aliases"]
    assert champion["dataset"]["fingerprint"] == summary.data.fingerprint
    assert champion["metrics"]["test_accuracy"] == pytest.approx(summary.metrics.test_accuracy)
    lineage = champion["lineage"]
    assert lineage["study_name"] == summary.study and lineage["trial_number"] == summary.best.trial
    assert lineage["flow_run_id"] and lineage["code_version"]["package"]
    assert lineage["seed"] == summary.final_fit.seed and summary.final_fit.seed in (0, 1000)  # the kept fit's
    assert champion["params"]["epochs"] == 2 and champion["params"]["hidden"] == [
        summary.best.params["hidden1"], summary.best.params["hidden2"]]
    assert Path(champion["artifact"]["uri"].removeprefix("file://")).is_file()
    if summary.final_fit.ensemble:  # the two fits side by side in one MLP, its validation figures its own
        assert summary.final_fit.ensemble == (0, 1000) and champion["metrics"]["ensemble_of"] == 2
        assert champion["params"]["ensemble_seeds"] == [0, 1000]
        assert champion["metrics"]["val_accuracy"] == pytest.approx(summary.metrics.val_accuracy)


def test_a_second_run_continues_the_study_and_records_a_promotion_decision(home):
    first = flow_module.mnist(**TINY)
    second = flow_module.mnist(**TINY)
    assert second.study == first.study
    assert second.trials.in_study == 6
    assert second.model.version == 2
    assert second.decision is not None and second.decision.outcome in {"promoted", "kept"}
    history = Registry.from_settings(load_settings()).history("mnist")
    assert len(history) == 2
    champions = [v for v in Registry.from_settings(load_settings()).list_versions("mnist") if "champion" in v.aliases]
    assert len(champions) == 1


def test_the_same_seed_gives_the_same_result_in_a_fresh_home(tmp_path, monkeypatch):
    results = []
    for name in ("a", "b"):
        monkeypatch.setenv("MNIST_FLOW_HOME", str(tmp_path / name))
        results.append(flow_module.mnist(**TINY))
    assert results[0].best == results[1].best
    assert results[0].metrics == results[1].metrics


def test_the_script_help_lists_every_parameter():
    out = subprocess.run([sys.executable, str(ROOT / "flows" / "mnist.py"), "--help"], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    for name in flat_fields():
        assert f"--{name.replace('_', '-')}" in out
