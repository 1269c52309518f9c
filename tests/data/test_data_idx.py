"""IDX parsing: round trips, every kind of malformed file, and a fuzz test that only DataError escapes."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_flow.data.datasets import parse_idx, read_idx, write_idx
from mnist_flow.data.idx import encode_idx
from mnist_flow.errors import DataError


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_then_read_round_trips_images_and_labels(tmp_path: Path, suffix: str) -> None:
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 9, 3, 3, 1, 2, 5])  # int64, as in DataBundle
    write_idx(tmp_path / f"img{suffix}", images)
    write_idx(tmp_path / f"lab{suffix}", labels)
    assert torch.equal(read_idx(tmp_path / f"img{suffix}"), images)
    got = read_idx(tmp_path / f"lab{suffix}")
    assert got.dtype == torch.uint8 and got.tolist() == labels.tolist()


def test_write_idx_gzip_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    t = torch.arange(100, dtype=torch.uint8).reshape(4, 25)
    write_idx(tmp_path / "a.gz", t)
    write_idx(tmp_path / "b.gz", t)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    assert not list(tmp_path.glob("*.part"))


def test_header_bytes_follow_the_idx_format() -> None:
    raw = encode_idx(torch.zeros(2, 28, 28, dtype=torch.uint8))
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert raw[4:16] == (2).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    assert encode_idx(torch.zeros(5, dtype=torch.uint8))[:8] == b"\x00\x00\x08\x01" + (5).to_bytes(4, "big")


def test_truncated_gzip_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated gzip") as info:
        read_idx(path)
    assert str(path) in info.value.message and info.value.fix


def test_non_gzip_bytes_in_a_gz_file_are_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(encode_idx(torch.zeros(3, dtype=torch.uint8)))
    with pytest.raises(DataError, match=r"expected magic 1f8b, found 0000"):
        read_idx(path)


def test_wrong_magic_names_expected_and_found() -> None:
    raw = bytearray(encode_idx(torch.zeros(3, dtype=torch.uint8)))
    raw[2] = 0x0D  # float type
    with pytest.raises(DataError, match=r"my.idx.*expected magic 0x00000801.*0x00000803.*found 0x00000d01"):
        parse_idx(bytes(raw), path="my.idx")


def test_gzipped_bytes_given_to_parse_idx_get_a_hint() -> None:
    with pytest.raises(DataError, match="gzip-compressed") as info:
        parse_idx(gzip.compress(b"abc"))
    assert "gunzip" in (info.value.fix or "")


@pytest.mark.parametrize(("cut", "word"), [(-1, "truncated"), (+3, "trailing data")])
def test_header_disagreeing_with_file_size_is_a_data_error(cut: int, word: str) -> None:
    raw = encode_idx(torch.zeros(4, 28, 28, dtype=torch.uint8))
    raw = raw[:cut] if cut < 0 else raw + b"\0" * cut
    expected = 16 + 4 * 28 * 28
    with pytest.raises(DataError, match=rf"f.idx.*should be {expected} bytes, but it is {len(raw)} bytes \({word}"):
        parse_idx(raw, path="f.idx")


def test_short_header_is_a_data_error() -> None:
    with pytest.raises(DataError, match="needing 16 bytes, file has 10"):
        parse_idx(b"\x00\x00\x08\x03" + b"\x00" * 6)
    with pytest.raises(DataError, match="at least 4 bytes, found 2"):
        parse_idx(b"\x00\x00")


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_an_empty_shape_no_array_can_take_is_a_data_error_not_a_numpy_error(tmp_path: Path, suffix: str) -> None:
    # 0 x (2**32-1) x (2**32-1) announces no data, so the file's size matches, but numpy refuses the shape
    # ("array is too big"): a case Hypothesis found, kept here so it is tested on every run.
    raw = bytes([0, 0, 8, 3]) + (0).to_bytes(4, "big") + (2**32 - 1).to_bytes(4, "big") * 2
    path = tmp_path / f"f{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    with pytest.raises(DataError, match="empty shape 0x4294967295x4294967295"):
        read_idx(path)
    with pytest.raises(DataError, match="non-zero dimensions alone"):
        parse_idx(raw)
    empty = bytes([0, 0, 8, 3]) + (0).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2  # a real empty set loads
    assert tuple(parse_idx(empty).shape) == (0, 28, 28)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope")


# --- fuzz ------------------------------------------------------------------------------------------------------

_VALID = encode_idx(torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8))


def _parse_or_data_error(raw: bytes) -> None:
    try:
        result = parse_idx(raw)
    except DataError:
        return
    assert isinstance(result, torch.Tensor) and result.dtype == torch.uint8
    assert 4 + 4 * result.ndim + result.numel() == len(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_raise_only_data_error(raw: bytes) -> None:
    _parse_or_data_error(raw)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=6),
    st.integers(0, len(_VALID)),
    st.binary(max_size=20),
)
def test_fuzz_mutated_valid_files_raise_only_data_error(
    edits: list[tuple[int, int]], keep: int, tail: bytes
) -> None:
    raw = bytearray(_VALID)
    for pos, value in edits:
        raw[pos] = value
    _parse_or_data_error(bytes(raw[:keep]) + tail)


_GZ_DIR = Path(tempfile.mkdtemp(prefix="idx-fuzz-"))
_VALID_GZ = gzip.compress(_VALID, mtime=0)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_VALID_GZ) - 1), st.integers(0, 255)), max_size=4),
       st.integers(0, len(_VALID_GZ)))
def test_fuzz_mutated_gzip_files_raise_only_data_error(edits: list[tuple[int, int]], keep: int) -> None:
    raw = bytearray(_VALID_GZ)
    for pos, value in edits:
        raw[pos] = value
    path = _GZ_DIR / "f.gz"
    path.write_bytes(bytes(raw[:keep]))
    try:
        read_idx(path)
    except DataError:
        pass
