"""Reading and writing IDX files (the MNIST container format), strictly, streaming, and within limits.

An IDX file is a 4-byte magic ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32
dimensions, then the payload. Only the unsigned-byte type (``0x08``) is used by MNIST and
Fashion-MNIST, so only that type is accepted. Every defect is reported as a
:class:`~mnist_flow.errors.DataError` naming the file and the expected and actual values.

Reading a file never trusts its size: the 8- or 16-byte header is read first, the payload size it
announces is checked against a limit (``MAX_PAYLOAD_BYTES``) and, for a raw file, against the file's
size, before any payload is read. A gzipped file may be at most what gzip can make of the announced
size (``gzip_size_bound``) and is decompressed to at most the announced size plus one byte, so a gzip
bomb, an 8 GB sparse file or an absurd header is refused after reading a few bytes, not after
filling memory.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path

import numpy as np
import torch

from mnist_flow.errors import DataError
from mnist_flow.storage.fsutil import atomic_write

UBYTE = 0x08
MAGIC_IMAGES = 0x00000803
MAGIC_LABELS = 0x00000801
MAX_NDIM = 4  # MNIST uses 1 (labels) and 3 (images); more is certainly not an MNIST file.
GZIP_MAGIC = b"\x1f\x8b"
#: The largest payload read (2 GiB: 45x the MNIST training images); a header announcing more is refused.
MAX_PAYLOAD_BYTES = 1 << 31

_REFETCH_FIX = "Replace the file with an intact copy (re-download it or re-extract it from the original archive)."


def gzip_size_bound(raw_size: int) -> int:
    """The most bytes a gzip file of ``raw_size`` decompressed bytes can reasonably take.

    Deflate's worst case (stored blocks) adds 5 bytes per 64 KiB; 0.1 % plus 64 KiB leaves room for
    long gzip headers (file name, comment, extra field) and a few concatenated members.
    """
    return raw_size + raw_size // 1000 + (1 << 16)


@dataclass(frozen=True)
class IdxHeader:
    """A decoded IDX header: ``magic`` (e.g. 0x00000803) and the dimensions."""

    magic: int
    dims: tuple[int, ...]

    @property
    def offset(self) -> int:
        """Header length in bytes (where the payload starts)."""
        return 4 + 4 * len(self.dims)

    @property
    def payload_size(self) -> int:
        return math.prod(self.dims)

    @property
    def span(self) -> int:
        """The product of the non-zero dimensions: what the shape holds once its empty dimensions are filled.

        A shape such as 0x4294967295x4294967295 announces no data, but no array can take it (numpy refuses
        shapes whose non-zero dimensions overflow), so the limit applies to this, too.
        """
        return math.prod(d for d in self.dims if d)

    @property
    def size(self) -> int:
        """The size of the whole (uncompressed) file the header announces."""
        return self.offset + self.payload_size

    @property
    def shape_text(self) -> str:
        return "x".join(map(str, self.dims))

    def encode(self) -> bytes:
        return self.magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in self.dims)

    @classmethod
    def for_array(cls, shape: tuple[int, ...]) -> IdxHeader:
        """The header of an unsigned-byte IDX file holding an array of ``shape``."""
        return cls((UBYTE << 8) | len(shape), tuple(int(d) for d in shape))


def decode_idx_header(data: bytes | memoryview, *, path: str = "<bytes>") -> IdxHeader:
    """Decode the header at the start of ``data`` (which may hold more); the payload is not looked at."""
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
    return IdxHeader(magic, tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)))


def _check_limit(header: IdxHeader, path: str, max_payload: int) -> None:
    if header.payload_size > max_payload:
        raise DataError(
            f"{path}: absurd IDX header: it announces {header.shape_text} = {header.payload_size} bytes of data, "
            f"more than the limit of {max_payload} bytes.",
            fix=_REFETCH_FIX,
        )
    if header.span > max_payload:
        raise DataError(
            f"{path}: absurd IDX header: it announces the empty shape {header.shape_text}, whose non-zero "
            f"dimensions alone make {header.span}, more than the limit of {max_payload} bytes.",
            fix=_REFETCH_FIX,
        )


def _size_mismatch(header: IdxHeader, path: str, size: int, what: str = "the file") -> DataError:
    kind = "truncated" if size < header.size else "trailing data"
    return DataError(
        f"{path}: header and file size disagree: header says {header.shape_text} bytes of data, so {what} "
        f"should be {header.size} bytes, but it is {size} bytes ({kind}).",
        fix=_REFETCH_FIX,
    )


def parse_idx_header(data: bytes | memoryview, *, path: str = "<bytes>") -> tuple[int, tuple[int, ...], int]:
    """Check an IDX header against the data length; return ``(magic, dims, payload_offset)``."""
    header = decode_idx_header(data, path=path)
    if len(data) != header.size:
        raise _size_mismatch(header, path, len(data))
    return header.magic, header.dims, header.offset


def parse_idx(data: bytes, *, path: str = "<bytes>") -> torch.Tensor:
    """Decode raw (uncompressed) IDX bytes into a uint8 tensor of the header's shape; raises only DataError."""
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise DataError(f"{path}: expected bytes, got {type(data).__name__}.", fix="Pass the file's bytes.") from exc
    _, dims, offset = parse_idx_header(view, path=path)
    _check_limit(IdxHeader(0, dims), path, MAX_PAYLOAD_BYTES)
    # One copy, so the tensor owns writable memory (torch warns on read-only buffers).
    array = np.frombuffer(view, dtype=np.uint8, offset=offset).reshape(dims).copy()
    return torch.from_numpy(array)


# --- streaming reads of files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdxData:
    """One IDX file read from disk: its header, its content, and the md5 of the file as stored (if asked)."""

    header: IdxHeader
    tensor: torch.Tensor
    stored_md5: str | None = None

    def content_sha256(self) -> str:
        """SHA-256 of the uncompressed IDX file (header and payload), whatever container it came in."""
        return content_sha256(self.tensor)


def content_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of the unsigned-byte IDX file that holds ``tensor`` (uint8), i.e. of the official raw file."""
    digest = hashlib.sha256(IdxHeader.for_array(tuple(tensor.shape)).encode())
    digest.update(tensor.contiguous().numpy().data)
    return digest.hexdigest()


def _open_regular(path: Path) -> tuple[BufferedReader, int]:
    """Open ``path`` for reading if it is a regular file (a FIFO or a device would block or never end)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise DataError(f"{path}: is {kind}, expected an IDX file.", fix="Pass the data file itself.")
        handle = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.", fix="Check the path, or fetch the file again.") from None
    except OSError as exc:
        raise DataError(
            f"{path}: cannot be read ({exc.strerror or exc}).", fix="Check the file's permissions."
        ) from None
    return handle, info.st_size


def _read_up_to(handle: BufferedReader, n: int) -> bytes:
    parts = []
    while n > 0 and (chunk := handle.read(n)):
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _read_raw(
    path: Path, handle: BufferedReader, size: int, max_payload: int, check: Callable[[IdxHeader], None] | None
) -> tuple[IdxHeader, np.ndarray]:
    prefix = _read_up_to(handle, 4)
    if len(prefix) == 4 and 1 <= prefix[3] <= MAX_NDIM:
        prefix += _read_up_to(handle, 4 * prefix[3])
    header = decode_idx_header(prefix, path=str(path))
    if check is not None:
        check(header)
    _check_limit(header, str(path), max_payload)
    if size != header.size:  # checked before a byte of the payload is read (an 8 GB sparse file costs nothing)
        raise _size_mismatch(header, str(path), size)
    payload = np.empty(header.payload_size, dtype=np.uint8)
    view = payload.data
    filled = 0
    while filled < len(view) and (n := handle.readinto(view[filled:])):
        filled += n
    if filled != len(view):  # the file shrank while it was read
        raise _size_mismatch(header, str(path), header.offset + filled)
    return header, payload


class _Inflater:
    """Decompress gzip bytes (one or more members) in steps, never producing more than asked for."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        self._d = zlib.decompressobj(wbits=31)
        self._pending: bytes | memoryview = memoryview(data)

    def _corrupt(self, exc: Exception) -> DataError:
        return DataError(f"{self.path}: corrupt gzip data ({exc}).", fix=_REFETCH_FIX)

    def read(self, n: int) -> bytes:
        """Up to ``n`` decompressed bytes (fewer only at the end of the data); checks CRCs as members end."""
        parts: list[bytes] = []
        want = n
        try:
            while want > 0:
                if self._d.eof:
                    rest = bytes(self._d.unused_data)
                    if not rest.strip(b"\0"):
                        break  # the end, or zero padding after the last member (as gzip(1) accepts)
                    if rest[:2] != GZIP_MAGIC:
                        raise DataError(
                            f"{self.path}: corrupt gzip data: {len(rest)} bytes of trailing garbage after the "
                            "compressed stream.",
                            fix=_REFETCH_FIX,
                        )
                    self._d = zlib.decompressobj(wbits=31)
                    self._pending = rest
                out = self._d.decompress(self._pending, want)
                self._pending = self._d.unconsumed_tail
                parts.append(out)
                want -= len(out)
                if not out and not self._pending and not self._d.eof:
                    raise DataError(
                        f"{self.path}: truncated gzip stream ({len(self.data)} bytes): the end-of-stream marker "
                        "is missing.",
                        fix=_REFETCH_FIX,
                    )
        except zlib.error as exc:
            raise self._corrupt(exc) from None
        return b"".join(parts)


def _read_gzip(
    path: Path, handle: BufferedReader, size: int, max_payload: int, check: Callable[[IdxHeader], None] | None
) -> tuple[IdxHeader, np.ndarray, bytes]:
    magic = handle.read(2)
    if magic != GZIP_MAGIC:
        raise DataError(
            f"{path}: not gzip data: expected magic 1f8b, found {magic.hex() or 'an empty file'}.",
            fix="Remove the .gz suffix if the file is a raw IDX file, or replace it with an intact copy.",
        )
    # The compressed file itself is bounded first: no IDX file worth reading gzips to more than this.
    ceiling = gzip_size_bound(max_payload + 4 + 4 * MAX_NDIM)
    if size > ceiling:
        raise DataError(
            f"{path}: {size} bytes of gzip data, more than any IDX file within the limit of {max_payload} bytes "
            f"can take ({ceiling} bytes).",
            fix=_REFETCH_FIX,
        )
    stored = magic + _read_up_to(handle, size)
    inflater = _Inflater(path, stored)
    prefix = inflater.read(4)
    if len(prefix) == 4 and 1 <= prefix[3] <= MAX_NDIM:
        prefix += inflater.read(4 * prefix[3])
    header = decode_idx_header(prefix, path=str(path))
    if check is not None:
        check(header)
    _check_limit(header, str(path), max_payload)
    bound = gzip_size_bound(header.size)
    if len(stored) > bound:
        raise DataError(
            f"{path}: {len(stored)} bytes of gzip data, more than a gzip of the {header.size} bytes its header "
            f"announces ({header.shape_text}) can take ({bound} bytes).",
            fix=_REFETCH_FIX,
        )
    # Never more than the announced size plus one byte: one byte more is enough to know there is more.
    payload = inflater.read(header.payload_size + 1)
    if len(payload) != header.payload_size:
        more = len(payload) > header.payload_size
        raise DataError(
            f"{path}: header and content disagree: header says {header.shape_text} bytes of data, so the "
            f"decompressed file should be {header.size} bytes, but it "
            + (
                f"holds more (decompression stopped at {header.size + 1} bytes: trailing data or a gzip bomb)."
                if more
                else f"is {header.offset + len(payload)} bytes (truncated)."
            ),
            fix=_REFETCH_FIX,
        )
    return header, np.frombuffer(payload, dtype=np.uint8).copy(), stored


def load_idx(
    path: Path,
    *,
    max_payload: int = MAX_PAYLOAD_BYTES,
    stored_md5: bool = False,
    check: Callable[[IdxHeader], None] | None = None,
) -> IdxData:
    """Read an IDX file (gzipped when its name ends in .gz), header first, within limits; raises only DataError.

    ``check`` is called with the header before the payload is read (to refuse the wrong kind of file
    early, with its own DataError); ``stored_md5`` also returns the md5 of the file as stored.
    """
    path = Path(path)
    handle, size = _open_regular(path)
    md5 = None
    try:
        with handle:
            if str(path).endswith(".gz"):
                header, payload, stored = _read_gzip(path, handle, size, max_payload, check)
                if stored_md5:
                    md5 = hashlib.md5(stored, usedforsecurity=False).hexdigest()
            else:
                header, payload = _read_raw(path, handle, size, max_payload, check)
                if stored_md5:
                    digest = hashlib.md5(header.encode(), usedforsecurity=False)
                    digest.update(payload.data)
                    md5 = digest.hexdigest()
    except OSError as exc:
        raise DataError(
            f"{path}: cannot be read ({exc.strerror or exc}).", fix="Check the file and its disk."
        ) from None
    return IdxData(header, torch.from_numpy(payload.reshape(header.dims)), md5)


def read_idx(path: Path, *, max_payload: int = MAX_PAYLOAD_BYTES) -> torch.Tensor:
    """Read an IDX file, gzipped when its name ends in .gz; raises DataError for any defect."""
    return load_idx(path, max_payload=max_payload).tensor


def encode_idx(tensor: torch.Tensor) -> bytes:
    """Encode an integer tensor with values 0..255 as unsigned-byte IDX bytes."""
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"IDX files hold unsigned bytes; got a {tensor.dtype} tensor.")
    if not 1 <= tensor.ndim <= MAX_NDIM:
        raise ValueError(f"IDX files hold 1 to {MAX_NDIM} dimensions; got {tensor.ndim}.")
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) > 255):
        raise ValueError("IDX unsigned-byte values must lie in 0..255.")
    header = IdxHeader.for_array(tuple(tensor.shape)).encode()
    return header + tensor.detach().cpu().to(torch.uint8).contiguous().numpy().tobytes()


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    """Write ``tensor`` as an IDX file, gzipped (deterministically, mtime 0) when ``path`` ends in .gz; atomic."""
    data = encode_idx(tensor)
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    atomic_write(Path(path), data)
