"""The README documents every parameter and setting the code has."""

from __future__ import annotations

from pathlib import Path

from mnist_flow.pipeline import RunParams
from mnist_flow.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_flow_parameter_is_in_the_readme():
    missing = [name for name in RunParams.model_fields if f"`{name}`" not in README]
    assert not missing, f"document these parameters in README.md: {missing}"


def test_every_setting_is_in_the_readme():
    missing = [f"MNIST_FLOW_{name.upper()}" for name in Settings.model_fields
               if f"`MNIST_FLOW_{name.upper()}`" not in README]
    assert not missing, f"document these settings in README.md: {missing}"


def test_the_readme_shows_the_two_commands():
    assert "make run" in README and "make test" in README
