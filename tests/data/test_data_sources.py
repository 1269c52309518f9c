"""Loading through 'dir' and 'sample': validation, official checksums, fingerprints, features."""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch
from data_helpers import tiny_arrays, write_dataset
from testlib import require_fashion_mnist

from mnist_flow.data import datasets as data
from mnist_flow.data.datasets import load_dataset, to_features, validate_source
from mnist_flow.errors import ConfigError, DataError


def _load_dir(folder: Path, name: str = "mnist") -> data.DataBundle:
    return load_dataset(name, "dir", data_dir=folder, cache_dir=folder / "unused-cache")


def test_dir_with_gz_and_raw_files_gives_the_same_fingerprint(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    write_dataset(tmp_path / "gz", arrays, gz=True)
    write_dataset(tmp_path / "raw", arrays, gz=False)
    a, b = _load_dir(tmp_path / "gz"), _load_dir(tmp_path / "raw")
    assert a.fingerprint == b.fingerprint and re.fullmatch(r"[0-9a-f]{64}", a.fingerprint)
    assert (a.source, a.origin) == ("dir", str(tmp_path / "gz"))
    assert a.train_images.dtype == torch.uint8 and a.train_images.shape == (30, 28, 28)
    assert a.train_labels.dtype == torch.int64 and torch.equal(a.train_labels, arrays["train_labels"])
    assert a.classes[0] == "0 - zero" and len(a.classes) == 10


@pytest.mark.parametrize("name", data.DATASET_NAMES)
def test_the_class_names_are_torchvisions(name: str) -> None:
    assert data.CLASSES[name] == tuple(data.torchvision_dataset(name).classes)


def test_fingerprint_changes_when_one_pixel_changes(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    before = _load_dir(write_dataset(tmp_path / "a", arrays, gz=True)["train_images"].parent).fingerprint
    arrays["test_images"][3, 5, 5] ^= 1
    after = _load_dir(write_dataset(tmp_path / "b", arrays, gz=True)["train_images"].parent).fingerprint
    assert before != after


def test_image_label_count_mismatch_names_both_files(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    arrays["train_labels"] = arrays["train_labels"][:-1]
    write_dataset(tmp_path, arrays, gz=True)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz has 30 images but .*train-labels-idx1-ubyte.gz "
                                        r"has 29 labels"):
        _load_dir(tmp_path)


def test_label_outside_zero_to_nine_is_a_data_error(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    arrays["test_labels"][4] = 10
    write_dataset(tmp_path, arrays, gz=False)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: label out of range: expected 0..9, found 10 "
                                        r"\(first bad record: 4\)"):
        _load_dir(tmp_path)


def test_wrong_image_shape_is_a_data_error(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    arrays["train_images"] = torch.zeros(30, 27, 28, dtype=torch.uint8)
    write_dataset(tmp_path, arrays, gz=True)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: wrong image shape: expected 28x28, found 27x28"):
        _load_dir(tmp_path)


def test_labels_file_in_place_of_images_is_a_wrong_magic_error(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    arrays["test_images"] = torch.zeros(10, dtype=torch.uint8)
    write_dataset(tmp_path, arrays, gz=True)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: wrong IDX magic for images: "
                                        r"expected 0x00000803, found 0x00000801"):
        _load_dir(tmp_path)


def test_gz_claiming_official_test_count_must_have_official_md5(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    arrays["test_images"] = torch.zeros(10_000, 28, 28, dtype=torch.uint8)
    arrays["test_labels"] = torch.zeros(10_000, dtype=torch.int64)
    paths = write_dataset(tmp_path, arrays, gz=True)
    actual = hashlib.md5(paths["test_images"].read_bytes()).hexdigest()
    expected = dict(data._torchvision_resources("mnist"))["t10k-images-idx3-ubyte.gz"]
    with pytest.raises(DataError) as info:
        _load_dir(tmp_path)
    message = info.value.message
    assert str(paths["test_images"]) in message
    assert f"expected md5 {expected}, found {actual}" in message and info.value.fix


def test_raw_fashion_file_claiming_official_count_must_have_official_sha256(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    arrays["test_images"] = torch.zeros(10_000, 28, 28, dtype=torch.uint8)
    arrays["test_labels"] = torch.zeros(10_000, dtype=torch.int64)
    paths = write_dataset(tmp_path, arrays, gz=False)
    actual = hashlib.sha256(paths["test_images"].read_bytes()).hexdigest()
    expected = data._OFFICIAL_RAW_SHA256["fashion-mnist"]["t10k-images-idx3-ubyte"]
    with pytest.raises(DataError, match=rf"t10k-images-idx3-ubyte: .*expected SHA-256 {expected}, found {actual}"):
        _load_dir(tmp_path, "fashion-mnist")


def test_subset_with_other_counts_needs_no_official_checksum(tmp_path: Path) -> None:
    write_dataset(tmp_path, tiny_arrays(n_train=60, n_test=9), gz=True)
    assert _load_dir(tmp_path, "fashion-mnist").test_images.shape[0] == 9


@pytest.mark.parametrize(
    ("name", "source", "data_dir", "pattern"),
    [
        ("cifar", "auto", None, "Unknown dataset 'cifar'"),
        ("mnist", "web", None, "Unknown data source 'web'"),
        ("fashion-mnist", "sample", None, "MNIST digits only"),
        ("mnist", "dir", None, "needs a data folder"),
        ("mnist", "dir", Path("/nonexistent/folder"), "does not exist"),
        ("mnist", "auto", Path("/tmp"), "only read with source='dir'"),
    ],
)
def test_validate_source_refuses_unusable_requests(name: str, source: str, data_dir: Path | None,
                                                   pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        validate_source(name, source, data_dir)
    assert info.value.fix


def test_validate_source_names_missing_files_in_dir(tmp_path: Path) -> None:
    write_dataset(tmp_path, tiny_arrays(), gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match=r"lacks t10k-labels-idx1-ubyte \(as .gz or raw, dash or dot name\)"):
        validate_source("mnist", "dir", tmp_path)


def test_to_features_matches_totensor_then_normalize() -> None:
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    features = to_features(images)
    assert features.shape == (5, 784) and features.dtype == torch.float32
    expected = (images.reshape(5, 784).float() / 255 - 0.5) / 0.5
    assert torch.allclose(features, expected, atol=1e-7)
    assert float(to_features(torch.full((1, 28, 28), 255, dtype=torch.uint8)).min()) == 1.0
    assert float(to_features(torch.zeros(1, 28, 28, dtype=torch.uint8)).max()) == -1.0
    assert torch.equal(images, images.clone())  # input untouched


def test_to_features_refuses_non_uint8_images() -> None:
    with pytest.raises(DataError, match="uint8 tensor of shape"):
        to_features(torch.zeros(2, 28, 28))


# --- real data -------------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_sample_has_400_and_100_digits_per_class_and_matching_checksums() -> None:
    bundle = load_dataset("mnist", "sample", cache_dir=Path("/nonexistent"))
    assert bundle.source == "sample"
    assert bundle.train_images.shape == (4000, 28, 28) and bundle.test_images.shape == (1000, 28, 28)
    assert torch.bincount(bundle.train_labels).tolist() == [400] * 10
    assert torch.bincount(bundle.test_labels).tolist() == [100] * 10
    assert int(bundle.train_images.max()) == 255  # grey levels 0..255, not rescaled
    folder = data.sample_dir()
    readme = (folder / "README.md").read_text()
    listed = dict((name, sha) for sha, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M))
    actual = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.gz")}
    assert listed == actual == data.SAMPLE_SHA256 and len(actual) == 4
    assert "Sebastian Raschka" in readme and "LeCun" in readme


@pytest.mark.realdata
def test_full_fashion_mnist_from_debian_gz_is_accepted_as_official() -> None:
    # How fast it loads is a benchmark's business (a wall-clock bound flakes on a busy machine).
    folder = require_fashion_mnist()
    bundle = _load_dir(folder, "fashion-mnist")
    assert bundle.train_images.shape == (60_000, 28, 28) and bundle.test_images.shape == (10_000, 28, 28)
    assert torch.bincount(bundle.test_labels).tolist() == [1000] * 10
    assert bundle.classes[0] == "T-shirt/top"


@pytest.mark.realdata
def test_full_fashion_mnist_raw_files_are_accepted_with_the_same_fingerprint(tmp_path: Path) -> None:
    folder = require_fashion_mnist()
    for path in folder.glob("*.gz"):
        with gzip.open(path) as src, open(tmp_path / path.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert _load_dir(tmp_path, "fashion-mnist").fingerprint == _load_dir(folder, "fashion-mnist").fingerprint
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    raw = bytearray(labels.read_bytes())
    raw[100] = (raw[100] + 1) % 10  # still a valid label, but no longer the official file
    labels.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: claims the official 10000 fashion-mnist records"):
        _load_dir(tmp_path, "fashion-mnist")
