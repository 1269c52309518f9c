"""Classify images with a registered model, preparing them exactly the way its training data were made.

The model's sidecar records how its inputs were made (:class:`Preprocessing`): the *preparation*
(``mnist-digit``: MNIST's centring; ``fashion-item``: Fashion-MNIST's item scaled to fill the frame),
the polarity (``background``) and the normalisation. A sidecar without a preparation gets the digit
preparation here; the registry fills in the one of the dataset its row names (an old Fashion-MNIST
model gets the item preparation).

For each PNG or JPEG: the file must be a regular file within a byte limit (a FIFO, a device or a huge
file is refused before anything is read); Pillow opens it, refusing other formats, unsupported modes
and images above a pixel limit (decompression bombs). Transparency is flattened onto white, colours
become grey levels, and a light background is inverted. An image that already is 28x28 is in the
dataset's format: it passes unchanged (after that polarity check). Any other image is framed like the
dataset: for digits, the MNIST authors' recipe (stretch to full contrast, crop to the ink, fit in 20x20
keeping the aspect ratio, paste in 28x28 with the centre of mass at the centre); for Fashion-MNIST
items, Zalando's (trim the background, scale the longest edge to 28, centre the box).
All images go through the model in one forward pass.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mnist_flow.errors import ImageError

if TYPE_CHECKING:
    from mnist_flow.registry.store import ModelVersion

FORMATS = ("PNG", "JPEG")
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")
DEFAULT_MAX_PIXELS = 20_000_000
#: Largest image file read at all (a 20-megapixel JPEG is well under it).
DEFAULT_MAX_FILE_BYTES = 64 * 2**20
FRAME, BOX = 28, 20
# After inversion and background removal, pixels above this share of the brightest one belong to the digit.
INK_THRESHOLD = 0.2
# Fashion-MNIST trimmed "edges close to the colour of the corner pixels (distance threshold 5%)".
ITEM_THRESHOLD = 0.05 * 255
BORDER = 2

DIGIT, ITEM = "mnist-digit", "fashion-item"
PREPARATIONS = (DIGIT, ITEM)
_DATASET_PREPARATION = {"mnist": DIGIT, "fashion-mnist": ITEM}
BACKGROUNDS = ("dark", "light")

_PIL_LIMIT_LOCK = threading.Lock()


class ImageTooLargeError(ImageError):
    """An image (its file or its pixels) is above the limit."""


class NotAnImageError(ImageError):
    """A file is not a PNG or JPEG image Pillow can decode."""


class SidecarError(ValueError):
    """A sidecar's input description cannot be used (the registry reports it as an integrity error)."""


def preparation_for(dataset: str) -> str:
    """How the inputs of ``dataset`` were made: ``mnist-digit`` or ``fashion-item`` (unknown: digits)."""
    return _DATASET_PREPARATION.get(dataset, DIGIT)


def _finite(value: Any, what: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SidecarError(f"{what} must be a finite number, got {value!r}")
    if not low < value <= high:
        raise SidecarError(f"{what} must be in ({low:g}, {high:g}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Preprocessing:
    """How to turn an image into the model's input: preparation, polarity, normalisation, class names."""

    preparation: str = DIGIT
    background: str = "dark"
    mean: float = 0.5
    std: float = 0.5
    scale: float = 255.0
    classes: tuple[str, ...] = field(default_factory=lambda: tuple(str(d) for d in range(10)))

    @classmethod
    def from_sidecar(cls, sidecar: Mapping[str, Any]) -> Preprocessing:
        """Read and check the sidecar's ``input``, ``normalization`` and ``classes`` (SidecarError if unusable).

        Missing entries take the values every sidecar had before they were recorded (MNIST digits,
        dark background, mean 0.5, std 0.5, scale 255, classes '0'..'9').
        """
        if not isinstance(sidecar, Mapping):
            raise SidecarError("the sidecar is not a JSON object")
        spec = sidecar.get("input", {})
        norm = sidecar.get("normalization", {})
        if not isinstance(spec, Mapping) or not isinstance(norm, Mapping):
            raise SidecarError("'input' and 'normalization' must be JSON objects")
        preparation = spec.get("preparation", DIGIT)
        if preparation not in PREPARATIONS:
            raise SidecarError(
                f"unknown input preparation {preparation!r} (this version knows {', '.join(PREPARATIONS)})"
            )
        background = spec.get("background", "dark")
        if background not in BACKGROUNDS:
            raise SidecarError(f"unknown input background {background!r} (expected dark or light)")
        for key in ("height", "width"):
            if spec.get(key, FRAME) != FRAME:
                raise SidecarError(f"input {key} {spec.get(key)!r} is not supported (only {FRAME})")
        if spec.get("channels", 1) != 1:
            raise SidecarError(f"input channels {spec.get('channels')!r} is not supported (only 1)")
        mean = _finite(norm.get("mean", 0.5), "normalization mean", low=-1e3, high=1e3)
        std = _finite(norm.get("std", 0.5), "normalization std", low=1e-6, high=1e6)
        scale = _finite(norm.get("scale", 255.0), "normalization scale", low=1e-6, high=1e6)
        classes = sidecar.get("classes", [str(d) for d in range(10)])
        if (
            not isinstance(classes, list)
            or not classes
            or len(classes) > 1000
            or not all(
                (isinstance(c, str) and 0 < len(c) <= 200) or (isinstance(c, int) and not isinstance(c, bool))
                for c in classes
            )
        ):
            raise SidecarError("'classes' must be a list of class names (non-empty strings)")
        return cls(preparation, background, mean, std, scale, tuple(str(c) for c in classes))

    def to_sidecar(self) -> dict[str, Any]:
        """The sidecar entries this preprocessing is read from."""
        return {
            "normalization": {"mean": self.mean, "std": self.std, "scale": self.scale},
            "classes": list(self.classes),
            "input": {
                "height": FRAME,
                "width": FRAME,
                "channels": 1,
                "background": self.background,
                "preparation": self.preparation,
            },
        }

    def image(self, image: Image.Image, name: str = "image") -> np.ndarray:
        """A decoded image -> uint8 [28, 28] in the training data's format."""
        pixels = _grey(image)
        if self.preparation == ITEM:
            framed = _prepare_item(pixels, name)
        else:
            framed = _prepare_digit(pixels, name)
        return 255 - framed if self.background == "light" else framed

    def features(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, 28, 28] -> float32 [N, 784]: ``(x / scale - mean) / std``, as the training data."""
        features = torch.from_numpy(np.ascontiguousarray(images).reshape(images.shape[0], -1).astype(np.float32))
        return features.div_(self.scale).sub_(self.mean).div_(self.std)

    def __call__(
        self, source: str | Path | bytes | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> torch.Tensor:
        """One image (a path, encoded bytes or a Pillow image) -> float32 [1, 784], ready for the model."""
        if isinstance(source, Image.Image):
            return self.features(self.image(source)[None])
        return self.features(self.image(load_image(source, max_pixels=max_pixels), _shown(source))[None])


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    # Pillow's decompression-bomb guard is a module global: set it to our limit only while opening.
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _too_big(path: str, size: str, max_pixels: int) -> ImageError:
    return ImageTooLargeError(
        f"{path}: the image is too large ({size}; the limit is {max_pixels:,} pixels).",
        fix="Shrink the image, or raise MNIST_FLOW_MAX_IMAGE_PIXELS if the file is trusted.",
    )


def _shown(source: object) -> str:
    return "image" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def read_image_file(path: str | Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``; else ImageError naming it.

    Opened without blocking and checked on the open descriptor, so a FIFO, a device or a socket (even
    one swapped in after a check) is refused instead of hanging or reading forever.
    """
    shown = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError(f"{shown}: no such file.", fix="Check the path.") from None
    except IsADirectoryError:
        raise ImageError(f"{shown}: is a folder, not an image file.", fix="Pass image files.") from None
    except PermissionError:
        raise ImageError(f"{shown}: cannot be read (permission denied).", fix="Check the file's permissions.") from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket, or a FIFO opened for writing only
            raise _not_regular(shown, "a socket") from None
        raise ImageError(f"{shown}: cannot be opened ({exc.strerror}).", fix="Check the path.") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(f"{shown}: is a folder, not an image file.", fix="Pass image files.")
        if not stat.S_ISREG(info.st_mode):
            kind = (
                "a FIFO (named pipe)"
                if stat.S_ISFIFO(info.st_mode)
                else "a device"
                if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
                else "a socket"
                if stat.S_ISSOCK(info.st_mode)
                else "not a regular file"
            )
            raise _not_regular(shown, kind)
        if info.st_size > max_bytes:
            raise ImageTooLargeError(
                f"{shown}: the file is too large ({info.st_size:,} bytes; the limit is {max_bytes:,} bytes).",
                fix="Shrink or recompress the image.",
            )
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:  # it grew while being read
            raise ImageTooLargeError(
                f"{shown}: the file is too large (over {max_bytes:,} bytes).", fix="Shrink or recompress the image."
            )
        return data
    except OSError as exc:
        raise ImageError(
            f"{shown}: cannot be read ({exc.strerror or exc}).", fix="Check that the file is complete and readable."
        ) from None
    finally:
        os.close(fd)


def _not_regular(shown: str, kind: str) -> ImageError:
    return ImageError(f"{shown}: is {kind}, not a regular file.", fix="Pass PNG or JPEG files saved on disk.")


def load_image(
    source: str | Path | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    name: str | None = None,
) -> Image.Image:
    """Open ``source`` (a path, or the encoded bytes) as a PNG or JPEG of a supported mode within the limits.

    Returns its first frame, decoded. ``name`` names the image in errors (default: the path).
    """
    shown = name or _shown(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > max_bytes:
            raise ImageTooLargeError(
                f"{shown}: the file is too large ({len(source):,} bytes; the limit is {max_bytes:,} bytes).",
                fix="Shrink or recompress the image.",
            )
        data = bytes(source)
    else:
        data = read_image_file(source, max_bytes=max_bytes)
    try:
        with _pixel_limit(max_pixels), Image.open(io.BytesIO(data), formats=FORMATS) as image:
            if image.width * image.height > max_pixels:
                raise _too_big(
                    shown, f"{image.width}x{image.height} = {image.width * image.height:,} pixels", max_pixels
                )
            if image.mode not in MODES:
                raise ImageError(
                    f"{shown}: unsupported image mode {image.mode!r} ({image.format}); supported: {', '.join(MODES)}.",
                    fix="Save the image as 8-bit greyscale or RGB(A) PNG or JPEG.",
                )
            image.load()
            return image.copy()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own check, made with our limit; its message gives the size
        raise _too_big(shown, str(exc).split(" exceeds")[0].strip(), max_pixels) from None
    except UnidentifiedImageError:
        raise NotAnImageError(
            f"{shown}: not a PNG or JPEG image.", fix="Pass PNG or JPEG files (convert other formats first)."
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise NotAnImageError(
            f"{shown}: the image cannot be decoded ({exc}).", fix="Check that the file is complete and not damaged."
        ) from None


def _grey(image: Image.Image) -> np.ndarray:
    """Grey levels 0..255 as float32; transparent pixels count as white paper."""
    if image.mode in ("LA", "PA", "RGBA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32)


def _border(pixels: np.ndarray) -> np.ndarray:
    k = max(1, min(BORDER, min(pixels.shape) // 4))
    return np.concatenate([pixels[:k].ravel(), pixels[-k:].ravel(), pixels[:, :k].ravel(), pixels[:, -k:].ravel()])


def _corners(pixels: np.ndarray) -> np.ndarray:
    # Fashion-MNIST items fill the frame, so only the corners are reliably background.
    k = max(1, min(BORDER, min(pixels.shape) // 4))
    return np.concatenate(
        [pixels[:k, :k].ravel(), pixels[:k, -k:].ravel(), pixels[-k:, :k].ravel(), pixels[-k:, -k:].ravel()]
    )


def _as_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _prepare_digit(pixels: np.ndarray, name: str) -> np.ndarray:
    """Grey levels -> a light digit on black: as is if already 28x28, else fitted in 20x20, centred by mass."""
    if np.median(_border(pixels)) > 127:  # light paper, dark ink: MNIST is the other way round
        pixels = 255.0 - pixels
    if pixels.shape == (FRAME, FRAME):  # already in MNIST's format: do not re-crop and resample it
        return _as_uint8(pixels)
    pixels = np.clip(pixels - np.median(_border(pixels)), 0, None)
    peak = float(pixels.max())
    if peak < 8:  # nothing stands out from the background
        raise ImageError(
            f"{name}: no digit found (the image is blank or has no contrast).",
            fix="Pass an image of one handwritten digit.",
        )
    pixels = pixels * (255.0 / peak)
    rows, cols = np.nonzero(pixels > INK_THRESHOLD * 255)
    crop = pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = crop.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    digit = Image.fromarray(crop.astype(np.uint8), mode="L").resize(size, Image.Resampling.LANCZOS)
    box = np.asarray(digit, dtype=np.float32)
    mass = box.sum()
    ys, xs = np.indices(box.shape)
    com_y, com_x = (ys * box).sum() / mass, (xs * box).sum() / mass
    top = int(np.clip(round(FRAME / 2 - com_y), 0, FRAME - box.shape[0]))
    left = int(np.clip(round(FRAME / 2 - com_x), 0, FRAME - box.shape[1]))
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    frame[top : top + box.shape[0], left : left + box.shape[1]] = box
    return _as_uint8(frame)


def _prepare_item(pixels: np.ndarray, name: str) -> np.ndarray:
    """Grey levels -> a light item on black: as is if already 28x28, else trimmed, scaled to fill 28, centred."""
    if np.median(_corners(pixels)) > 127:  # a product photo on white: Fashion-MNIST negated those
        pixels = 255.0 - pixels
    if pixels.shape == (FRAME, FRAME):  # already in Fashion-MNIST's format
        return _as_uint8(pixels)
    background = float(np.median(_corners(pixels)))
    rows, cols = np.nonzero(np.abs(pixels - background) > ITEM_THRESHOLD)
    if rows.size == 0:
        raise ImageError(
            f"{name}: no item found (the image is blank or has no contrast).", fix="Pass an image of one clothing item."
        )
    # the paper's level becomes black, black stays full intensity (no stretch: item brightness is a feature)
    item = np.clip((pixels - background) * (255.0 / max(1.0, 255.0 - background)), 0, 255)
    crop = item[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = crop.shape
    scale = FRAME / max(height, width)
    size = (min(FRAME, max(1, round(width * scale))), min(FRAME, max(1, round(height * scale))))
    resized = Image.fromarray(_as_uint8(crop), mode="L").resize(size, Image.Resampling.LANCZOS)
    box = np.asarray(resized, dtype=np.float32)
    top, left = (FRAME - box.shape[0]) // 2, (FRAME - box.shape[1]) // 2
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    frame[top : top + box.shape[0], left : left + box.shape[1]] = box
    return _as_uint8(frame)


def preprocess(image: Image.Image, name: str = "image", preprocessing: Preprocessing | None = None) -> np.ndarray:
    """A decoded image -> uint8 [28, 28] in the format of the training data (default: MNIST digits)."""
    return (preprocessing or Preprocessing()).image(image, name)


def _preprocessing(spec: Preprocessing | Mapping[str, Any]) -> Preprocessing:
    if isinstance(spec, Preprocessing):
        return spec
    try:
        return Preprocessing.from_sidecar(spec)
    except SidecarError as exc:
        from mnist_flow.errors import ConfigError

        raise ConfigError(
            f"The model's sidecar cannot be used: {exc}.",
            fix="Load the model through the registry (`mnist-flow predict`), which verifies it.",
        ) from None


def to_features(images: np.ndarray, sidecar: Preprocessing | Mapping[str, Any]) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 784], normalised with the sidecar's mean, std and scale."""
    return _preprocessing(sidecar).features(images)


def preprocess_files(
    paths: Sequence[str | Path], *, max_pixels: int = DEFAULT_MAX_PIXELS, preprocessing: Preprocessing | None = None
) -> np.ndarray:
    """Open and preprocess every file (the first unusable one raises ImageError naming it)."""
    spec = preprocessing or Preprocessing()
    return np.stack([spec.image(load_image(p, max_pixels=max_pixels), str(p)) for p in paths])


def classify(images: np.ndarray, model: torch.nn.Module, spec: Preprocessing) -> list[dict[str, Any]]:
    """uint8 [N, 28, 28] in the dataset's format -> ``[{"class": int, "name": str, "probability": float}]``.

    One forward pass, without autograd, on the model's device.
    """
    features = spec.features(images)
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        probabilities = torch.softmax(model(features.to(device)).float(), dim=1).cpu()
    best, labels = probabilities.max(dim=1)
    return [
        {
            "class": int(label),
            "name": spec.classes[label] if label < len(spec.classes) else str(label),
            "probability": round(float(p), 6),
        }
        for label, p in zip(labels.tolist(), best.tolist())
    ]


def predict_images(
    paths: Sequence[str | Path],
    model: torch.nn.Module,
    sidecar: Preprocessing | Mapping[str, Any],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[dict[str, Any]]:
    """Classify image files: ``[{"path": <as given>, "digit": int, "name": str, "probability": float}, ...]``.

    ``digit`` is the class index (kept under that name for scripts written for digits); ``name`` is
    the class name from the sidecar ('7', or 'Sneaker'). All images are preprocessed first, then
    classified in one forward pass.
    """
    if not paths:
        return []
    spec = _preprocessing(sidecar)
    rows = classify(preprocess_files(paths, max_pixels=max_pixels, preprocessing=spec), model, spec)
    return [
        {"path": str(path), "digit": row["class"], "name": row["name"], "probability": row["probability"]}
        for path, row in zip(paths, rows)
    ]


@dataclass(frozen=True)
class LoadedModel:
    """A registered model ready for use: the network, its preprocessing and its registry version."""

    model: torch.nn.Module
    preprocessing: Preprocessing
    version: ModelVersion

    def predict(self, images: Sequence[str | Path], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
        """Classify image files (see :func:`predict_images`)."""
        return predict_images(images, self.model, self.preprocessing, max_pixels=max_pixels)
