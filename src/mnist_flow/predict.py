"""Classify image files with a registered model, preprocessing them the way MNIST was made.

For each PNG or JPEG file: open it with Pillow (refusing other formats, unsupported modes and images
above a pixel limit, which guards against decompression bombs), flatten transparency onto white,
convert to grey levels, invert when the background is light (judged by the border pixels), stretch
the digit to full contrast, crop to its bounding box, resize it to fit 20x20 keeping its aspect ratio,
and paste it into a 28x28 frame so that its centre of mass is at the centre, as the MNIST authors did.
The model's sidecar gives the normalisation. All images go through the model in one forward pass.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mnist_flow.errors import ImageError

FORMATS = ("PNG", "JPEG")
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")
DEFAULT_MAX_PIXELS = 20_000_000
FRAME, BOX = 28, 20
# After inversion and background removal, pixels above this share of the brightest one belong to the digit.
INK_THRESHOLD = 0.2
BORDER = 2

_PIL_LIMIT_LOCK = threading.Lock()


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
    return ImageError(f"{path}: the image is too large ({size}; the limit is {max_pixels:,} pixels).",
                      fix="Shrink the image, or raise MNIST_FLOW_MAX_IMAGE_PIXELS if the file is trusted.")


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` as a PNG or JPEG of a supported mode within ``max_pixels``; its first frame, decoded."""
    shown = str(path)
    try:
        with _pixel_limit(max_pixels):
            with Image.open(path, formats=FORMATS) as image:
                if image.width * image.height > max_pixels:
                    raise _too_big(shown, f"{image.width}x{image.height} = {image.width * image.height:,} pixels",
                                   max_pixels)
                if image.mode not in MODES:
                    raise ImageError(
                        f"{shown}: unsupported image mode {image.mode!r} ({image.format}); supported: "
                        f"{', '.join(MODES)}.",
                        fix="Save the image as 8-bit greyscale or RGB(A) PNG or JPEG.")
                image.load()
                return image.copy()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own check, made with our limit; its message gives the size
        raise _too_big(shown, str(exc).split(" exceeds")[0].strip(), max_pixels) from None
    except FileNotFoundError:
        raise ImageError(f"{shown}: no such file.", fix="Check the path.") from None
    except IsADirectoryError:
        raise ImageError(f"{shown}: is a folder, not an image file.", fix="Pass image files.") from None
    except UnidentifiedImageError:
        raise ImageError(f"{shown}: not a PNG or JPEG image.",
                         fix="Pass PNG or JPEG files (convert other formats first).") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{shown}: the image cannot be decoded ({exc}).",
                         fix="Check that the file is complete and not damaged.") from None


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


def preprocess(image: Image.Image, name: str = "image") -> np.ndarray:
    """A decoded image -> uint8 [28, 28]: a light digit on black, fitted in 20x20, centred by mass."""
    pixels = _grey(image)
    if np.median(_border(pixels)) > 127:  # light paper, dark ink: MNIST is the other way round
        pixels = 255.0 - pixels
    pixels = np.clip(pixels - np.median(_border(pixels)), 0, None)
    peak = float(pixels.max())
    if peak < 8:  # nothing stands out from the background
        raise ImageError(f"{name}: no digit found (the image is blank or has no contrast).",
                         fix="Pass an image of one handwritten digit.")
    pixels = pixels * (255.0 / peak)
    rows, cols = np.nonzero(pixels > INK_THRESHOLD * 255)
    crop = pixels[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
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
    frame[top:top + box.shape[0], left:left + box.shape[1]] = box
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def to_features(images: np.ndarray, sidecar: dict[str, Any]) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 784], normalised with the sidecar's mean, std and scale."""
    norm = sidecar.get("normalization") or {}
    mean, std, scale = float(norm.get("mean", 0.5)), float(norm.get("std", 0.5)), float(norm.get("scale", 255.0))
    features = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32))
    return (features / scale - mean) / std


def preprocess_files(paths: Sequence[str | Path], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Open and preprocess every file (the first unusable one raises ImageError naming it)."""
    return np.stack([preprocess(load_image(p, max_pixels=max_pixels), str(p)) for p in paths])


def predict_images(paths: Sequence[str | Path], model: torch.nn.Module, sidecar: dict[str, Any], *,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
    """Classify image files: ``[{"path": <as given>, "digit": int, "probability": float}, ...]``.

    All images are preprocessed first, then classified in one forward pass.
    """
    if not paths:
        return []
    features = to_features(preprocess_files(paths, max_pixels=max_pixels), sidecar)
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        probabilities = torch.softmax(model(features.to(device)), dim=1).cpu()
    best, digits = probabilities.max(dim=1)
    return [{"path": str(path), "digit": int(digit), "probability": round(float(p), 6)}
            for path, digit, p in zip(paths, digits.tolist(), best.tolist())]
