"""Resource bombs and absurd files: headers and sizes are checked before work starts, reads stream within limits.

Memory is measured with tracemalloc (bytes objects and numpy buffers are traced): a refused bomb must never
come near the size it would decompress to.
"""

from __future__ import annotations

import gzip
import os
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from data_helpers import Mirror, endless_server, gz_files, tiny_arrays, write_dataset

from mnist_flow.cli import main as cli_main
from mnist_flow.data import datasets as data
from mnist_flow.data.datasets import load_dataset
from mnist_flow.data.idx import IdxHeader, encode_idx, gzip_size_bound, load_idx, read_idx
from mnist_flow.errors import DataError

GB = 1 << 30


def _peak(call: Callable[[], object]) -> tuple[BaseException | None, int]:
    """Run ``call``; return the exception it raised (or None) and its peak traced memory in bytes."""
    tracemalloc.start()
    try:
        try:
            call()
        except Exception as exc:
            return exc, tracemalloc.get_traced_memory()[1]
        return None, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _gzip_bomb(header: bytes, zeros: int) -> bytes:
    """A valid gzip file: ``header`` then ``zeros`` zero bytes (compresses about 1000:1)."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [co.compress(header)]
    block = bytes(1 << 20)
    for _ in range(zeros // len(block)):
        parts.append(co.compress(block))
    parts.append(co.flush())
    return b"".join(parts)


def _header(*dims: int) -> bytes:
    return IdxHeader.for_array(dims).encode()


def test_gzip_bomb_is_decompressed_no_further_than_its_header_plus_one_byte(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(_gzip_bomb(_header(1000, 28, 28), 200 << 20))  # 200 MB of zeros behind a 1000-image header
    assert path.stat().st_size < gzip_size_bound(16 + 1000 * 784)  # small enough to pass the container check
    error, peak = _peak(lambda: read_idx(path))
    assert isinstance(error, DataError), error
    assert "holds more (decompression stopped at 784017 bytes: trailing data or a gzip bomb)" in error.message
    assert peak < 4_000_000, peak  # the header's 0.8 MB (and a copy), not the bomb's 200 MB


def test_gzip_file_larger_than_its_header_can_explain_is_refused_before_decompressing(tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(_gzip_bomb(_header(10), 100 << 20))  # ~100 KB of gzip for a 18-byte file
    error, peak = _peak(lambda: read_idx(path))
    assert isinstance(error, DataError) and "more than a gzip of the 18 bytes its header announces" in error.message
    assert peak < 2 * path.stat().st_size + 1_000_000, peak


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_8_gb_sparse_file_is_refused_from_its_header_and_size(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    head = gzip.compress(encode_idx(torch.zeros(10, 28, 28, dtype=torch.uint8)))[:40] if suffix else \
        _header(60_000, 28, 28)
    with open(path, "wb") as out:
        out.write(head)
        out.truncate(8 * GB)  # sparse: 8 GB long, nothing on disk
    if os.stat(path).st_blocks * 512 > 100 << 20:
        pytest.skip("this file system does not make sparse files")
    error, peak = _peak(lambda: read_idx(path))
    assert isinstance(error, DataError), error
    expected = ("more than any IDX file within the limit" if suffix else
                "should be 47040016 bytes, but it is 8589934592 bytes (trailing data)")
    assert expected in error.message and error.fix
    assert peak < 1_000_000, peak


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_absurd_header_dims_are_refused_before_reading(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    raw = _header(0xFFFFFFFF, 0xFFFFFFFF, 28) + bytes(100)
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    error, peak = _peak(lambda: read_idx(path))
    assert isinstance(error, DataError)
    assert "absurd IDX header: it announces 4294967295x4294967295x28 = 516508833823349276700 bytes" in error.message
    assert peak < 1_000_000


def test_a_payload_over_the_limit_is_refused_even_when_the_size_matches(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(encode_idx(torch.zeros(3, 28, 28, dtype=torch.uint8)))
    with pytest.raises(DataError, match=r"absurd IDX header: it announces 3x28x28 = 2352 bytes of data, more than "
                                        r"the limit of 1000 bytes"):
        load_idx(path, max_payload=1000)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda raw: gzip.compress(raw[:-50]), r"decompressed file should be 7856 bytes, but it is 7806 bytes \(trunc"),
        (lambda raw: gzip.compress(raw)[:-3], r"truncated gzip stream"),
        (lambda raw: gzip.compress(raw) + b"garbage!", r"8 bytes of trailing garbage after the compressed stream"),
        (lambda raw: gzip.compress(raw + b"x"), r"holds more \(decompression stopped at 7857 bytes"),
        (lambda raw: gzip.compress(raw)[:12], r"truncated gzip stream|too short for an IDX header"),
        (lambda raw: gzip.compress(raw)[:5] + b"\xff" * 30, r"corrupt gzip data"),
    ],
)
def test_truncated_padded_and_corrupt_gzip_files_are_one_data_error(tmp_path: Path, make: Callable,
                                                                    pattern: str) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(make(encode_idx(torch.ones(10, 28, 28, dtype=torch.uint8))))
    with pytest.raises(DataError, match=pattern) as info:
        read_idx(path)
    assert str(path) in info.value.message and info.value.fix


def test_multi_member_gzip_and_zero_padding_are_read_like_gunzip_does(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    raw = encode_idx(images)
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + bytes(512))
    assert torch.equal(read_idx(path), images)
    assert gzip.decompress(path.read_bytes()[:-512]) == raw  # the reference agrees on the content


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_with_zero_records_is_refused_with_one_cli_message(
        split: str, tmp_path: Path, home: Path, capsys: pytest.CaptureFixture) -> None:
    arrays = tiny_arrays()
    arrays[f"{split}_images"] = torch.zeros(0, 28, 28, dtype=torch.uint8)
    arrays[f"{split}_labels"] = torch.zeros(0, dtype=torch.uint8)
    write_dataset(tmp_path / "idx", arrays, gz=split == "test")
    code = cli_main(["train", "--source", "dir", "--data-dir", str(tmp_path / "idx"), "--epochs", "1"])
    err = capsys.readouterr().err
    what = "training" if split == "train" else "test"
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and "Fix:" in err
    assert f"holds 0 records: the {what} set needs at least one" in err


def test_a_gzip_bomb_in_the_data_folder_is_one_cli_message(tmp_path: Path, home: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "idx"
    write_dataset(folder, tiny_arrays(), gz=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(_gzip_bomb(_header(30, 28, 28), 50 << 20))
    code = cli_main(["train", "--source", "dir", "--data-dir", str(folder), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "gzip bomb" in err, err


# --- downloads ---------------------------------------------------------------------------------------------------


def _bomb_stream() -> tuple[bytes, bytes]:
    """The start of an endless gzip stream (a valid header for 10 labels) and the filler that follows it."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    prefix = co.compress(_header(10)) + co.flush(zlib.Z_SYNC_FLUSH)
    return prefix, co.compress(bytes(1 << 20)) + co.flush(zlib.Z_SYNC_FLUSH)


@pytest.mark.parametrize("announced", [None, 10**12])
def test_a_mirror_with_an_endless_body_is_cut_off_at_the_expected_size_and_the_next_one_used(
        mirror: Mirror, tmp_path: Path, announced: int | None, caplog: pytest.LogCaptureFixture) -> None:
    prefix, filler = _bomb_stream()
    with endless_server(prefix, filler, content_length=announced) as endless:
        bundle = load_dataset("mnist", "download", cache_dir=tmp_path, timeout=10,
                              mirrors=[f"{endless.url}/x/", mirror.good()])
    assert bundle.source == "download" and bundle.origin == mirror.good()
    limit = gzip_size_bound(18)  # the labels file's header announces 18 bytes
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if announced is None:
        assert any(f"the body exceeds the expected {limit} bytes; cut off at" in w for w in warnings), warnings
    else:
        assert any(f"announces {announced} bytes, more than the expected" in w for w in warnings), warnings
    assert not list(tmp_path.rglob("*.part"))


def test_a_download_of_an_official_file_is_cut_off_at_its_official_size(tmp_path: Path) -> None:
    md5 = data._torchvision_resources("mnist")["t10k-labels-idx1-ubyte.gz"]
    prefix, filler = _bomb_stream()
    with endless_server(prefix, filler) as endless, pytest.raises(data._BadContent,
                                                                  match=r"exceeds the expected 4542 bytes"):
        data._fetch(f"{endless.url}/t10k-labels-idx1-ubyte.gz", md5, tmp_path / "t.gz", timeout=10)
    assert not list(tmp_path.iterdir())


def test_every_official_gz_size_is_known_by_its_md5() -> None:
    for name in data.DATASET_NAMES:
        for filename, md5 in data._torchvision_resources(name).items():
            assert data._OFFICIAL_GZ_SIZE[md5] > 4000, (name, filename)


@pytest.mark.realdata
def test_the_fashion_gz_sizes_are_debians_plus_the_file_name_in_the_gzip_header() -> None:
    from testlib import require_fashion_mnist

    folder = require_fashion_mnist()
    for filename, md5 in data._torchvision_resources("fashion-mnist").items():
        debian = folder / filename
        with gzip.open(debian) as handle:
            assert handle.read(4) == b"\x00\x00\x08" + bytes([1 if "labels" in filename else 3])
        assert data._OFFICIAL_GZ_SIZE[md5] == debian.stat().st_size + len(filename.removesuffix(".gz")) + 1


def test_a_mirror_serving_something_else_is_refused_from_its_first_bytes(mirror: Mirror, tmp_path: Path) -> None:
    files = gz_files(tiny_arrays())
    body = files["train-labels-idx1-ubyte.gz"]
    html = b"<html>" + b"x" * 100_000
    for served, pattern in ((html, "not gzip data: expected magic 1f8b, found 3c68"),
                            (gzip.compress(b"\x00\x00\x0d\x01" + bytes(100)), "not an unsigned-byte IDX file"),
                            (body[:10] + b"\xff" * 50, "corrupt gzip data")):
        with endless_server(served, b"") as server, pytest.raises(data._BadContent, match=pattern):
            data._fetch(f"{server.url}/f.gz", "0" * 32, tmp_path / "f.gz", timeout=10)
    assert not list(tmp_path.iterdir())


def test_an_8_gb_sparse_file_in_the_data_folder_is_one_cli_message_at_once(tmp_path: Path, home: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "idx"
    write_dataset(folder, tiny_arrays(), gz=False)
    with open(folder / "train-images-idx3-ubyte", "r+b") as out:
        out.truncate(8 * GB)  # the 30-image header stays; the file is now 8 GB, almost all of it a hole
    codes: list[int] = []
    error, peak = _peak(lambda: codes.append(cli_main(["train", "--source", "dir", "--data-dir", str(folder),
                                                       "--epochs", "1"])))
    err = capsys.readouterr().err
    assert error is None and codes == [2] and "Traceback" not in err and "Fix:" in err, err
    assert "should be 23536 bytes, but it is 8589934592 bytes (trailing data)" in err
    assert peak < 50_000_000, peak
