"""Unverified metadata and unreadable inputs (issue 15, classes 2 and 10): `mnist-flow predict` as a user runs it.

A hand-edited sidecar (normalisation, architecture, preparation) is refused naming the file, before
anything is allocated from it; a FIFO, a device or an 8 GB file given to predict is refused at once.
Each case runs the real command in a fresh interpreter: one message, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from rel_helpers import clean_env, mnist_flow

from mnist_flow.cli import main as cli_main
from mnist_flow.registry.store import Lineage, Registry
from mnist_flow.review.predict import Preprocessing
from mnist_flow.training.model import MLP


@pytest.fixture
def registered(home: Path, tmp_path: Path):
    """A home with one registered model (v1, champion) and a 28x28 PNG to classify."""
    with Registry(f"sqlite:///{home / 'mnist-flow.db'}", str(home / "artifacts")) as registry:
        torch.manual_seed(0)
        version = registry.register("mnist", MLP((32,)).eval(), sidecar=Preprocessing().to_sidecar(), params={},
                                    metrics={"test_accuracy": 0.5}, lineage=Lineage("mnist", "fp"))
        registry.promote("mnist", 1, reason="test")
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28), 0).save(image)
    return home, version, image


def _edit(version, section: str, **values: object) -> None:
    path = Path(version.sidecar_uri.removeprefix("file://"))
    sidecar = json.loads(path.read_text())
    sidecar.setdefault(section, {}).update(values)
    path.write_text(json.dumps(sidecar))


def _one_message(result, *needles: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return result.stderr.splitlines()[0]


@pytest.mark.parametrize("section, values, case", [
    ("normalization", {"mean": 0.9}, "normalisation mean edited by hand in model.json"),
    ("normalization", {"std": 0.0}, "normalisation std set to 0 in model.json (NaN probabilities before)"),
    ("architecture", {"hidden": [20000, 20000]}, "model.json claims hidden [20000, 20000] (2.4 GB before)"),
    ("input", {"preparation": "fashion-item"}, "preparation switched in model.json"),
], ids=["mean", "std-zero", "huge-architecture", "preparation"])
def test_a_hand_edited_sidecar_is_refused_naming_the_file(registered, reliability, section, values, case,
                                                          monkeypatch, capsys):
    home, version, image = registered
    _edit(version, section, **values)
    for key, value in clean_env(home).items():
        if key.startswith("MNIST_FLOW_"):
            monkeypatch.setenv(key, value)
    built = []
    original = MLP.__init__
    monkeypatch.setattr(MLP, "__init__", lambda self, hidden=(500, 256), *a, **k: (built.append(list(hidden)),
                                                                                    original(self, hidden, *a, **k)))

    rc = cli_main(["predict", str(image)])

    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.startswith("error: "), err
    for needle in (version.sidecar_uri, "cannot be trusted", "the file was modified", "Fix: Restore"):
        assert needle in err, err
    assert built == []  # refused before any network was built from it
    line = err.splitlines()[0]
    reliability.record(case + ", then `mnist-flow predict`",
                       "refused before use, naming model.json and the fix; exit 2; nothing built from the claim",
                       f"exit 2, “{line[-70:]}”, no network built", group="security")


def test_a_fifo_given_to_predict_is_refused_without_hanging(registered, reliability, tmp_path):
    home, _, _ = registered
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    start = time.monotonic()
    result = mnist_flow(["predict", str(fifo)], clean_env(home), timeout=120)
    seconds = time.monotonic() - start
    line = _one_message(result, "is a FIFO (named pipe), not a regular file")
    reliability.record("a FIFO (no writer) given to `mnist-flow predict`", "refused at once, exit 2 (it hung before)",
                       f"exit 2 after {seconds:.1f} s (interpreter start included), “{line[-60:]}”",
                       group="bad input")


@pytest.mark.parametrize("target, needle", [("/dev/zero", "is a device"), ("huge", "the file is too large")],
                         ids=["device", "8-GB-sparse-file"])
def test_a_device_or_an_8_gb_file_given_to_predict_is_refused_before_reading(registered, reliability, tmp_path,
                                                                           target, needle, monkeypatch, capsys):
    home, _, _ = registered
    if target == "huge":
        path = tmp_path / "huge.png"
        with path.open("wb") as handle:
            handle.truncate(8 * 2**30)
        target = str(path)
    monkeypatch.setenv("MNIST_FLOW_HOME", str(home))
    start = time.monotonic()
    rc = cli_main(["predict", target])  # in-process: the checks are on the open descriptor, before any read
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {target}: ") and needle in err and "Traceback" not in err, err
    kind = "character device" if target.startswith("/dev") else "8 GB sparse file"
    reliability.record(f"`mnist-flow predict {Path(target).name}` ({kind})", "refused before reading, exit 2",
                       f"exit 2 after {seconds:.2f} s, “{err.splitlines()[0][-60:]}”", group="bad input")
