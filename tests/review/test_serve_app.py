"""The model API in-process (Starlette's TestClient drives the real ASGI app): following the alias, and
keeping the last good model when a newly promoted one fails verification. The real server process is
tested end to end in tests/e2e/test_serve.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from mnist_flow.registry.store import Lineage, Registry
from mnist_flow.review.predict import Preprocessing
from mnist_flow.review.serve import Champion, Limits, create_app
from mnist_flow.training.model import MLP


@pytest.fixture
def registry(tmp_path: Path):
    with Registry(f"sqlite:///{tmp_path / 'mnist-flow.db'}", str(tmp_path / "artifacts")) as reg:
        for seed in (1, 2):
            torch.manual_seed(seed)
            reg.register("mnist", MLP((16,)).eval(), sidecar=Preprocessing().to_sidecar(), params={},
                         metrics={"test_accuracy": 0.5}, lineage=Lineage("mnist", "fp"))
        reg.promote("mnist", 1, reason="first")
        yield reg


def _png() -> bytes:
    out = io.BytesIO()
    frame = np.zeros((28, 28), np.uint8)
    frame[6:22, 12:16] = 255
    Image.fromarray(frame, mode="L").save(out, format="PNG")
    return out.getvalue()


def _served_version(client: TestClient) -> int:
    response = client.post("/predict", files=[("files", ("one.png", _png(), "image/png"))])
    assert response.status_code == 200, response.text
    return response.json()["model"]["version"]


def test_a_moved_alias_is_served_on_the_next_request(registry):
    client = TestClient(create_app(Champion(registry, "mnist", refresh_seconds=0.0)))
    assert _served_version(client) == 1
    registry.promote("mnist", 2, reason="better")
    assert _served_version(client) == 2
    assert client.get("/model").json()["version"] == 2


def test_the_alias_is_looked_up_at_most_every_refresh_interval(registry):
    client = TestClient(create_app(Champion(registry, "mnist", refresh_seconds=3600.0)))
    assert _served_version(client) == 1  # the first request loads the champion
    registry.promote("mnist", 2, reason="better")
    assert _served_version(client) == 1  # not looked up again within the hour


def test_a_promoted_model_that_fails_verification_leaves_the_last_good_one_serving(registry):
    champion = Champion(registry, "mnist", refresh_seconds=0.0)
    client = TestClient(create_app(champion))
    second = registry.get("mnist", 2)
    path = Path(second.sidecar_uri.removeprefix("file://"))
    original = path.read_bytes()
    path.write_text(json.dumps({**json.loads(original), "normalization": {"mean": 0.5, "std": 0.0}}))
    registry.promote("mnist", 2, reason="tampered")

    assert _served_version(client) == 1
    health = client.get("/health").json()
    assert health["status"] == "degraded" and health["model"]["version"] == 1
    assert f"{second.sidecar_uri} cannot be trusted" in health["problem"]

    path.write_bytes(original)  # restored from a backup
    assert _served_version(client) == 2
    assert client.get("/health").json() == {"status": "ok", "model": {"name": "mnist", "version": 2},
                                            "problem": None}


def test_a_json_body_and_an_unknown_path_get_one_message(registry):
    client = TestClient(create_app(Champion(registry, "mnist"), Limits(max_request_bytes=4096)))
    assert client.post("/predict", json={}).json() == {
        "detail": "POST /predict takes multipart/form-data, not application/json: send the images as files in "
                  "the multipart field 'files'."}
    assert client.get("/nowhere").json() == {"detail": "Not Found"}
    response = client.post("/predict", content=b"x" * 5000, headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "larger than 4,096 bytes" in response.json()["detail"]


def test_serve_binds_the_loopback_by_default():
    import inspect

    from mnist_flow.cli import review as cli_review
    from mnist_flow.review import serve

    assert inspect.signature(cli_review.serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve.serve).parameters["host"].default == "127.0.0.1"
