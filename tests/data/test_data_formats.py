"""The layouts users have: re-gzipped official files, dot names and Keras' mnist.npz give the same fingerprint.

Each layout is built from the same content (the bundled sample, and the full Fashion-MNIST) and must load
with the fingerprint of the standard layout; official-size data is checked by the SHA-256 of its content,
whatever the container.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import (
    raw_contents,
    tiny_arrays,
    write_dataset,
    write_dot_names,
    write_npz,
    write_regzipped,
)
from testlib import require_fashion_mnist

from mnist_flow.data import datasets as data
from mnist_flow.data.datasets import load_dataset, validate_source
from mnist_flow.data.idx import content_sha256, encode_idx
from mnist_flow.errors import ConfigError, DataError


def _load(folder: Path, name: str = "mnist") -> data.DataBundle:
    return load_dataset(name, "dir", data_dir=folder, cache_dir=folder.parent / "unused-cache")


LAYOUTS = ["regzipped", "dot-raw", "dot-gz", "npz", "npz-compressed", "npz-int64-labels", "npz-fortran",
           "npz-file"]


def _build(layout: str, contents: dict[str, bytes], root: Path) -> Path:
    """Write ``contents`` in ``layout`` under ``root``; return what to pass as the data folder."""
    folder = root / layout
    if layout == "regzipped":
        write_regzipped(folder, contents)
    elif layout.startswith("dot"):
        write_dot_names(folder, contents, gz=layout == "dot-gz")
    elif layout == "npz-file":  # --data-dir pointing at the file itself
        write_npz(folder / "mnist.npz", contents, compressed=True)
        return folder / "mnist.npz"
    else:
        write_npz(folder / "mnist.npz", contents, compressed=layout == "npz-compressed",
                  label_dtype="int64" if layout == "npz-int64-labels" else "uint8", fortran=layout == "npz-fortran")
    return folder


@pytest.mark.realdata
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_of_the_sample_loads_with_the_standard_fingerprint(layout: str, tmp_path: Path) -> None:
    standard = load_dataset("mnist", "sample", cache_dir=tmp_path / "unused")
    bundle = _load(_build(layout, raw_contents(data.sample_dir()), tmp_path))
    assert bundle.fingerprint == standard.fingerprint
    assert bundle.train_labels.dtype == torch.int64 and bundle.train_images.dtype == torch.uint8
    assert torch.equal(bundle.test_images, standard.test_images)
    assert torch.equal(bundle.train_labels, standard.train_labels)
    assert bundle.source == "dir"


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["regzipped", "dot-raw", "npz"])
def test_every_layout_of_the_full_fashion_mnist_passes_the_official_check_with_one_fingerprint(
        layout: str, tmp_path: Path) -> None:
    folder = require_fashion_mnist()
    standard = _load(folder, "fashion-mnist")
    contents = raw_contents(folder)
    bundle = _load(_build(layout, contents, tmp_path), "fashion-mnist")  # 60,000/10,000: checked by SHA-256
    assert bundle.fingerprint == standard.fingerprint
    assert bundle.train_images.shape == (60_000, 28, 28)


@pytest.mark.realdata
def test_official_fashion_content_regzipped_but_altered_is_refused_by_its_sha256(tmp_path: Path) -> None:
    contents = _with_tiny_train(raw_contents(require_fashion_mnist()))
    labels = bytearray(contents["test_labels"])
    labels[200] = (labels[200] + 1) % 10  # a valid label, but no longer the official file
    contents["test_labels"] = bytes(labels)
    write_regzipped(tmp_path / "x", contents)
    expected = data._OFFICIAL_RAW_SHA256["fashion-mnist"]["t10k-labels-idx1-ubyte"]
    with pytest.raises(DataError, match=rf"t10k-labels-idx1-ubyte.gz: claims the official 10000 fashion-mnist "
                                        rf"records .*expected SHA-256 {expected}, found {content_sha256_of(labels)}"):
        _load(tmp_path / "x", "fashion-mnist")


def _with_tiny_train(contents: dict[str, bytes]) -> dict[str, bytes]:
    """The official test files with a 5-record training set (quicker to write; the test files decide)."""
    return {**contents, "train_images": encode_idx(torch.zeros(5, 28, 28, dtype=torch.uint8)),
            "train_labels": encode_idx(torch.arange(5, dtype=torch.uint8))}


def content_sha256_of(raw: bytes | bytearray) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()


@pytest.mark.realdata
def test_fashion_files_given_as_mnist_are_refused_raw_or_gzipped(tmp_path: Path) -> None:
    # Official-size raw MNIST files used to be accepted unverified; now raw, .gz and .npz are all checked.
    test_only = _with_tiny_train(raw_contents(require_fashion_mnist()))
    for layout in ("dot-raw", "regzipped", "npz"):
        with pytest.raises(DataError, match="claims the official 10000 mnist records but is not the official file: "
                                            "expected SHA-256 0fa7898d"):
            _load(_build(layout, test_only, tmp_path), "mnist")


@pytest.mark.realdata
def test_official_mnist_content_is_accepted_in_any_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No full MNIST here: let the sample's counts and content stand in for the official ones, so the MNIST
    # branch of the check (dash, dot, gz, npz) runs for real; a changed byte is still refused.
    contents = raw_contents(data.sample_dir())
    monkeypatch.setattr(data, "_OFFICIAL_COUNTS", {"train": 4000, "test": 1000})
    monkeypatch.setitem(data._OFFICIAL_RAW_SHA256, "mnist", {
        base: content_sha256_of(contents[field]) for field, base in data.FILES.items()})
    for layout in ("regzipped", "dot-gz", "npz"):
        _load(_build(layout, contents, tmp_path / "ok"))
    images = bytearray(contents["test_images"])
    images[5000] ^= 0x40
    for layout in ("regzipped", "dot-raw", "npz"):
        with pytest.raises(DataError, match="claims the official 1000 mnist records"):
            _load(_build(layout, {**contents, "test_images": bytes(images)}, tmp_path / "bad"))


def test_content_sha256_is_the_sha256_of_the_raw_idx_file() -> None:
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    assert content_sha256(images) == content_sha256_of(encode_idx(images))


# --- where the files are found -----------------------------------------------------------------------------------


def test_a_torchvision_raw_folder_with_gz_and_extracted_files_uses_the_gz(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    write_dataset(tmp_path, arrays, gz=True)
    write_dataset(tmp_path, arrays, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"garbage")  # not read: the .gz comes first
    assert torch.equal(_load(tmp_path).train_images, arrays["train_images"])


def test_dot_names_and_dash_names_may_be_mixed(tmp_path: Path) -> None:
    arrays = tiny_arrays()
    paths = write_dataset(tmp_path, arrays, gz=False)
    paths["test_labels"].rename(tmp_path / "t10k-labels.idx1-ubyte")
    assert _load(tmp_path).fingerprint == _load(write_dataset(tmp_path / "std", arrays, gz=False)[
        "test_labels"].parent).fingerprint


def test_a_folder_with_only_an_npz_of_any_name_is_read(tmp_path: Path) -> None:
    contents = {f: encode_idx(a) for f, a in tiny_arrays().items()}
    write_npz(tmp_path / "my-digits.npz", contents, compressed=False)
    assert _load(tmp_path).train_images.shape == (30, 28, 28)
    write_npz(tmp_path / "other.npz", contents, compressed=False)
    with pytest.raises(ConfigError, match=r"holds 2 .npz files \(my-digits.npz, other.npz\)") as info:
        validate_source("mnist", "dir", tmp_path)
    assert "--data-dir FOLDER/mnist.npz" in (info.value.fix or "")
    assert _load(tmp_path / "other.npz").train_images.shape == (30, 28, 28)


@pytest.mark.parametrize("name", ["notes.txt", "mnist.zip"])
def test_a_file_that_is_not_an_npz_is_refused_as_data_folder(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"is not a folder or an .npz file") as info:
        validate_source("mnist", "dir", tmp_path / name)
    assert "mnist.npz" in (info.value.fix or "")


def test_a_fifo_in_place_of_a_file_is_not_waited_on(tmp_path: Path) -> None:
    import os
    import threading

    from mnist_flow.data.idx import load_idx

    os.mkfifo(tmp_path / "train-images-idx3-ubyte")
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            load_idx(tmp_path / "train-images-idx3-ubyte")
        except DataError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    assert outcome and "not a regular file" in str(outcome[0])


# --- mnist.npz is data, never code ------------------------------------------------------------------------------

_NPZ_OK = {f: encode_idx(a) for f, a in tiny_arrays().items()}


def _npz(tmp_path: Path, **overrides: np.ndarray) -> Path:
    arrays = {}
    for field, key in data.NPZ_KEYS.items():
        raw = _NPZ_OK[field]
        ndim = raw[3]
        dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        arrays[key] = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    arrays.update(overrides)
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)
    return path


class _Payload:
    """Unpickling this would create a file: the loader must never unpickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_an_object_array_in_the_npz_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    evil = np.empty(30, dtype=object)
    evil[:] = [_Payload(str(marker))] * 30
    path = _npz(tmp_path, y_train=evil)
    pickle.loads(pickle.dumps(_Payload(str(tmp_path / "probe"))))  # the payload does work when unpickled
    assert (tmp_path / "probe").exists()
    with pytest.raises(DataError, match=r"y_train.npy holds object data, expected integer labels \(object arrays "
                                        r"are never loaded\)"):
        _load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"x_train": np.zeros((30, 28, 28), dtype=np.float32)}, r"x_train.npy holds float32 data, expected uint8"),
        ({"x_test": np.zeros((10, 28, 28), dtype=np.int16)}, r"x_test.npy holds int16 data, expected uint8"),
        ({"x_train": np.zeros((30, 784), dtype=np.uint8)}, r"x_train.npy has shape \[30, 784\], expected \[N, 28, 28\]"),
        ({"x_test": np.zeros((10, 27, 28), dtype=np.uint8)}, r"x_test.npy\): wrong image shape: expected 28x28"),
        ({"y_train": np.zeros((30, 1), dtype=np.uint8)}, r"y_train.npy has shape \[30, 1\], expected \[N\]"),
        ({"y_test": np.zeros(10, dtype=np.float64)}, r"y_test.npy holds float64 data, expected integer labels"),
        ({"y_test": np.full(10, -1, dtype=np.int64)}, r"\(y_test\): label out of range: expected 0..9, found -1 \(f"),
        ({"y_train": np.full(30, 300, dtype=np.int32)}, r"\(y_train\): label out of range: expected 0..9, found 300"),
        ({"y_train": np.zeros(29, dtype=np.uint8)}, r"\(x_train\) has 30 images but .*\(y_train\) has 29 labels"),
        ({"x_test": np.zeros((0, 28, 28), dtype=np.uint8), "y_test": np.zeros(0, dtype=np.uint8)},
         r"x_test.npy\): holds 0 records: the test set needs at least one"),
        ({"x_test": np.zeros(10, dtype=[("a", "u1")])}, r"x_test.npy holds .* data, expected uint8"),
    ],
)
def test_bad_npz_arrays_are_one_data_error_each(tmp_path: Path, overrides: dict, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern) as info:
        _load(_npz(tmp_path, **overrides))
    assert info.value.fix


def test_npz_missing_an_array_names_it_and_what_is_there_before_any_work(tmp_path: Path) -> None:
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((3, 28, 28), np.uint8), y_train=np.zeros(3, np.uint8),
             images=np.zeros(1))
    pattern = r"lacks x_test.npy, y_test.npy; .* it holds: images.npy, x_train.npy"
    with pytest.raises(DataError, match=pattern):
        validate_source("mnist", "dir", tmp_path)  # what the pipeline calls before a run starts
    with pytest.raises(DataError, match=pattern):
        _load(tmp_path / "mnist.npz")
    (tmp_path / "mnist.npz").write_bytes(b"PK not really")
    with pytest.raises(DataError, match=r"mnist.npz: not a valid .npz \(zip\) file"):
        validate_source("mnist", "dir", tmp_path / "mnist.npz")


@pytest.mark.parametrize("damage", ["not a zip", "truncated", "flipped byte"])
def test_damaged_npz_is_a_data_error(tmp_path: Path, damage: str) -> None:
    path = _npz(tmp_path)
    raw = path.read_bytes()
    if damage == "not a zip":
        raw = b"hello" * 100
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        at = raw.index(b"x_train.npy") + 11 + 200  # inside x_train's data (stored uncompressed): the CRC fails
        raw = raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1:]
    path.write_bytes(raw)
    with pytest.raises(DataError, match=str(path)) as info:
        _load(path)
    assert info.value.fix


def test_zip_bomb_in_the_npz_is_refused_from_the_zip_directory_before_decompressing(tmp_path: Path) -> None:
    import tracemalloc
    import zipfile

    # x_train.npy's header says 30x28x28, but the entry decompresses to 300 MB (a zip bomb of ~300 KB).
    path = _npz(tmp_path)
    header = np.lib.format.header_data_from_array_1_0(np.zeros((30, 28, 28), np.uint8))
    with zipfile.ZipFile(path) as src:
        others = {n: src.read(n) for n in src.namelist() if n != "x_train.npy"}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for name, body in others.items():
            out.writestr(name, body)
        with out.open("x_train.npy", "w", force_zip64=True) as entry:
            np.lib.format.write_array_header_1_0(entry, header)
            for _ in range(300):
                entry.write(bytes(1 << 20))
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"x_train.npy: the zip entry's size and the array's header disagree: "
                                            r"\[30, 28, 28\] uint8 needs 23648 bytes, the entry declares 314572928"):
            _load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak  # nothing near the 300 MB was decompressed


def test_npz_extra_arrays_are_ignored_and_gzip_of_the_whole_npz_is_not_an_npz(tmp_path: Path) -> None:
    path = _npz(tmp_path, x_val=np.zeros((2, 28, 28), np.uint8))
    assert _load(path).fingerprint == _load(write_dataset(tmp_path / "std", tiny_arrays(), gz=True)[
        "train_images"].parent).fingerprint
    gz = tmp_path / "gz" / "mnist.npz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(DataError, match="not a valid .npz"):
        _load(gz)
