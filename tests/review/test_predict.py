"""`mnist-flow predict`: image files -> digits, with the champion loaded through the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_flow import cli
from mnist_flow.errors import ImageError
from mnist_flow.review.predict import load_image, predict_images, preprocess


@pytest.fixture(scope="module")
def champion(world):
    registry = world.registry()
    model, sidecar, version = registry.load("mnist", "champion")
    registry.dispose()
    return model, sidecar, version


@pytest.fixture(scope="module")
def test_pngs(world, tmp_path_factory) -> tuple[list[Path], list[int]]:
    """Every held-out test digit of the sample, written as an MNIST-style PNG (white on black, 28x28)."""
    folder = tmp_path_factory.mktemp("digits")
    images, labels = world.prepared.bundle.test_images.numpy(), world.prepared.bundle.test_labels.tolist()
    paths = []
    for i, pixels in enumerate(images):
        path = folder / f"{i:04d}-{labels[i]}.png"
        Image.fromarray(pixels, mode="L").save(path)
        paths.append(path)
    return paths, labels


def _accuracy(results: list[dict], labels: list[int]) -> float:
    return sum(r["digit"] == y for r, y in zip(results, labels, strict=True)) / len(labels)


def test_held_out_pngs_are_classified_with_the_accuracy_the_registry_reports(champion, test_pngs):
    model, sidecar, version = champion
    paths, labels = test_pngs

    results = predict_images(paths, model, sidecar)

    assert [r["path"] for r in results] == [str(p) for p in paths]
    assert _accuracy(results, labels) == pytest.approx(version.metrics["test_accuracy"], abs=0.02)


def _light_background_variants(pixels: np.ndarray, index: int) -> Image.Image:
    """Dark ink on light paper, 2-5x larger, placed off-centre on a bigger page; some RGB, some grey."""
    scale = 2 + index % 4
    digit = Image.fromarray(255 - pixels, mode="L").resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    page = Image.new("L", (28 * scale + 60, 28 * scale + 30), 235)
    page.paste(digit, (10 + 5 * (index % 7), 20))
    return page.convert("RGB") if index % 2 else page


def test_light_background_larger_off_centre_and_jpeg_digits_are_classified_like_the_originals(champion, test_pngs,
                                                                                              tmp_path):
    model, sidecar, _ = champion
    paths, labels = test_pngs
    count = 150
    originals = _accuracy(predict_images(paths[:count], model, sidecar), labels[:count])
    variants = []
    for i, path in enumerate(paths[:count]):
        with Image.open(path) as image:
            page = _light_background_variants(np.asarray(image), i)
        target = tmp_path / f"{i}.{'jpg' if i % 3 == 0 else 'png'}"
        page.save(target, quality=90) if target.suffix == ".jpg" else page.save(target)
        variants.append(str(target))

    accuracy = _accuracy(predict_images(variants, model, sidecar), labels[:count])

    assert accuracy == pytest.approx(originals, abs=0.04)


def test_preprocessing_reproduces_mnist_framing_for_an_mnist_digit(world):
    pixels = world.prepared.bundle.test_images[0].numpy()
    framed = preprocess(Image.fromarray(pixels, mode="L"))
    inverted = preprocess(Image.fromarray(255 - pixels, mode="L"))

    assert framed.shape == (28, 28) and framed.dtype == np.uint8
    assert np.abs(framed.astype(int) - pixels.astype(int)).mean() < 2.0  # same box, same centre of mass
    assert np.array_equal(framed, inverted)


def test_a_batch_of_images_is_one_forward_pass(champion, test_pngs, monkeypatch):
    model, sidecar, _ = champion
    calls = []
    original = type(model).forward

    def counting(self, x):
        calls.append(x.shape[0])
        assert not torch.is_grad_enabled()
        return original(self, x)

    monkeypatch.setattr(type(model), "forward", counting)
    predict_images(test_pngs[0][:25], model, sidecar)
    assert calls == [25]


def test_a_file_that_is_not_an_image_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    with pytest.raises(ImageError, match=r"notes\.png: not a PNG or JPEG image"):
        load_image(path)


def test_an_unsupported_image_mode_is_refused_by_name(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (40, 40), (0, 0, 0, 255)).save(path)
    with pytest.raises(ImageError, match=r"print\.jpg: unsupported image mode 'CMYK'") as caught:
        load_image(path)
    assert "8-bit greyscale or RGB" in caught.value.fix


@pytest.mark.parametrize("size", [(40, 30), (400, 300)])  # above our limit; far above: Pillow's own bomb check
def test_an_image_above_the_pixel_limit_is_refused_before_decoding(tmp_path, size):
    path = tmp_path / "big.png"
    Image.new("L", size, 0).save(path)
    with pytest.raises(ImageError, match=r"big\.png: the image is too large \(.*1,000 pixels\)") as caught:
        load_image(path, max_pixels=1_000)
    assert "MNIST_FLOW_MAX_IMAGE_PIXELS" in caught.value.fix
    assert Image.MAX_IMAGE_PIXELS not in (None, 1_000)  # Pillow's global limit is put back


def test_a_blank_image_is_refused(tmp_path):
    path = tmp_path / "blank.png"
    Image.new("L", (50, 50), 255).save(path)
    with pytest.raises(ImageError, match=r"blank\.png: no digit found"):
        predict_images([path], torch.nn.Linear(784, 10), {})


def test_predict_json_lists_path_as_given_digit_and_probability(world_env, test_pngs, capsys, monkeypatch):
    paths, labels = test_pngs
    monkeypatch.chdir(paths[0].parent)
    given = [paths[0].name, f"./{paths[1].name}"]

    assert cli.main(["predict", "--json", *given]) == 0

    results = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in results] == given
    for row in results:
        assert set(row) == {"path", "digit", "name", "probability"}
        assert isinstance(row["digit"], int) and 0 <= row["digit"] <= 9 and 0.0 < row["probability"] <= 1.0


def test_predict_by_version_number_prints_one_line_per_image(world_env, test_pngs, capsys):
    assert cli.main(["predict", "--model", "1", "--name", "mnist", str(test_pngs[0][0])]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"{test_pngs[0][0]}: ") and "probability" in out.out
    assert "model mnist v1 (champion)" in out.err


def test_predict_reports_a_bad_file_as_one_error_message(world_env, tmp_path, capsys):
    bad = tmp_path / "scan.gif"
    Image.new("L", (28, 28)).save(bad)
    assert cli.main(["predict", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: not a PNG or JPEG image") and "Traceback" not in err


def test_predict_honours_the_pixel_limit_setting(world_env, test_pngs, capsys, monkeypatch):
    monkeypatch.setenv("MNIST_FLOW_MAX_IMAGE_PIXELS", "500")
    assert cli.main(["predict", str(test_pngs[0][0])]) == 2
    assert "784 pixels" in capsys.readouterr().err


@pytest.mark.parametrize("path, kind", [("/dev/zero", "a device"), ("/dev/null", "a device")])
def test_a_device_is_refused_before_reading(path, kind):
    with pytest.raises(ImageError, match=f"{path}: is {kind}, not a regular file"):
        load_image(path)


def test_a_huge_file_is_refused_by_its_size_before_reading(tmp_path):
    huge = tmp_path / "huge.png"
    with huge.open("wb") as handle:
        handle.truncate(8 * 2**30)  # sparse: 8 GB claimed, nothing on disk
    with pytest.raises(ImageError, match=r"huge\.png: the file is too large \(8,589,934,592 bytes"):
        load_image(huge)


def test_a_folder_and_a_missing_file_are_refused_by_name(tmp_path):
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_importing_the_package_is_cheap_and_load_model_is_imported_on_first_use():
    code = ("import sys, mnist_flow; assert 'torch' not in sys.modules and 'mnist_flow.review.predict' not in sys.modules; "
            "f = mnist_flow.load_model; assert 'mnist_flow.registry.store' in sys.modules and callable(f); print('ok')")
    env = {**os.environ, "MNIST_FLOW_HOME": "/nonexistent"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False).stdout.strip() == "ok"


def test_load_model_returns_the_champion_and_its_preprocessing(world_env, test_pngs):
    import mnist_flow

    loaded = mnist_flow.load_model("champion")
    paths, _ = test_pngs
    assert loaded.version.version == world_env.version.version and "champion" in loaded.version.aliases
    assert loaded.preprocessing.preparation == "mnist-digit"
    features = loaded.preprocessing(paths[0])
    assert features.shape == (1, 784) and torch.equal(features, world_env.prepared.test_x[:1])
    assert loaded.predict(paths[:5]) == predict_images(paths[:5], loaded.model, loaded.preprocessing)
