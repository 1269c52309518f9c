"""The README documents every parameter and setting the code has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mnist_flow.params import flat_fields, markdown_table
from mnist_flow.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_readme_parameter_table_is_the_one_generated_from_the_definition():
    assert markdown_table() in README, "run: python scripts/readme_params.py"
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_params.py"), "--check"], timeout=60)
    assert check.returncode == 0, "run: python scripts/readme_params.py"
    assert all(f"| `{name}` |" in README for name in flat_fields())


def test_every_setting_is_in_the_readme():
    missing = [f"MNIST_FLOW_{name.upper()}" for name in Settings.model_fields
               if f"`MNIST_FLOW_{name.upper()}`" not in README]
    assert not missing, f"document these settings in README.md: {missing}"


def test_the_readme_shows_the_two_commands():
    assert "make run" in README and "make test" in README
