"""MNIST and Fashion-MNIST as in-memory tensors: from a local cache, a download, a folder, or a bundled sample.

Sources (``SOURCES``):

* ``download``: the cache (``cache_dir/<name>/raw/``), else torchvision's mirrors (after any extra mirrors),
  each file checked against torchvision's md5 and written atomically.
* ``dir``: a folder holding the four standard IDX files, gzipped or not. Any record counts are accepted;
  files that claim the official counts must match the official checksums.
* ``sample``: 5,000 real MNIST digits shipped in the package (MNIST only), so the pipeline runs offline.
* ``auto``: the cache, then a download, then (MNIST only) the sample, with a warning saying what was used and why.

Every load validates the IDX structure, the shapes, the counts and the label range, and fingerprints the
decoded data (SHA-256) once.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torchvision.datasets

from mnist_flow.errors import ConfigError, DataError, DownloadError
from mnist_flow.fsutil import atomic_file
from mnist_flow.idx import (
    MAGIC_IMAGES,
    MAGIC_LABELS,
    parse_idx,
    parse_idx_header,
    read_idx,
    read_idx_bytes,
    write_idx,
)

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

_TORCHVISION_CLASSES: dict[str, type[torchvision.datasets.MNIST]] = {
    "mnist": torchvision.datasets.MNIST,
    "fashion-mnist": torchvision.datasets.FashionMNIST,
}

# Bundle field -> standard IDX file name (without .gz), in torchvision's resource order.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_OFFICIAL_COUNTS = {"train": 60_000, "test": 10_000}

# SHA-256 of the official *decompressed* files. Fashion-MNIST: computed from Debian's dataset-fashion-mnist
# (/usr/share/datasets/fashion-mnist). Debian's .gz files differ from the official ones only in the gzip
# header (the file name was stripped and the mtime reset), so their md5 differs from torchvision's; putting
# the header back (FNAME = the file name, mtime 1504176606 for train-*, 1504176627 for t10k-*) reproduces
# torchvision's md5 for all four files, so these contents are verified to be the official ones.
# MNIST: no copy of the official data was available to hash, so raw (uncompressed) MNIST files cannot be
# verified; only the .gz files are, through torchvision's md5.
_OFFICIAL_RAW_SHA256: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    "mnist": {},
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


def _torchvision_mirrors(name: str) -> list[str]:
    return list(_TORCHVISION_CLASSES[name].mirrors)


def _torchvision_resources(name: str) -> dict[str, str]:
    """``{"train-images-idx3-ubyte.gz": md5, ...}``."""
    return dict(_TORCHVISION_CLASSES[name].resources)


def _classes(name: str) -> tuple[str, ...]:
    return tuple(_TORCHVISION_CLASSES[name].classes)


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
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"Data folder {folder} {what}.", fix="Pass the folder holding the four IDX files.")
    _find_dir_files(folder)


def _find_dir_files(folder: Path) -> dict[str, Path]:
    """Map each bundle field to the file in ``folder`` (``.gz`` preferred: it can be checked by md5)."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for field, base in FILES.items():
        for candidate in (folder / f"{base}.gz", folder / base):
            if candidate.is_file():
                found[field] = candidate
                break
        else:
            missing.append(base)
    if missing:
        present = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else []
        raise ConfigError(
            f"Data folder {folder} lacks {', '.join(missing)} (as .gz or raw); it holds: "
            f"{', '.join(present) or 'nothing'}.",
            fix="Put the four standard IDX files there (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; gzipped or not).",
        )
    return found


# --- decoding and checking -------------------------------------------------------------------------------------


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _decode(field: str, raw: bytes, path: str) -> torch.Tensor:
    """Parse one file's IDX bytes and check it is the kind of file its name says."""
    is_images = field.endswith("images")
    expected_magic = MAGIC_IMAGES if is_images else MAGIC_LABELS
    magic, dims, _ = parse_idx_header(raw, path=path)
    if magic != expected_magic:
        kind = "images" if is_images else "labels"
        raise DataError(
            f"{path}: wrong IDX magic for {kind}: expected 0x{expected_magic:08x}, found 0x{magic:08x}.",
            fix="Check that the file is the one its name says (images vs labels), or replace it.",
        )
    if is_images and dims[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{path}: wrong image shape: expected 28x28, found {'x'.join(map(str, dims[1:]))}.",
            fix="Use 28x28 MNIST-format images.",
        )
    return parse_idx(raw, path=path)


def _check_official(name: str, field: str, path: Path, stored: bytes, raw: bytes) -> None:
    """Files claiming the official record count must be the official files."""
    split = field.split("_")[0]
    count = int.from_bytes(raw[4:8], "big")
    if count != _OFFICIAL_COUNTS[split]:
        return  # a user's subset: structure checks only
    base = FILES[field]
    raw_sha = _OFFICIAL_RAW_SHA256[name].get(base)
    if str(path).endswith(".gz"):
        expected_md5 = _torchvision_resources(name)[f"{base}.gz"]
        actual_md5 = _md5(stored)
        if actual_md5 == expected_md5:
            return
        # A recompressed official file (e.g. Debian's) is still official if its content is.
        if raw_sha is not None and hashlib.sha256(raw).hexdigest() == raw_sha:
            return
        also = f" and its content is not the official one (SHA-256 {raw_sha})" if raw_sha else ""
        raise DataError(
            f"{path}: claims the official {count} {name} records but is not the official file: "
            f"expected md5 {expected_md5}, found {actual_md5}{also}.",
            fix="Replace it with the official file, or use a subset with a different record count.",
        )
    if raw_sha is None:
        # MNIST raw files: no official SHA-256 of the decompressed files is known here (torchvision only
        # publishes the md5 of the .gz), so structure checks are all that can be done.
        logger.info("%s: official-size raw %s file; no checksum known for raw files, not verified", path, name)
        return
    actual_sha = hashlib.sha256(raw).hexdigest()
    if actual_sha != raw_sha:
        raise DataError(
            f"{path}: claims the official {count} {name} records but is not the official file: "
            f"expected SHA-256 {raw_sha}, found {actual_sha}.",
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
        if labels.numel() and int(labels.max()) >= NUM_CLASSES:
            bad = int(labels.max())
            where = int(torch.nonzero(labels >= NUM_CLASSES)[0])
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
    files = _find_dir_files(folder)
    arrays: dict[str, torch.Tensor] = {}
    for field, path in files.items():
        stored, raw = read_idx_bytes(path)
        arrays[field] = _decode(field, raw, str(path))
        _check_official(name, field, path, stored, raw)
    return _bundle(name, "dir", str(folder), arrays, {f: str(p) for f, p in files.items()})


def sample_dir() -> Path:
    """The folder of the bundled MNIST sample (inside the installed package)."""
    return Path(str(resources.files("mnist_flow") / "sample"))


def _load_sample() -> DataBundle:
    folder = sample_dir()
    arrays: dict[str, torch.Tensor] = {}
    paths: dict[str, str] = {}
    for field, base in FILES.items():
        path = folder / f"{base}.gz"
        stored, raw = read_idx_bytes(path)
        expected = SAMPLE_SHA256.get(path.name)
        actual = hashlib.sha256(stored).hexdigest()
        if actual != expected:
            raise DataError(
                f"{path}: the bundled sample file does not match its recorded checksum: expected SHA-256 "
                f"{expected}, found {actual}.",
                fix="Reinstall mnist-flow (the package data is damaged).",
            )
        arrays[field] = _decode(field, raw, str(path))
        paths[field] = str(path)
    return _bundle("mnist", "sample", str(folder), arrays, paths)


def _move_aside(path: Path, reason: str) -> None:
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    logger.warning("%s is corrupt (%s); moved it to %s and fetching it again", path, reason, target.name)


def _download_file(filename: str, md5: str, target: Path, mirrors: Sequence[str], dead: set[str],
                   timeout: float, tried: list[str]) -> str:
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


def _fetch(url: str, md5: str, target: Path, timeout: float) -> None:
    """Stream ``url`` into a temp file next to ``target``, check its md5, then rename it into place."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digest = hashlib.md5(usedforsecurity=False)
    # raising inside the block (a bad md5 included) leaves ``target`` untouched and removes the temp file
    with atomic_file(target) as out, urllib.request.urlopen(request, timeout=timeout) as response:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
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
                stored, raw = read_idx_bytes(path)
                actual = _md5(stored)
                if actual != expected_md5:
                    raise DataError(f"{path}: md5 mismatch: expected {expected_md5}, found {actual}.")
                arrays[field] = _decode(field, raw, str(path))
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


def load_dataset(name: str, source: str = "auto", *, data_dir: Path | None = None, cache_dir: Path,
                 mirrors: Sequence[str] = (), timeout: float = 30.0) -> DataBundle:
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

