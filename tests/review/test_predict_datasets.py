"""Prediction matches the training data: a model's own test images, saved as PNG, get its registered accuracy.

A small but real Fashion-MNIST model is trained here (a few seconds) and registered through the
pipeline, so its sidecar records Fashion-MNIST's preparation; the sample's champion comes from the
review world (conftest). Accuracy on the whole test set through `predict` must equal the registered
test accuracy (within 0.5 points), and on every 50th image `mnist-flow predict --json` must give
exactly the model's own predictions: 200 images alone differ from the whole set by sampling
(about 2 points at 90 %), so equality of predictions is what pins them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from testlib import require_fashion_mnist

from mnist_flow import cli, pipeline
from mnist_flow.registry.store import Registry
from mnist_flow.review.predict import DIGIT, ITEM, Preprocessing, predict_images

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """A real Fashion-MNIST model (784-128-10, 3 epochs, ~0.87), registered in its own home."""
    from mnist_flow.data.datasets import load_dataset
    from mnist_flow.params import TrainConfig

    bundle = load_dataset("fashion-mnist", "dir", data_dir=require_fashion_mnist(), cache_dir=Path("/nonexistent"))
    prepared = pipeline.prepare(bundle, val_fraction=0.1, seed=0, device="cpu")
    config = TrainConfig(hidden=(128,), lr=0.1, momentum=0.9, batch_size=128, epochs=3, seed=0, schedule="onecycle",
                         weight_decay=5e-4, precision="fp32").validate()
    model, history = pipeline.fit_best(prepared, config)
    test = pipeline.evaluate_test(model, prepared)
    home = tmp_path_factory.mktemp("fashion") / "home"
    with Registry(f"sqlite:///{home / 'mnist-flow.db'}", str(home / "artifacts")) as registry:
        pipeline.register_and_decide(
            registry,
            pipeline.Candidate(prepared, model, config, history, test, study_name="fashion-test", trial_number=0,
                               run_key="fashion-test", flow_run_id=None),
            margin=0.0, alpha=0.05)
        loaded, sidecar, version = registry.load("fashion-mnist", "champion")
    return home, prepared, loaded, sidecar, version


def _write_pngs(images: np.ndarray, folder: Path, step: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(0, len(images), step):
        path = folder / f"{i:05d}.png"
        Image.fromarray(images[i], mode="L").save(path, compress_level=1)
        paths.append(path)
    return paths


def _accuracy(results: list[dict], labels) -> float:
    return float(np.mean([r["digit"] == y for r, y in zip(results, labels, strict=True)]))


def _own_predictions(model: torch.nn.Module, features: torch.Tensor) -> list[int]:
    with torch.inference_mode():
        return model(features).argmax(1).tolist()


def test_fashion_sidecar_records_the_item_preparation(fashion):
    _, _, _, sidecar, _ = fashion
    assert sidecar["input"]["preparation"] == ITEM
    assert Preprocessing.from_sidecar(sidecar).classes[7] == "Sneaker"


def test_fashion_test_set_saved_as_png_gets_the_registered_accuracy(fashion, tmp_path):
    _, prepared, model, sidecar, version = fashion
    images, labels = prepared.bundle.test_images.numpy(), prepared.bundle.test_labels.tolist()

    results = predict_images(_write_pngs(images, tmp_path), model, sidecar)

    assert _accuracy(results, labels) == pytest.approx(version.metrics["test_accuracy"], abs=0.005)


def test_every_50th_fashion_test_png_through_the_cli_gets_the_models_own_predictions(fashion, tmp_path, capsys,
                                                                                  monkeypatch):
    home, prepared, model, _, _ = fashion
    paths = _write_pngs(prepared.bundle.test_images.numpy(), tmp_path, step=50)
    monkeypatch.setenv("MNIST_FLOW_HOME", str(home))
    for key in ("MNIST_FLOW_DATABASE_URL", "MNIST_FLOW_ARTIFACTS_URL", "MNIST_FLOW_MAX_IMAGE_PIXELS"):
        monkeypatch.delenv(key, raising=False)

    assert cli.main(["predict", "--json", *map(str, paths)]) == 0

    results = json.loads(capsys.readouterr().out)
    assert len(results) == 200
    assert [r["digit"] for r in results] == _own_predictions(model, prepared.test_x[::50])
    assert {r["name"] for r in results} <= set(prepared.bundle.classes)


def test_the_sample_test_split_saved_as_png_gets_the_registered_accuracy(world, tmp_path):
    with world.registry() as registry:
        model, sidecar, version = registry.load("mnist", "champion")
    images, labels = world.prepared.bundle.test_images.numpy(), world.prepared.bundle.test_labels.tolist()
    assert sidecar["input"]["preparation"] == DIGIT

    results = predict_images(_write_pngs(images, tmp_path), model, sidecar)

    assert _accuracy(results, labels) == pytest.approx(version.metrics["test_accuracy"], abs=0.005)
    every_50th = [r["digit"] for r in results][::50]
    assert every_50th == _own_predictions(model, world.prepared.test_x[::50])


@pytest.mark.parametrize("preparation", [DIGIT, ITEM])
def test_a_28x28_image_in_the_datasets_format_passes_unchanged(world, fashion, preparation):
    bundle = world.prepared.bundle if preparation == DIGIT else fashion[1].bundle
    spec = Preprocessing(preparation=preparation)
    for pixels in bundle.test_images.numpy()[:1000]:
        assert np.array_equal(spec.image(Image.fromarray(pixels, mode="L")), pixels)
        assert np.array_equal(spec.image(Image.fromarray(255 - pixels, mode="L")), pixels)  # dark on light


def test_fashion_items_photographed_larger_on_white_are_classified_like_the_originals(fashion, tmp_path):
    """Product-photo style: dark-on-white (as Zalando's pictures before negation), 2-5x larger, off-centre."""
    _, prepared, model, sidecar, _ = fashion
    images, labels = prepared.bundle.test_images.numpy()[::50], prepared.bundle.test_labels.tolist()[::50]
    originals = _accuracy(predict_images(_write_pngs(images, tmp_path / "orig"), model, sidecar), labels)
    variants = []
    for k, pixels in enumerate(images):
        scale = 2 + k % 4
        item = Image.fromarray(255 - pixels, mode="L").resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
        page = Image.new("L", (28 * scale + 60, 28 * scale + 30), 255)
        page.paste(item, (10 + 5 * (k % 7), 20))
        path = tmp_path / f"{k}.{'jpg' if k % 3 == 0 else 'png'}"
        image = page.convert("RGB") if k % 2 else page
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        variants.append(path)

    accuracy = _accuracy(predict_images(variants, model, sidecar), labels)

    assert accuracy == pytest.approx(originals, abs=0.05)


def test_the_digit_preparation_would_wreck_fashion_items(fashion):
    """Why the sidecar records the preparation: MNIST's framing of clothing (the old behaviour) loses accuracy."""
    _, prepared, model, sidecar, _ = fashion
    images, labels = prepared.bundle.test_images.numpy()[::50], prepared.bundle.test_labels.numpy()[::50]
    as_items = Preprocessing.from_sidecar(sidecar)
    big = [Image.fromarray(p, mode="L").resize((56, 56), Image.Resampling.BICUBIC) for p in images]
    framed_as_digits = np.stack([Preprocessing(preparation=DIGIT).image(b) for b in big])
    framed_as_items = np.stack([as_items.image(b) for b in big])
    digits = np.mean(np.array(_own_predictions(model, as_items.features(framed_as_digits))) == labels)
    items = np.mean(np.array(_own_predictions(model, as_items.features(framed_as_items))) == labels)
    assert items > digits + 0.2


def test_a_sidecar_without_the_new_fields_gets_the_mnist_digit_preparation():
    spec = Preprocessing.from_sidecar({"normalization": {"mean": 0.5, "std": 0.5, "scale": 255.0},
                                       "classes": [str(d) for d in range(10)],
                                       "input": {"height": 28, "width": 28, "channels": 1, "background": "dark"}})
    assert spec == Preprocessing()
    assert Preprocessing.from_sidecar({}).preparation == DIGIT
