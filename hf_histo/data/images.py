"""The one decode: any image file, PIL image or array -> 8-bit RGB, shared by the builder and inference."""

# Ships with checkpoints (the inference engine uses it): stdlib, numpy and PIL only.

from __future__ import annotations

import contextlib
import io
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# Float images whose largest value is at most this are read as [0, 1] (values a little above 1.0 are rounding
# noise, clipped); larger ones as 0-255. No tissue image in 0-255 has all its values below 2.
FLOAT_UNIT_MAX = 2.0
# Modes PIL decodes 16/32-bit integer or float single-channel data into.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class DataError(ValueError):
    """A problem with the user's data: the message names the file and says how to fix it."""


@contextlib.contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[int]:
    """Temporarily set PIL's decompression-bomb limit (None keeps it); bomb warnings become errors inside."""
    old = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield Image.MAX_IMAGE_PIXELS
    finally:
        Image.MAX_IMAGE_PIXELS = old


def to_uint8(array: np.ndarray, name: str = "image") -> np.ndarray:
    """Scale the values of an integer or float image array to uint8, the same way for every input.

    - uint8 / bool: unchanged (bool becomes 0/255).
    - Integers wider than 8 bits: values up to 255 are taken as 8-bit values (a 16-bit file holding 8-bit data);
      otherwise the 16-bit range is mapped to 0-255 (``round(v / 257)``), larger values are clipped.
    - Floats: ``[0, 1]`` when the largest value is at most ``FLOAT_UNIT_MAX`` (values past 1 are clipped), else
      0-255; NaN or infinite values are an error.

    Raises:
        DataError: The array holds NaN/infinite values or has a dtype that is not a number.
    """
    arr = np.asarray(array)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind in "ui":
        top = int(arr.max()) if arr.size else 0
        if top <= 255:
            return np.clip(arr, 0, 255).astype(np.uint8)
        return np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    if arr.dtype.kind == "f":
        values = arr.astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise DataError(f"{name}: the image holds NaN or infinite values; fix or remove it.")
        scale = 255.0 if (values.max() if values.size else 0.0) <= FLOAT_UNIT_MAX else 1.0
        return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    raise DataError(f"{name}: image values of type {arr.dtype} are not numbers; pass an integer or float image.")


def array_to_rgb(array: Any, name: str = "image") -> Image.Image:
    """8-bit RGB of an array: (H, W), (H, W, 1|3|4) or channels-first (1|3|4, H, W); a torch tensor works too.

    Raises:
        DataError: Odd shape or values (see ``to_uint8``).
    """
    if hasattr(array, "detach"):  # a torch tensor, without importing torch here
        array = array.detach().cpu().numpy()
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise DataError(f"{name}: an image array must be (H, W), (H, W, 3|4) or (3|4, H, W); got shape {arr.shape}.")
    arr = to_uint8(arr, name)
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L").convert("RGB")
    if arr.shape[-1] == 4:
        return to_rgb(Image.fromarray(arr, mode="RGBA"))
    return Image.fromarray(arr, mode="RGB")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """8-bit RGB of any PIL image (16-bit, float, grayscale, palette, RGBA, CMYK, ...).

    Wide single-channel modes are scaled by ``to_uint8``; transparency is composited over white, the background
    colour of a glass slide.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        return array_to_rgb(np.asarray(image), name)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image file as PIL gives it, with clear errors.

    PIL's decompression-bomb guard stays on; ``max_pixels`` (CLI: ``--max_image_pixels``) raises it for files you
    trust.

    Raises:
        DataError: The file is missing, not an image, truncated, or over the pixel limit.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    return _decode(path, str(path), max_pixels)


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int | None) -> Image.Image:
    """Fully decode an image file (or downloaded bytes) under the pixel limit; errors name ``name``."""
    with pixel_limit(max_pixels) as limit:
        try:
            with Image.open(source) as im:
                im.load()
                return im.copy()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(
                f"{name}: the image is larger than the decompression-bomb limit of {limit} pixels; "
                "if you trust it, raise the limit with --max_image_pixels N (or max_pixels=N)."
            ) from e
        except UnidentifiedImageError as e:
            raise DataError(f"{name}: not an image file PIL can read; replace or remove it.") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{name}: truncated or corrupt image ({e}); re-export or remove it.") from e


def download_image(url: str, max_pixels: int | None = None, timeout: float | None = None) -> Image.Image:
    """Download and decode an ``http(s)://`` image (the same decode as a file).

    Raises:
        DataError: The download failed (the message names the URL and the reason) or the bytes are not an image
            PIL can read under the pixel limit.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # http(s) only: load_rgb checks the scheme
            data = response.read()
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts and malformed addresses
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise DataError(
            f"{url}: the image could not be downloaded ({reason}); check the address and the network, or download "
            "it and pass the file."
        ) from e
    return _decode(io.BytesIO(data), url, max_pixels)


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Load an image file as 8-bit RGB (see ``open_image`` for the errors and ``to_rgb`` for conversions)."""
    return to_rgb(open_image(path, max_pixels), str(path))


def load_rgb(
    source: Any, max_pixels: int | None = None, timeout: float | None = None, name: str | None = None
) -> Image.Image:
    """8-bit RGB of an image given as a path, URL, PIL image, numpy array or tensor: the one entry point.

    ``name`` names an in-memory image (array, PIL image without a file name) in errors; paths and URLs name
    themselves.

    Raises:
        DataError: Missing, unreadable or empty image (no pixels), failed download, odd array shape or values; the
            message names the input.
        TypeError: An input of another type.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", None) or name or "image"
        try:
            image = to_rgb(source, name)
        except OSError as e:  # a lazily opened image that fails to decode
            raise DataError(f"{name}: truncated or corrupt image ({e}); re-export or remove it.") from e
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        name = source
        image = to_rgb(download_image(source, max_pixels, timeout), source)
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        image = load_image(source, max_pixels)
    elif isinstance(source, np.ndarray) or hasattr(source, "detach"):
        name = name or "image"
        image = array_to_rgb(source, name)
    else:
        raise TypeError(f"unsupported image input of type {type(source).__name__}; pass a path, PIL image or array")
    if 0 in image.size:
        raise DataError(
            f"{name}: the image is empty ({image.width}x{image.height} pixels); pass an image with pixels."
        )
    return image
