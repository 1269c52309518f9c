"""Reading and writing IDX files (the MNIST container format), strictly and without per-sample work.

An IDX file is a 4-byte magic ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32
dimensions, then the payload. Only the unsigned-byte type (``0x08``) is used by MNIST and
Fashion-MNIST, so only that type is accepted. Every defect is reported as a
:class:`~mnist_flow.errors.DataError` naming the file and the expected and actual values.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from mnist_flow.errors import DataError
from mnist_flow.fsutil import atomic_write

UBYTE = 0x08
MAGIC_IMAGES = 0x00000803
MAGIC_LABELS = 0x00000801
MAX_NDIM = 4  # MNIST uses 1 (labels) and 3 (images); more is certainly not an MNIST file.
GZIP_MAGIC = b"\x1f\x8b"

_REFETCH_FIX = "Replace the file with an intact copy (re-download it or re-extract it from the original archive)."


def parse_idx_header(data: bytes | memoryview, *, path: str = "<bytes>") -> tuple[int, tuple[int, ...], int]:
    """Check an IDX header against the data length; return ``(magic, dims, payload_offset)``."""
    size = len(data)
    if size < 4:
        raise DataError(
            f"{path}: too short for an IDX header: expected at least 4 bytes, found {size}.", fix=_REFETCH_FIX
        )
    magic = int.from_bytes(data[:4], "big")
    if bytes(data[:2]) == GZIP_MAGIC:
        raise DataError(
            f"{path}: is gzip-compressed data, expected a raw IDX file (magic 0x00000801/0x00000803).",
            fix="Give the file a .gz suffix, or decompress it (gunzip).",
        )
    ndim = data[3]
    if data[0] != 0 or data[1] != 0 or data[2] != UBYTE or not 1 <= ndim <= MAX_NDIM:
        raise DataError(
            f"{path}: not an unsigned-byte IDX file: expected magic 0x00000801 (labels) or 0x00000803 (images), "
            f"found 0x{magic:08x}.",
            fix=_REFETCH_FIX,
        )
    offset = 4 + 4 * ndim
    if size < offset:
        raise DataError(
            f"{path}: truncated IDX header: magic 0x{magic:08x} announces {ndim} dimensions, needing {offset} bytes, "
            f"file has {size}.",
            fix=_REFETCH_FIX,
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = offset + math.prod(dims)
    if size != expected:
        shape = "x".join(map(str, dims))
        raise DataError(
            f"{path}: header and file size disagree: header says {shape} bytes of data, so the file should be "
            f"{expected} bytes, but it is {size} bytes ({'truncated' if size < expected else 'trailing data'}).",
            fix=_REFETCH_FIX,
        )
    return magic, dims, offset


def parse_idx(data: bytes, *, path: str = "<bytes>") -> torch.Tensor:
    """Decode raw (uncompressed) IDX bytes into a uint8 tensor of the header's shape; raises only DataError."""
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise DataError(f"{path}: expected bytes, got {type(data).__name__}.", fix="Pass the file's bytes.") from exc
    _, dims, offset = parse_idx_header(view, path=path)
    # One copy, so the tensor owns writable memory (torch warns on read-only buffers).
    array = np.frombuffer(view, dtype=np.uint8, offset=offset).reshape(dims).copy()
    return torch.from_numpy(array)


def read_idx_bytes(path: Path) -> tuple[bytes, bytes]:
    """Return ``(file_bytes, idx_bytes)``: the file as stored, and its content decompressed when it ends in .gz."""
    try:
        stored = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.", fix="Check the path, or fetch the file again.") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}).", fix="Check the file's permissions.") from None
    if not str(path).endswith(".gz"):
        return stored, stored
    if stored[:2] != GZIP_MAGIC:
        raise DataError(
            f"{path}: not gzip data: expected magic 1f8b, found {stored[:2].hex() or 'an empty file'}.",
            fix="Remove the .gz suffix if the file is a raw IDX file, or replace it with an intact copy.",
        )
    try:
        raw = gzip.decompress(stored)
    except EOFError:
        raise DataError(
            f"{path}: truncated gzip stream ({len(stored)} bytes): the end-of-stream marker is missing.",
            fix=_REFETCH_FIX,
        ) from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc}).", fix=_REFETCH_FIX) from None
    return stored, raw


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file, gzipped when its name ends in .gz; raises DataError for any defect."""
    _, raw = read_idx_bytes(path)
    return parse_idx(raw, path=str(path))


def encode_idx(tensor: torch.Tensor) -> bytes:
    """Encode an integer tensor with values 0..255 as unsigned-byte IDX bytes."""
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"IDX files hold unsigned bytes; got a {tensor.dtype} tensor.")
    if not 1 <= tensor.ndim <= MAX_NDIM:
        raise ValueError(f"IDX files hold 1 to {MAX_NDIM} dimensions; got {tensor.ndim}.")
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) > 255):
        raise ValueError("IDX unsigned-byte values must lie in 0..255.")
    header = bytes([0, 0, UBYTE, tensor.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in tensor.shape)
    return header + tensor.detach().cpu().to(torch.uint8).contiguous().numpy().tobytes()


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    """Write ``tensor`` as an IDX file, gzipped (deterministically, mtime 0) when ``path`` ends in .gz; atomic."""
    data = encode_idx(tensor)
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    atomic_write(Path(path), data)
