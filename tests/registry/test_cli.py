"""The `registry` sub-commands on a temporary MNIST_FLOW_HOME."""

from __future__ import annotations

import json
import os

import pytest
from registry_helpers import register, tiny_model
from typer.testing import CliRunner

from mnist_flow.cli.registry import registry_app
from mnist_flow.errors import RegistryError
from mnist_flow.registry.store import Lineage, Registry
from mnist_flow.settings import load_settings


@pytest.fixture
def registry_home(home, monkeypatch):
    """The shared fresh ``home`` (no other MNIST_FLOW_* set) holding mnist v1 (0.91) and v2 (0.92)."""
    for key in list(os.environ):
        if key.startswith("MNIST_FLOW_") and key != "MNIST_FLOW_HOME":
            monkeypatch.delenv(key)
    with Registry.from_settings(load_settings()) as reg:
        for seed in (1, 2):
            register(reg, seed=seed, accuracy=0.9 + seed / 100)
    return home


def invoke(*args: str):
    result = CliRunner().invoke(registry_app, list(args), env={"COLUMNS": "200"})
    return result


def test_list_json_prints_versions_only(registry_home):
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [d["version"] for d in data] == [1, 2]
    assert {"name", "aliases", "params", "metrics", "dataset", "artifact", "lineage", "created_at"} <= set(data[0])


def test_list_human_output_is_a_table(registry_home):
    result = invoke("list")
    assert result.exit_code == 0 and "mnist" in result.output and "0.9100" in result.output


def test_the_table_marks_a_validation_accuracy_on_images_the_model_trained_on(registry_home):
    assert "*" not in invoke("list").output  # v1 and v2 record no trained_on: held-out figures
    with Registry.from_settings(load_settings()) as reg:
        reg.register("mnist", tiny_model(3), sidecar={"classes": list(range(10))},
                     params={"hidden": [8], "trained_on": "train+val"},
                     metrics={"val_accuracy": 0.96, "test_accuracy": 0.93},
                     lineage=Lineage("mnist", "fp-1", None, None, None, 3))
    output = invoke("list").output
    assert "0.9600*" in output and "0.9100*" not in output and "trained on its validation images too" in output


def test_promote_show_champion_rollback_history(registry_home):
    assert invoke("promote", "1", "--reason", "baseline").exit_code == 0
    assert invoke("promote", "2", "--reason", "better").exit_code == 0
    shown = json.loads(invoke("show", "champion", "--json").output)
    assert shown["version"] == 2 and shown["aliases"] == ["champion"]
    result = invoke("rollback", "--reason", "regression")
    assert result.exit_code == 0 and "v1" in result.output
    assert json.loads(invoke("show", "champion", "--json").output)["version"] == 1
    history = json.loads(invoke("history", "--json").output)
    assert [h["outcome"] for h in history] == ["promoted", "promoted", "rolled_back"]
    assert history[-1]["reason"] == "rollback: regression"
    assert "rolled_back" in invoke("history").output


def test_show_unknown_version_raises_registry_error(registry_home):
    result = invoke("show", "9")
    assert isinstance(result.exception, RegistryError)
    assert "versions: 1, 2" in str(result.exception)


def test_name_is_required_when_several_models_exist(registry_home):
    with Registry.from_settings(load_settings()) as reg:
        register(reg, "fashion")
    result = invoke("show", "1")
    assert isinstance(result.exception, RegistryError)
    assert "fashion, mnist" in str(result.exception)
    assert json.loads(invoke("show", "1", "--name", "fashion", "--json").output)["name"] == "fashion"
