"""Decoding one image file into an RGB uint8 array whose size matches its COCO entry.

Handled modes: RGB, grayscale ("L", "LA", "1"), palette ("P", "PA"), RGBA (alpha dropped), CMYK,
YCbCr, and high bit depth ("I;16*", "I": 16-bit range scaled to 8 bits; "F": clipped to 0..255).

EXIF orientation: COCO boxes are relative to the width/height stored in the JSON, so the
orientation tag is applied only when that keeps the image consistent with the JSON:
- `exif_transpose="auto"` (default): transpose when the transposed size matches the JSON size
  (for orientations that do not swap the sides both sizes match, and the displayed orientation,
  which is what annotation tools show, is used); keep the stored pixels when only the raw size
  matches (e.g. COCO itself, annotated on the stored pixels).
- "always" / "never": force the choice.
An image whose final size differs from the JSON size is rejected ("size mismatch").

Decompression bombs: an image with more than `max_image_pixels` pixels (read from the header,
before decoding) is rejected; PIL's own `DecompressionBombError` (above twice
`PIL.Image.MAX_IMAGE_PIXELS`) is rejected the same way. Set `PIL.Image.MAX_IMAGE_PIXELS` too if
you need images beyond PIL's limit.

Only regular files are opened (`files.open_regular_file`): a FIFO or device named by an
annotation file fails at once ("not a regular file") instead of blocking a worker forever.

Every failure raises `ImageLoadError(reason)`; the dataset decides whether to skip or stop.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from .files import NotRegularFileError, open_regular_file

ExifMode = Literal["auto", "always", "never"]


class ImageLoadError(OSError):
    """One image file cannot be decoded into a usable RGB array; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # PIL's default limit (a 0.5 GB 24-bit image)
IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})  # of a dataset's images
_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def load_rgb_image(
    path: str | os.PathLike,
    expected_size: tuple[int, int] | None = None,
    exif_transpose: ExifMode = "auto",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Load `path` as an RGB uint8 array (height, width, 3).

    Args:
        path: image file.
        expected_size: (width, height) from the annotation file; None skips the size check.
        exif_transpose: "auto", "always" or "never" (see the module docstring).
        max_image_pixels: reject images with more pixels than this (None: no own limit).

    Raises:
        ImageLoadError: missing/unreadable/corrupt/truncated file, too many pixels, size mismatch.
    """
    if exif_transpose not in ("auto", "always", "never"):
        raise ValueError(f"exif_transpose must be 'auto', 'always' or 'never', got {exif_transpose!r}")
    with _opened_image(path, max_image_pixels, "cannot decode image") as image:
        image.load()  # decode now: truncated/corrupt data fails here
        image = _orient(image, expected_size, exif_transpose)
        pixels = _to_rgb_array(image)

    if expected_size is not None:
        height, width = pixels.shape[:2]
        if (width, height) != tuple(expected_size):
            raise ImageLoadError(
                f"size mismatch: file is {width}x{height}, annotations say {expected_size[0]}x{expected_size[1]}"
            )
    return pixels


def read_image_size(
    path: str | os.PathLike, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels (EXIF not applied).

    Raises:
        ImageLoadError: missing, not a regular file, not an image, too many pixels.
    """
    with _opened_image(path, max_image_pixels, "cannot read image header") as image:
        return image.size


@contextlib.contextmanager
def _opened_image(path: str | os.PathLike, max_image_pixels: int | None, failure: str) -> Iterator[Image.Image]:
    """The PIL image of a regular file whose header passed the pixel limit; every failure of opening it, or of
    what the caller does with it, raised as ``ImageLoadError`` (``failure`` starts the message of a decoding one)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_regular_file(path) as file, Image.open(file) as image:
                _check_pixels(image.size, max_image_pixels)
                yield image
    except ImageLoadError:
        raise
    except FileNotFoundError as exc:
        raise ImageLoadError("file not found") from exc
    except NotRegularFileError as exc:
        raise ImageLoadError(str(exc)) from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"too many pixels (decompression bomb guard): {exc}") from exc
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise ImageLoadError(f"{failure}: {type(exc).__name__}: {exc}") from exc


def _check_pixels(size: tuple[int, int], limit: int | None) -> None:
    if limit is not None and size[0] * size[1] > limit:
        raise ImageLoadError(f"too many pixels: {size[0]}x{size[1]} exceeds max_image_pixels={limit}")


def _orient(image: Image.Image, expected_size: tuple[int, int] | None, mode: ExifMode) -> Image.Image:
    orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    if mode == "never" or orientation in (None, 1):
        return image
    if mode == "auto" and expected_size is not None and orientation in _SWAPPING_ORIENTATIONS:
        transposed_size = image.size[::-1]
        if tuple(expected_size) != tuple(transposed_size):
            return image  # only the stored size can match the annotations
    return ImageOps.exif_transpose(image)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)  # (height, width), 16-bit range
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
