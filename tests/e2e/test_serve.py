"""`mnist-flow serve` as a real process: predictions over HTTP, a promotion picked up live, bad requests refused.

Two real models are trained on the bundled sample and registered (v1 champion, v2 challenger); the
server is started with the command a user types, reached with httpx, and its OpenAPI schema is
exercised by schemathesis. Every process the test started is stopped (checked by an environment token).
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import commands
import httpx
import numpy as np
import procs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_BODY = 1 << 20
MAX_PIXELS = 1_000_000
EXAMPLES = 25  # per operation and mode: bounded, a few seconds


@pytest.fixture(scope="module")
def served_home(tmp_path_factory, sample_prepared) -> Path:
    """A home with two real sample models: v1 (champion) and v2 (registered, not promoted)."""
    import torch

    from mnist_flow import pipeline
    from mnist_flow.params import TrainConfig
    from mnist_flow.registry.store import Registry

    tmp = tmp_path_factory.mktemp("serve")
    home = tmp / "home"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Registry(f"sqlite:///{home / 'mnist-flow.db'}", str(home / "artifacts")) as registry:
            for seed, hidden in ((0, (64,)), (1, (96,))):
                config = TrainConfig(hidden=hidden, lr=0.05, momentum=0.9, batch_size=128, epochs=2, seed=seed,
                                     precision="fp32").validate()
                model, history = pipeline.fit_best(sample_prepared, config)
                test = pipeline.evaluate_test(model, sample_prepared)
                kwargs = {"study_name": "serve-test", "trial_number": seed, "run_key": f"serve-{seed}", "flow_run_id": None}
                candidate = pipeline.Candidate(sample_prepared, model, config, history, test, **kwargs)
                if seed == 0:
                    pipeline.register_and_decide(registry, candidate, margin=0.0, alpha=0.05)
                else:
                    pipeline.register_challenger(registry, candidate)
    finally:
        torch.set_num_threads(threads)
    return home


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


class Server:
    def __init__(self, url: str, env: dict, proc: procs.Proc) -> None:
        self.url, self.env, self.proc = url, env, proc


def _start(tmp: Path, home: Path, token: str, *extra: str, artifacts: Path | None = None) -> Server:
    port = procs.free_port()
    env = procs.base_env(tmp, token, MNIST_FLOW_HOME=str(home), MNIST_FLOW_MAX_IMAGE_PIXELS=str(MAX_PIXELS),
                         MNIST_FLOW_THREADS="1", MNIST_FLOW_ARTIFACTS_URL=str(artifacts or home / "artifacts"))
    command = commands.model_api("127.0.0.1", port)  # what docker/compose.yaml's model-api runs
    proc = procs.start("serve", [str(procs.BIN / command[0]), *command[1:], *extra], env=env, log_dir=tmp / "logs")
    url = f"http://127.0.0.1:{port}"
    try:
        procs.wait_http(f"{url}/health", proc=proc, timeout=120)
    except BaseException:
        proc.stop()
        raise
    return Server(url, env, proc)


@pytest.fixture(scope="module")
def server(served_home, tmp_path_factory) -> Server:
    """One server for the request tests and schemathesis (it never sees a promotion)."""
    token = procs.new_token()
    tmp = tmp_path_factory.mktemp("serve-proc")
    started = _start(tmp, served_home, token, "--max-request-bytes", str(MAX_BODY), "--max-files", "8")
    yield started
    started.proc.stop()
    assert not procs.kill_leftovers(token)


def _files(images: list[np.ndarray]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", _png(p), "image/png")) for i, p in enumerate(images)]


def test_predict_classifies_posted_pngs_like_the_model_does_in_process(server, served_home, sample_prepared):
    from mnist_flow.registry.store import Registry

    images = sample_prepared.bundle.test_images.numpy()[::50]
    labels = sample_prepared.bundle.test_labels.tolist()[::50]
    response = httpx.post(f"{server.url}/predict", files=_files(list(images[:8])), timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "mnist", "version": 1}
    with Registry(f"sqlite:///{served_home / 'mnist-flow.db'}", str(served_home / "artifacts")) as registry:
        model, _, _ = registry.load("mnist", 1)
    expected = model(sample_prepared.test_x[::50][:8]).argmax(1).tolist()
    assert [p["class"] for p in body["predictions"]] == expected
    assert [p["filename"] for p in body["predictions"]] == [f"{i}.png" for i in range(8)]
    for row in body["predictions"]:
        assert set(row) == {"filename", "class", "name", "probability"} and 0 < row["probability"] <= 1
        assert row["name"] == sample_prepared.bundle.classes[row["class"]]
    assert sum(p["class"] == y for p, y in zip(body["predictions"], labels)) >= 6  # a real model, not noise


def test_model_and_health_describe_the_champion(server):
    info = httpx.get(f"{server.url}/model", timeout=10).json()
    assert info["name"] == "mnist" and info["version"] == 1 and "champion" in info["aliases"]
    assert info["preparation"] == "mnist-digit" and len(info["classes"]) == 10
    assert info["lineage"]["study_name"] == "serve-test" and info["dataset"]["fingerprint"]
    assert 0.5 < info["metrics"]["test_accuracy"] <= 1
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health == {"status": "ok", "model": {"name": "mnist", "version": 1}, "problem": None}


def _assert_one_message(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), body
    assert "Traceback" not in response.text
    for needle in needles:
        assert needle in body["detail"], body["detail"]


def test_a_request_without_a_file_gets_one_message(server):
    response = httpx.post(f"{server.url}/predict", files={"other": ("a.txt", b"x", "text/plain")}, timeout=10)
    _assert_one_message(response, 422, "No image in the request", "'files'")


def test_a_request_that_is_not_multipart_gets_415(server):
    response = httpx.post(f"{server.url}/predict", json={"files": []}, timeout=10)
    _assert_one_message(response, 415, "multipart/form-data", "application/json")


def test_a_file_that_is_not_an_image_gets_415_naming_it(server):
    response = httpx.post(f"{server.url}/predict", files=[("files", ("notes.png", b"hello", "image/png"))], timeout=10)
    _assert_one_message(response, 415, "notes.png: not a PNG or JPEG image")


def test_a_decompression_bomb_gets_413_before_decoding(server):
    out = io.BytesIO()
    Image.new("L", (4000, 4000), 0).save(out, format="PNG", optimize=True)  # 16 Mpx in a few kB
    assert len(out.getvalue()) < 100_000
    response = httpx.post(f"{server.url}/predict", files=[("files", ("bomb.png", out.getvalue(), "image/png"))],
                          timeout=10)
    _assert_one_message(response, 413, "bomb.png: the image is too large", f"{MAX_PIXELS:,} pixels")


def test_a_huge_body_gets_413_whether_declared_or_streamed(server):
    blob = b"\0" * (MAX_BODY + 10)
    declared = httpx.post(f"{server.url}/predict", files=[("files", ("big.png", blob, "image/png"))], timeout=10)
    _assert_one_message(declared, 413, "larger than 1,048,576 bytes")

    def chunks():  # no Content-Length: the limit has to hold on the bytes received
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 65536

    streamed = httpx.post(f"{server.url}/predict", content=chunks(), timeout=10,
                          headers={"content-type": "multipart/form-data; boundary=b"})
    _assert_one_message(streamed, 413, "larger than 1,048,576 bytes")


def test_too_many_images_in_one_request_get_413(server, sample_prepared):
    images = list(sample_prepared.bundle.test_images.numpy()[:9])
    _assert_one_message(httpx.post(f"{server.url}/predict", files=_files(images), timeout=30), 413,
                        "Too many images", "limit is 8")


def test_a_blank_image_gets_422(server):
    response = httpx.post(f"{server.url}/predict", files=[("files", ("white.png", _png(np.full((50, 40), 255, np.uint8)),
                                                                     "image/png"))], timeout=10)
    _assert_one_message(response, 422, "white.png: no digit found")


def test_the_openapi_schema_holds_for_generated_requests(server):
    """Schemathesis on every operation, valid and invalid requests (bounded): no 5xx, only documented
    status codes, content types and bodies."""
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert sorted(f"{o.method.upper()} {o.path}" for o in operations) == ["GET /health", "GET /model",
                                                                           "POST /predict"]
    calls = []
    for operation in operations:
        # invalid requests need something to break: the GET operations take no parameters
        modes = [schemathesis.GenerationMode.POSITIVE] + (
            [schemathesis.GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                # random bytes are schema-valid files but no PNG: a 415 there is right, not a rejected valid request;
                # invalid requests must be refused with a 4xx, and 413 (too many or too large) is one schemathesis'
                # own negative check does not list
                response = case.call_and_validate(
                    timeout=30, excluded_checks=[positive_data_acceptance, negative_data_rejection])
                if case.meta is not None and case.meta.generation.mode == schemathesis.GenerationMode.NEGATIVE:
                    assert 400 <= response.status_code < 500, (response.status_code, response.text[:200])
                calls.append((case.operation.path, response.status_code))

            check()
    predict_codes = {code for path, code in calls if path == "/predict"}
    assert 200 in {code for path, code in calls if path == "/model"}
    assert predict_codes and predict_codes <= {200, 400, 413, 415, 422}


def test_a_promotion_is_served_without_a_restart(served_home, tmp_path, e2e_token, sample_prepared):
    home = tmp_path / "home"  # a copy of the database: the module's server keeps its champion
    home.mkdir()
    shutil.copy(served_home / "mnist-flow.db", home / "mnist-flow.db")
    # the rows point into the module's artifact root: the registry refuses artifacts outside its root
    started = _start(tmp_path, home, e2e_token, "--refresh", "0.2", artifacts=served_home / "artifacts")
    try:
        image = sample_prepared.bundle.test_images.numpy()[:1]
        before = httpx.post(f"{started.url}/predict", files=_files(list(image)), timeout=30).json()
        assert before["model"]["version"] == 1

        promoted = procs.run([str(procs.BIN / "mnist-flow"), "registry", "promote", "2", "--reason", "e2e"],
                             env=started.env, timeout=120)
        assert promoted.returncode == 0

        deadline, version = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            version = httpx.get(f"{started.url}/model", timeout=10).json()["version"]
            if version == 2:
                break
            time.sleep(0.2)
        assert version == 2
        after = httpx.post(f"{started.url}/predict", files=_files(list(image)), timeout=30).json()
        assert after["model"] == {"name": "mnist", "version": 2}
        assert started.proc.alive()  # the same process: no restart
    finally:
        started.proc.stop()


def test_the_model_api_module_imports_no_prefect():
    import subprocess
    import sys

    code = "import sys, mnist_flow.review.serve; print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
