"""MNIST and Fashion-MNIST as in-memory tensors: from a local cache, a download, a folder, or a bundled sample.

Sources (``SOURCES``):

* ``download``: the cache (``cache_dir/<name>/raw/``), else torchvision's mirrors (after any extra mirrors),
  each file checked against torchvision's md5 and written atomically.
* ``dir``: a folder holding the four IDX files (``train-images-idx3-ubyte`` or ``train-images.idx3-ubyte``,
  each gzipped or not), or Keras' ``mnist.npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test``; a folder
  holding one, or the file itself). Any record counts are accepted; files that claim the official counts must
  hold the official content (SHA-256 of the decompressed IDX data, whatever the container).
* ``sample``: 5,000 real MNIST digits shipped in the package (MNIST only), so the pipeline runs offline.
* ``auto``: the cache, then a download, then (MNIST only) the sample, with a warning saying what was used and why.

Every load validates the IDX structure, the shapes, the counts and the label range, and fingerprints the
decoded data (SHA-256) once; every format gives the same fingerprint for the same content. Headers and sizes
are checked before any data is read or decompressed (see :mod:`mnist_flow.data.idx`), so a bomb or an absurd file
is refused after a few bytes.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import math
import os
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import torchvision.datasets

from mnist_flow.data.idx import (
    GZIP_MAGIC,
    MAGIC_IMAGES,
    MAGIC_LABELS,
    MAX_NDIM,
    MAX_PAYLOAD_BYTES,
    IdxHeader,
    content_sha256,
    decode_idx_header,
    gzip_size_bound,
    load_idx,
    parse_idx,
    read_idx,
    write_idx,
)
from mnist_flow.errors import ConfigError, DataError, DownloadError
from mnist_flow.storage.fsutil import atomic_file

__all__ = [
    "DATASET_NAMES",
    "MEAN",
    "SOURCES",
    "STD",
    "DataBundle",
    "DataFallbackWarning",
    "load_dataset",
    "parse_idx",
    "read_idx",
    "stratified_split",
    "to_features",
    "validate_source",
    "write_idx",
]

logger = logging.getLogger(__name__)

DATASET_NAMES = ("mnist", "fashion-mnist")
SOURCES = ("auto", "download", "dir", "sample")
MEAN, STD = 0.5, 0.5
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10

#: Each dataset's class names, as torchvision's dataset classes list them (tests/data check they still do).
#: Kept here because every load needs them and importing torchvision takes 1-2 s of each process's start
#: (its models and ops): only a download, which needs its mirrors and checksums, imports it.
CLASSES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(
        f"{i} - {w}"
        for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    ),
    "fashion-mnist": tuple(
        ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    ),
}

# Bundle field -> standard IDX file name (without .gz), in torchvision's resource order.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: Other spellings of the same files, in order of preference after the standard one: the dot names of
#: several widespread copies (``train-images.idx3-ubyte``).
ALT_NAMES = {field: base.replace("-idx", ".idx") for field, base in FILES.items()}
#: Keras' mnist.npz: bundle field -> array name.
NPZ_KEYS = {"train_images": "x_train", "train_labels": "y_train", "test_images": "x_test", "test_labels": "y_test"}
_OFFICIAL_COUNTS = {"train": 60_000, "test": 10_000}

# SHA-256 of the official *decompressed* files. Fashion-MNIST: computed from Debian's dataset-fashion-mnist
# (/usr/share/datasets/fashion-mnist). Debian's .gz files differ from the official ones only in the gzip
# header (the file name was stripped and the mtime reset), so their md5 differs from torchvision's; putting
# the header back (FNAME = the file name, mtime 1504176606 for train-*, 1504176627 for t10k-*) reproduces
# torchvision's md5 for all four files, so these contents are verified to be the official ones.
# MNIST: the SHA-256 of the official uncompressed files as given in issue 16 (no full copy of MNIST is on this
# machine to recompute them; the bundled sample is a subset).
_OFFICIAL_RAW_SHA256: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
}

# Size in bytes of the official .gz files, by torchvision's md5: a download is cut off there. Fashion-MNIST's
# are Debian's sizes plus the file name its gzip header lacks (see above); MNIST's are the sizes of the files
# served by LeCun's site and torchvision's mirrors.
_OFFICIAL_GZ_SIZE: dict[str, int] = {
    "f68b3c2dcbeaaa9fbdd348bbdeb94873": 9_912_422,  # mnist train-images-idx3-ubyte.gz
    "d53e105ee54ea40749a09fcbcd1e9432": 28_881,  # mnist train-labels-idx1-ubyte.gz
    "9fb629c4189551a2d022fa330f9573f3": 1_648_877,  # mnist t10k-images-idx3-ubyte.gz
    "ec29112dd5afa0611ce80d1b7f02629c": 4_542,  # mnist t10k-labels-idx1-ubyte.gz
    "8d4fb7e6c68d591d4c3dfef9ec88bf0d": 26_421_880,  # fashion-mnist train-images-idx3-ubyte.gz
    "25c81989df183df01b3e8a0aad5dffbe": 29_515,  # fashion-mnist train-labels-idx1-ubyte.gz
    "bef4ecab320f06d8554ea6380940ec79": 4_422_102,  # fashion-mnist t10k-images-idx3-ubyte.gz
    "bb300cfdad3c16e7a12a480ee83cd310": 5_148,  # fashion-mnist t10k-labels-idx1-ubyte.gz
}

# SHA-256 of the bundled sample's files, as written by scripts/make_sample.py (also in sample/README.md).
SAMPLE_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8122c1e4578df1c2d9402306b4076bf10ea2ab3534154537ebf11dab6b94b279",
    "train-labels-idx1-ubyte.gz": "f64f5a080e79c763606963d4e37cc0776512dea35ec09e423cda6b3387950b5a",
    "t10k-images-idx3-ubyte.gz": "59bcc0f68f66ba862e8900d087c78934c9c2d1f6f86f5430fe619540f76500c3",
    "t10k-labels-idx1-ubyte.gz": "dc55c5ff7dea51a05e2155e9954561df756612f615d312bbb47c503de72acbdf",
}

_USER_AGENT = "mnist-flow (+https://pytorch.org/vision)"
_DOWNLOAD_FIX = (
    "Check the network connection, pass a reachable mirror (MNIST_FLOW_MIRRORS), or put the four IDX files "
    "in a folder and use source='dir'."
)


class DataFallbackWarning(UserWarning):
    """``source='auto'`` could not use the cache or a download and fell back to something smaller."""


@dataclass(frozen=True)
class DataBundle:
    """A whole dataset in memory, with where it came from and a fingerprint of its content."""

    name: str
    source: str
    origin: str
    fingerprint: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]


# --- torchvision's metadata, read through functions so tests can replace them without touching torchvision ----


def torchvision_dataset(name: str) -> type[torchvision.datasets.MNIST]:
    """torchvision's dataset class of ``name`` (imported here: see :data:`CLASSES`)."""
    import torchvision.datasets

    return {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]


def _torchvision_mirrors(name: str) -> list[str]:
    return list(torchvision_dataset(name).mirrors)


def _torchvision_resources(name: str) -> dict[str, str]:
    """``{"train-images-idx3-ubyte.gz": md5, ...}``."""
    return dict(torchvision_dataset(name).resources)


def _classes(name: str) -> tuple[str, ...]:
    return CLASSES[name]


# --- validation of the request ---------------------------------------------------------------------------------


def validate_source(name: str, source: str, data_dir: Path | None) -> None:
    """Cheap checks before any work: known name and source, a usable folder for 'dir', sample only for MNIST."""
    if name not in DATASET_NAMES:
        raise ConfigError(f"Unknown dataset {name!r}.", fix=f"Use one of: {', '.join(DATASET_NAMES)}.")
    if source not in SOURCES:
        raise ConfigError(f"Unknown data source {source!r}.", fix=f"Use one of: {', '.join(SOURCES)}.")
    if source == "sample" and name != "mnist":
        raise ConfigError(
            f"The bundled sample holds MNIST digits only; it cannot stand in for {name!r}.",
            fix=f"Use source='download' or source='dir' for {name}, or dataset 'mnist' with the sample.",
        )
    if source != "dir":
        if data_dir is not None:
            raise ConfigError(
                f"A data folder ({data_dir}) was given with source {source!r}; it is only read with source='dir'.",
                fix="Use source='dir' to load that folder, or drop the folder.",
            )
        return
    if data_dir is None:
        raise ConfigError("source='dir' needs a data folder, none was given.", fix="Pass the folder (--data-dir).")
    layout = _find_dir_files(Path(data_dir).expanduser())
    if layout.npz is not None:  # the zip directory only: cheap, and names a missing array before any work
        try:
            with zipfile.ZipFile(layout.npz) as archive:
                _npz_members(layout.npz, archive)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:  # (a zip version it cannot read)
            raise _npz_error(layout.npz, f"not a valid .npz (zip) file ({exc}).") from None


@dataclass(frozen=True)
class _DirLayout:
    """What a 'dir' source holds: the four IDX files (``idx``, field -> path) or one .npz file (``npz``)."""

    idx: dict[str, Path]
    npz: Path | None = None


_DIR_FIX = (
    "Pass the folder holding the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; dot names such as train-images.idx3-ubyte too; gzipped "
    "or not), or Keras' mnist.npz (the folder holding it, or the file)."
)


def _find_dir_files(folder: Path) -> _DirLayout:
    """What ``folder`` holds: the four IDX files, else one .npz; ``folder`` may also be the .npz file itself.

    Per file, the first of ``NAME.gz``, ``NAME``, ``DOTNAME.gz``, ``DOTNAME`` that exists is used (a
    torchvision raw folder holds both the .gz and the extracted file: the same content).
    """
    try:
        return _scan_dir(folder)
    except OSError as exc:  # e.g. a folder that cannot be listed
        raise ConfigError(
            f"Data folder {folder} cannot be read ({exc.strerror or exc}).",
            fix="Check the folder's permissions, or pass another folder.",
        ) from None


def _scan_dir(folder: Path) -> _DirLayout:
    if folder.is_file() and folder.suffix == ".npz":
        return _DirLayout({}, npz=folder)
    if not folder.is_dir():
        what = "is not a folder or an .npz file" if folder.exists() else "does not exist"
        raise ConfigError(f"Data folder {folder} {what}.", fix=_DIR_FIX)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for field, base in FILES.items():
        alt = ALT_NAMES[field]
        for candidate in (folder / f"{base}.gz", folder / base, folder / f"{alt}.gz", folder / alt):
            if candidate.is_file():
                found[field] = candidate
                break
        else:
            missing.append(base)
    if not missing:
        return _DirLayout(found)
    npz = sorted(p for p in folder.glob("*.npz") if p.is_file())
    if not found and len(npz) == 1:
        return _DirLayout({}, npz=npz[0])
    present = sorted(p.name for p in folder.iterdir())[:12]
    if not found and len(npz) > 1:
        raise ConfigError(
            f"Data folder {folder} holds {len(npz)} .npz files ({', '.join(p.name for p in npz)}) and no IDX files: "
            "which one to use is unclear.",
            fix="Pass the .npz file itself as the data folder (--data-dir FOLDER/mnist.npz).",
        )
    raise ConfigError(
        f"Data folder {folder} lacks {', '.join(missing)} (as .gz or raw, dash or dot name); it holds: "
        f"{', '.join(present) or 'nothing'}.",
        fix=_DIR_FIX,
    )


# --- decoding and checking -------------------------------------------------------------------------------------


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _check_kind(field: str, where: str, magic: int, dims: tuple[int, ...]) -> None:
    """A header (IDX, or an .npz array's as an IDX header) must be the kind of data its name says, with records."""
    is_images = field.endswith("images")
    expected_magic = MAGIC_IMAGES if is_images else MAGIC_LABELS
    if magic != expected_magic:
        kind = "images" if is_images else "labels"
        raise DataError(
            f"{where}: wrong IDX magic for {kind}: expected 0x{expected_magic:08x}, found 0x{magic:08x}.",
            fix="Check that the file is the one its name says (images vs labels), or replace it.",
        )
    if is_images and dims[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{where}: wrong image shape: expected 28x28, found {'x'.join(map(str, dims[1:]))}.",
            fix="Use 28x28 MNIST-format images.",
        )
    if dims[0] == 0:
        split = "training" if field.startswith("train") else "test"
        raise DataError(
            f"{where}: holds 0 records: the {split} set needs at least one.",
            fix=f"Use a {split} file with records (a subset may be small, but not empty).",
        )


def _read_field(field: str, path: Path, *, stored_md5: bool = False) -> tuple[torch.Tensor, str | None]:
    """Read one IDX file, refusing the wrong kind of file from its header, before reading its payload."""
    result = load_idx(
        path, stored_md5=stored_md5, check=lambda header: _check_kind(field, str(path), header.magic, header.dims)
    )
    return result.tensor, result.stored_md5


def _check_official(name: str, field: str, where: str, array: torch.Tensor, *, gz: Path | None = None) -> None:
    """Data claiming the official record count must be the official content (SHA-256 of the raw IDX file).

    The content is checked, not the container: a re-gzipped official file, the raw file and the arrays of
    Keras' mnist.npz all pass. ``gz``: the .gz file the data came from, whose md5 is named when refused.
    """
    split = field.split("_")[0]
    count = int(array.shape[0])
    if count != _OFFICIAL_COUNTS[split]:
        return  # a user's subset: structure checks only
    base = FILES[field]
    expected = _OFFICIAL_RAW_SHA256[name][base]
    actual = content_sha256(array)
    if actual == expected:
        return
    also = ""
    if gz is not None:
        try:
            stored_md5 = hashlib.md5(gz.read_bytes(), usedforsecurity=False).hexdigest()
        except OSError:
            stored_md5 = "unreadable"
        also = (
            f"; nor is it the official .gz file: expected md5 "
            f"{_torchvision_resources(name)[f'{base}.gz']}, found {stored_md5}"
        )
    raise DataError(
        f"{where}: claims the official {count} {name} records but is not the official file: expected SHA-256 "
        f"{expected}, found {actual} (of the uncompressed {base} content){also}.",
        fix="Replace it with the official file, or use a subset with a different record count.",
    )


def _check_pairs(arrays: dict[str, torch.Tensor], paths: dict[str, str]) -> None:
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{paths[f'{split}_images']} has {images.shape[0]} images but {paths[f'{split}_labels']} has "
                f"{labels.shape[0]} labels: expected equal counts.",
                fix="Use matching image and label files (the same subset of records).",
            )
        bad_mask = (labels < 0) | (labels >= NUM_CLASSES)
        if labels.numel() and bool(bad_mask.any()):
            where = int(torch.nonzero(bad_mask)[0])
            bad = int(labels[where])
            raise DataError(
                f"{paths[f'{split}_labels']}: label out of range: expected 0..{NUM_CLASSES - 1}, "
                f"found {bad} (first bad record: {where}).",
                fix="Replace the label file with an intact copy.",
            )


def _fingerprint(arrays: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for field in FILES:
        array = arrays[field]
        digest.update(f"{field}:uint8:{tuple(array.shape)};".encode())
        digest.update(array.numpy().data)
    return digest.hexdigest()


def _bundle(name: str, source: str, origin: str, arrays: dict[str, torch.Tensor], paths: dict[str, str]) -> DataBundle:
    _check_pairs(arrays, paths)
    # Labels are bytes in every format once checked (IDX already is), so the fingerprint is format-independent.
    arrays = {field: array.to(torch.uint8) for field, array in arrays.items()}
    return DataBundle(
        name=name,
        source=source,
        origin=origin,
        fingerprint=_fingerprint(arrays),
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].to(torch.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].to(torch.int64),
        classes=_classes(name),
    )


# --- sources ---------------------------------------------------------------------------------------------------


def _load_dir(name: str, folder: Path) -> DataBundle:
    layout = _find_dir_files(folder)
    if layout.npz is not None:
        return _load_npz(name, layout.npz)
    arrays: dict[str, torch.Tensor] = {}
    for field, path in layout.idx.items():
        arrays[field], _ = _read_field(field, path)
        _check_official(name, field, str(path), arrays[field], gz=path if path.name.endswith(".gz") else None)
    return _bundle(name, "dir", str(folder), arrays, {f: str(p) for f, p in layout.idx.items()})


_NPZ_FIX = "Replace it with an intact mnist.npz (np.savez of uint8 x_train/x_test [N, 28, 28] and y_train/y_test [N])."


def _npz_error(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}", fix=_NPZ_FIX)


def _npz_members(path: Path, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The four arrays' zip entries (``x_train.npy``, ...), by field."""
    infos = {info.filename: info for info in archive.infolist()}
    missing = [f"{key}.npy" for key in NPZ_KEYS.values() if f"{key}.npy" not in infos]
    if missing:
        present = ", ".join(sorted(infos)[:12]) or "nothing"
        raise DataError(
            f"{path}: lacks {', '.join(missing)}; expected Keras' mnist.npz arrays x_train, y_train, x_test, "
            f"y_test; it holds: {present}.",
            fix=_NPZ_FIX,
        )
    return {field: infos[f"{key}.npy"] for field, key in NPZ_KEYS.items()}


def _npz_header(
    path: Path, field: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo
) -> tuple[tuple[int, ...], np.dtype]:
    """Read an .npy entry's header; check its dtype, shape and declared size; return (shape, dtype).

    Only the header is decompressed; the entry's declared size must be exactly what the header implies
    (zipfile never decompresses past the declared size), so a zip bomb is refused here.
    """
    where = f"{path} ({info.filename})"
    with archive.open(info) as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle, max_header_size=4096)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle, max_header_size=4096)
            else:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        except (ValueError, SyntaxError, TypeError, OverflowError, EOFError) as exc:
            raise _npz_error(path, f"{info.filename} is not a valid .npy array ({exc}).") from None
        header_length = handle.tell()
    is_images = field.endswith("images")
    if dtype.hasobject or dtype.kind not in "ui" or dtype.fields is not None or dtype.subdtype is not None:
        raise _npz_error(
            path,
            f"{info.filename} holds {dtype} data, expected "
            f"{'uint8 grey levels' if is_images else 'integer labels'} (object arrays are never loaded).",
        )
    if is_images and (dtype.kind != "u" or dtype.itemsize != 1):
        raise _npz_error(path, f"{info.filename} holds {dtype} data, expected uint8 grey levels 0..255.")
    if len(shape) != (3 if is_images else 1):
        expected = "[N, 28, 28]" if is_images else "[N]"
        raise _npz_error(path, f"{info.filename} has shape {list(shape)}, expected {expected}.")
    magic = MAGIC_IMAGES if is_images else MAGIC_LABELS
    _check_kind(field, where, magic, tuple(int(d) for d in shape))
    data_size = math.prod(shape) * dtype.itemsize
    if data_size > MAX_PAYLOAD_BYTES:
        raise _npz_error(
            path,
            f"{info.filename} announces {list(shape)} = {data_size} bytes of data, more than "
            f"the limit of {MAX_PAYLOAD_BYTES} bytes.",
        )
    if info.file_size != header_length + data_size:
        raise _npz_error(
            path,
            f"{info.filename}: the zip entry's size and the array's header disagree: {list(shape)} {dtype} "
            f"needs {header_length + data_size} bytes, the entry declares {info.file_size} (truncated, padded, "
            "or a zip bomb).",
        )
    return tuple(int(d) for d in shape), dtype  # a Fortran-order array is read by numpy and made C-contiguous


def _load_npz(name: str, path: Path) -> DataBundle:
    """Keras' mnist.npz: checked entry by entry from the zip directory and .npy headers before reading data."""
    arrays: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    try:
        if not path.is_file():
            raise DataError(f"{path}: is not a regular file.", fix="Pass the .npz file itself, or its folder.")
        with zipfile.ZipFile(path) as archive:
            members = _npz_members(path, archive)
            headers = {field: _npz_header(path, field, archive, info) for field, info in members.items()}
            with np.load(path, allow_pickle=False) as npz:
                for field, key in NPZ_KEYS.items():
                    shape, dtype = headers[field]
                    array = npz[key]
                    if array.shape != shape or array.dtype != dtype:  # changed since its header was checked
                        raise _npz_error(path, f"{key} changed while it was read.")
                    if field.endswith("labels"):
                        array = array.astype(np.int64)
                    arrays[field] = torch.from_numpy(np.ascontiguousarray(array))
                    where[field] = f"{path} ({key})"
    except zipfile.BadZipFile as exc:
        raise _npz_error(path, f"not a valid .npz (zip) file ({exc}).") from None
    except (zlib.error, EOFError, ValueError, RuntimeError, NotImplementedError, OverflowError) as exc:
        raise _npz_error(path, f"cannot be read as Keras' mnist.npz ({type(exc).__name__}: {exc}).") from None
    except OSError as exc:
        raise DataError(
            f"{path}: cannot be read ({exc.strerror or exc}).", fix="Check the file's permissions."
        ) from None
    _check_pairs(arrays, where)  # labels in range before they become bytes
    for field in FILES:
        _check_official(name, field, where[field], arrays[field].to(torch.uint8))
    return _bundle(name, "dir", str(path), arrays, where)


def sample_dir() -> Path:
    """The folder of the bundled MNIST sample (inside the installed package)."""
    return Path(str(resources.files("mnist_flow") / "sample"))


def _load_sample() -> DataBundle:
    folder = sample_dir()
    arrays: dict[str, torch.Tensor] = {}
    paths: dict[str, str] = {}
    for field, base in FILES.items():
        path = folder / f"{base}.gz"
        try:
            stored = path.read_bytes()
        except OSError as exc:
            raise DataError(
                f"{path}: the bundled sample file cannot be read ({exc.strerror or exc}).",
                fix="Reinstall mnist-flow (the package data is damaged).",
            ) from None
        expected = SAMPLE_SHA256.get(path.name)
        actual = hashlib.sha256(stored).hexdigest()
        if actual != expected:
            raise DataError(
                f"{path}: the bundled sample file does not match its recorded checksum: expected SHA-256 "
                f"{expected}, found {actual}.",
                fix="Reinstall mnist-flow (the package data is damaged).",
            )
        arrays[field], _ = _read_field(field, path)
        paths[field] = str(path)
    return _bundle("mnist", "sample", str(folder), arrays, paths)


def _move_aside(path: Path, reason: str) -> None:
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    logger.warning("%s is corrupt (%s); moved it to %s and fetching it again", path, reason, target.name)


def _download_file(
    filename: str, md5: str, target: Path, mirrors: Sequence[str], dead: set[str], timeout: float, tried: list[str]
) -> str:
    """Fetch ``filename`` from the first mirror that serves it with the right md5; return the URL used."""
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{filename}"
        if mirror in dead:
            tried.append(f"{url} (skipped: mirror unreachable earlier)")
            continue
        try:
            _fetch(url, md5, target, timeout)
        except _BadContent as exc:
            tried.append(f"{url} ({exc})")
            logger.warning("%s: %s; trying the next mirror", url, exc)
            continue
        except urllib.error.HTTPError as exc:
            exc.close()
            tried.append(f"{url} (HTTP {exc.code} {exc.reason})")
            continue
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            tried.append(f"{url} ({type(exc).__name__}: {reason})")
            dead.add(mirror)  # a connection-level failure: do not wait on this mirror for the other files
            continue
        logger.info("downloaded %s", url)
        return url
    raise DownloadError(
        f"Could not download {filename}; tried: " + ("; ".join(tried) or "no mirrors") + ".",
        fix=_DOWNLOAD_FIX,
    )


class _BadContent(Exception):
    """A mirror answered, but with bytes that are not the expected file."""


#: A download whose first this-many bytes hold no IDX header is cut off.
_MAX_HEADER_PREFIX = 1 << 20


def _sniff_header(prefix: bytes, url: str) -> IdxHeader | None:
    """The IDX header at the start of the gzip bytes received so far (None: not enough yet).

    Only the header is decompressed (at most 20 bytes of output), whatever the prefix holds.
    """
    if prefix[:2] != GZIP_MAGIC[: len(prefix[:2])]:
        raise _BadContent(f"not gzip data: expected magic 1f8b, found {prefix[:2].hex()}")
    try:
        head = zlib.decompressobj(wbits=31).decompress(prefix, 4 + 4 * MAX_NDIM)
    except zlib.error as exc:
        raise _BadContent(f"corrupt gzip data ({exc})") from None
    if len(head) < 4 or len(head) < 4 + 4 * head[3]:
        if len(prefix) > _MAX_HEADER_PREFIX:
            raise _BadContent(f"no IDX header in the first {len(prefix)} bytes")
        return None
    try:
        return decode_idx_header(head, path=url)
    except DataError as exc:
        raise _BadContent(exc.message.removeprefix(f"{url}: ").rstrip(".")) from None


def _fetch(url: str, md5: str, target: Path, timeout: float) -> None:
    """Stream ``url`` into a temp file next to ``target``, check its md5, then rename it into place.

    The body is cut off at the expected size: the official file's size when the md5 is an official one,
    else the most a gzip of what the IDX header (read from the first bytes) announces can take; a
    ``Content-Length`` beyond that is refused before the body is read.
    """
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digest = hashlib.md5(usedforsecurity=False)
    known = _OFFICIAL_GZ_SIZE.get(md5)
    limit = known if known is not None else gzip_size_bound(MAX_PAYLOAD_BYTES + 4 + 4 * MAX_NDIM)
    # raising inside the block (a bad md5 included) leaves ``target`` untouched and removes the temp file
    with atomic_file(target) as out, urllib.request.urlopen(request, timeout=timeout) as response:
        announced = response.headers.get("Content-Length")
        announced_size = int(announced) if announced and announced.strip().isdigit() else None

        def check_announced() -> None:
            if announced_size is not None and announced_size > limit:
                raise _BadContent(f"announces {announced_size} bytes, more than the expected {limit}")

        check_announced()
        prefix = b""
        header: IdxHeader | None = None
        received = 0
        while chunk := response.read(min(1 << 20, limit + 1 - received)):
            received += len(chunk)
            if received > limit:
                raise _BadContent(f"the body exceeds the expected {limit} bytes; cut off at {received}")
            digest.update(chunk)
            out.write(chunk)
            if header is None and len(prefix) <= _MAX_HEADER_PREFIX:
                prefix += chunk[: _MAX_HEADER_PREFIX + 1 - len(prefix)]
                header = _sniff_header(prefix, url)
                if header is not None:
                    prefix = b""
                    if known is None:
                        limit = min(limit, gzip_size_bound(header.size))
                        check_announced()
                        if received > limit:
                            raise _BadContent(f"the body exceeds the expected {limit} bytes; cut off at {received}")
        if digest.hexdigest() != md5:
            raise _BadContent(f"md5 mismatch: expected {md5}, found {digest.hexdigest()}")


def _load_cache_or_download(name: str, cache_dir: Path, mirrors: Sequence[str], timeout: float) -> DataBundle:
    raw_dir = Path(cache_dir).expanduser() / name / "raw"
    md5s = _torchvision_resources(name)
    all_mirrors = list(dict.fromkeys([*mirrors, *_torchvision_mirrors(name)]))
    dead: set[str] = set()
    arrays: dict[str, torch.Tensor] = {}
    paths: dict[str, str] = {}
    used_urls: list[str] = []
    for field, base in FILES.items():
        filename = f"{base}.gz"
        path = raw_dir / filename
        expected_md5 = md5s[filename]
        for attempt in ("cache", "download"):
            if attempt == "download":
                tried: list[str] = []
                used_urls.append(_download_file(filename, expected_md5, path, all_mirrors, dead, timeout, tried))
            elif not path.exists():
                continue
            try:
                tensor, actual = _read_field(field, path, stored_md5=True)
                if actual != expected_md5:
                    raise DataError(f"{path}: md5 mismatch: expected {expected_md5}, found {actual}.")
                arrays[field] = tensor
                break
            except DataError as exc:
                if attempt == "download":
                    raise  # the mirror served the right md5 but bad content: nothing more to try
                _move_aside(path, exc.message)
        paths[field] = str(path)
    if used_urls:
        origin = ", ".join(dict.fromkeys(url.rsplit("/", 1)[0] + "/" for url in used_urls))
        return _bundle(name, "download", origin, arrays, paths)
    return _bundle(name, "cache", str(raw_dir), arrays, paths)


def load_dataset(
    name: str,
    source: str = "auto",
    *,
    data_dir: Path | None = None,
    cache_dir: Path,
    mirrors: Sequence[str] = (),
    timeout: float = 30.0,
) -> DataBundle:
    """Load a whole dataset into memory from ``source``; see the module docstring for what each source does."""
    validate_source(name, source, data_dir)
    if source == "dir":
        assert data_dir is not None  # checked by validate_source
        return _load_dir(name, Path(data_dir).expanduser())
    if source == "sample":
        return _load_sample()
    if source == "download":
        return _load_cache_or_download(name, cache_dir, mirrors, timeout)
    try:
        return _load_cache_or_download(name, cache_dir, mirrors, timeout)
    except DataError as exc:
        if name != "mnist":
            raise
        reason = exc.message
    message = (
        f"Could not load the full MNIST from the cache or a download ({reason}); "
        "using the bundled 5,000-digit MNIST sample instead."
    )
    logger.warning(message)
    warnings.warn(message, DataFallbackWarning, stacklevel=2)
    return _load_sample()


# --- helpers for training --------------------------------------------------------------------------------------


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (train_idx, val_idx): per-class proportional, disjoint, covering, fixed by ``seed``.

    Each class gives ``count * val_fraction`` records to validation, rounded so that every class is within
    one record of proportional and the total is ``round(len(labels) * val_fraction)`` (largest remainders).
    Both index tensors are sorted int64.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(
            f"Validation fraction must lie strictly between 0 and 1, got {val_fraction}.", fix="Use e.g. 0.1."
        )
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    n = labels.numel()
    total_val = round(n * val_fraction)
    if total_val == 0 or total_val == n:
        raise ConfigError(
            f"A validation fraction of {val_fraction} of {n} records leaves an empty "
            f"{'validation' if total_val == 0 else 'training'} set.",
            fix="Use more data or a different validation fraction.",
        )
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * val_fraction
    quota = exact.floor().long()
    remainder = total_val - int(quota.sum())
    if remainder > 0:
        # Largest fractional parts first; ties go to the lower class (stable sort).
        order = torch.sort(exact - quota, descending=True, stable=True).indices
        quota[order[:remainder]] += 1
    generator = torch.Generator().manual_seed(int(seed))
    val_parts = []
    for cls, k in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == cls).reshape(-1)
        val_parts.append(members[torch.randperm(members.numel(), generator=generator)[:k]])
    val_mask = torch.zeros(n, dtype=torch.bool)
    val_mask[torch.cat(val_parts)] = True
    return torch.nonzero(~val_mask).reshape(-1), torch.nonzero(val_mask).reshape(-1)


def to_features(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 784] on ``device``: ``(x / 255 - MEAN) / STD``, as ToTensor + Normalize."""
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise DataError(
            f"Images must be a uint8 tensor of shape [N, 28, 28], got {images.dtype} {list(images.shape)}.",
            fix="Pass DataBundle images (or decode the images to 28x28 grey levels first).",
        )
    # Move the bytes first (4x less to transfer), then one fused chain of in-place ops on the float copy.
    features = images.to(device=device).reshape(images.shape[0], -1).to(torch.float32)
    return features.div_(255.0).sub_(MEAN).div_(STD)
