"""Load and normalise region-of-interest masks; detect tissue when an image has no mask.

This module ships with model checkpoints (the pipeline uses it): it imports only numpy and PIL,
and scipy inside the functions that need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from .images import DataError, pixel_limit

EmptyFallback = Literal["tissue", "whole"]

# Documented defaults of the tissue detector (Otsu on saturation + small-object removal).
TISSUE_MIN_SATURATION = 0.07  # threshold floor (0-1): keeps a near-white image from becoming all "tissue"
TISSUE_MAX_VALUE = 0.94  # brightness above which low-saturation pixels are glass background
TISSUE_MIN_OBJECT_SIZE = 500  # connected components smaller than this (pixels) are dropped
TISSUE_DETECTION_WIDTH = 1024  # the detector runs on a copy at most this wide, then scales back


JPEG_NOISE_FLOOR = 32  # of 255: JPEG ringing around a sharp 0/255 edge stays below this


def is_lossy(image: Image.Image) -> bool:
    """Whether a PIL image was decoded from a lossy file (JPEG, JPEG-compressed TIFF, lossy WebP)."""
    if image.format in ("JPEG", "MPO"):
        return True
    if image.format == "TIFF":
        return str(image.info.get("compression", "")).lower() in ("jpeg", "tiff_jpeg")
    if image.format == "WEBP":  # lossless WebP stores a VP8L chunk; PIL does not say which it read
        try:
            with open(image.filename, "rb") as f:  # type: ignore[attr-defined]
                return b"VP8L" not in f.read(4096)
        except (AttributeError, OSError, TypeError):
            return True
    return False


def normalize_mask(mask: np.ndarray | Image.Image, lossy: bool | None = None) -> np.ndarray:
    """Turn a mask of any common encoding into a boolean array of shape (height, width).

    Any non-zero value is region of interest: 0/1, 0/255, bool, instance ids (each object numbered
    1..N, 8- or 16-bit), palette indices, RGB (any channel on) and LA/RGBA (the alpha channel is
    ignored). A lossy (JPEG) mask is noisy around 0, so there a value must exceed a noise floor of
    ``JPEG_NOISE_FLOOR`` (of 255), or half the maximum when that is lower (a 0/1 JPEG); keep
    instance ids and palettes in a lossless format (PNG, BMP, TIFF).

    Args:
        mask: A PIL image or an array.
        lossy: Apply the JPEG noise floor; None decides from the PIL image's file format (an
            array is exact).
    """
    if isinstance(mask, Image.Image):
        lossy = is_lossy(mask) if lossy is None else lossy
        if mask.mode == "P":
            return np.asarray(mask) > 0
        if mask.mode in ("LA", "La"):
            mask = mask.getchannel("L")
        elif mask.mode in ("RGBA", "RGBa", "CMYK", "YCbCr", "HSV", "LAB"):
            mask = mask.convert("RGB")
        mask = np.asarray(mask)
    arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"a mask must be 2-D (height, width) or an image, got shape {arr.shape}.")
    if arr.dtype == bool:
        return arr.copy()
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr, nan=0.0)
    if not lossy:
        return arr != 0
    top = float(arr.max()) if arr.size else 0.0
    return arr > min(JPEG_NOISE_FLOOR, top / 2)


def load_mask(
    path: str | Path,
    image_size: tuple[int, int] | None = None,
    resize: bool = False,
    image_path: str | Path | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Load a mask file as a boolean array.

    Args:
        path: The mask file.
        image_size: ``(width, height)`` of its image; a different mask size is an error unless
            ``resize`` is set.
        resize: Resize a mask of another size to ``image_size`` (nearest neighbour).
        image_path: The image file, named in the size-mismatch error.
        max_pixels: Raise PIL's decompression-bomb limit (as for images).

    Raises:
        DataError: The file is unreadable, over the pixel limit, or its size differs from the image's.
    """
    path = Path(path)
    with pixel_limit(max_pixels) as limit:
        try:
            with Image.open(path) as im:
                im.load()
                mask, lossy = im.copy(), is_lossy(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(
                f"{path}: the mask is larger than the decompression-bomb limit of {limit} pixels; "
                "if you trust it, raise the limit with --max_image_pixels N (or max_pixels=N)."
            ) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{path}: the mask file cannot be read ({e}); re-export or remove it.") from e
    if image_size is not None and mask.size != tuple(image_size):
        if not resize:
            raise DataError(
                f"{path}: mask size {mask.size[0]}x{mask.size[1]} differs from image {image_path or ''} size "
                f"{image_size[0]}x{image_size[1]}; fix the mask, or pass --resize_masks to resize it "
                "(nearest neighbour)."
            )
        if mask.mode == "P":
            mask = Image.fromarray(normalize_mask(mask).astype(np.uint8) * 255)
        mask = mask.resize(tuple(image_size), Image.NEAREST)
    return normalize_mask(mask, lossy=lossy)


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (between-class variance maximised over a histogram)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def remove_small_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_size`` pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0 or min_size <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def tissue_mask(
    image: Image.Image | np.ndarray,
    min_object_size: int = TISSUE_MIN_OBJECT_SIZE,
    min_saturation: float = TISSUE_MIN_SATURATION,
    max_value: float = TISSUE_MAX_VALUE,
    detection_width: int = TISSUE_DETECTION_WIDTH,
) -> np.ndarray:
    """Detect stained tissue: Otsu on HSV saturation, then small-object removal and hole filling.

    Args:
        image: An RGB image (PIL or uint8 array).
        min_object_size: Components smaller than this many pixels (at full resolution) are dropped.
        min_saturation: Lower bound of the saturation threshold (0-1), so a blank slide stays empty.
        max_value: Pixels brighter than this with saturation under twice the threshold are glass.
        detection_width: Work on a copy at most this wide (speed); the result is scaled back.

    Returns:
        A boolean (height, width) mask, True on tissue.
    """
    from scipy import ndimage

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    pil = pil.convert("RGB")
    full_size = pil.size
    scale = min(1.0, detection_width / max(full_size))
    small = pil.resize((max(1, round(full_size[0] * scale)), max(1, round(full_size[1] * scale))), Image.BILINEAR)
    hsv = np.asarray(small.convert("HSV"), dtype=np.float32) / 255.0
    sat, val = hsv[..., 1], hsv[..., 2]
    threshold = max(_otsu_threshold(sat), min_saturation)
    # Dark pixels (dense nuclei) count as tissue; bright, barely tinted pixels are glass.
    mask = ((sat > threshold) | (val < 0.25)) & ~((val > max_value) & (sat < 2 * threshold))
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), dtype=bool))
    mask = ndimage.binary_fill_holes(mask)
    mask = remove_small_objects(mask, max(1, int(min_object_size * scale * scale)))
    if scale < 1.0:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(full_size, Image.NEAREST)) > 0
    return mask


def resolve_mask(
    image: Image.Image,
    mask: str | Path | Image.Image | np.ndarray | None,
    empty_fallback: EmptyFallback = "tissue",
    resize: bool = False,
    image_path: str | Path | None = None,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, str]:
    """Return the mask to patch an image with, and where it came from.

    Args:
        image: The RGB image.
        mask: A mask file, PIL image or array; None means no mask (tissue detection).
        empty_fallback: What an empty mask becomes: ``"tissue"`` (detected tissue) or ``"whole"``.
        resize: Resize a mask of another size (nearest neighbour) instead of raising.
        image_path: Named in errors.
        max_pixels: Raise PIL's decompression-bomb limit for the mask file.

    Returns:
        ``(mask, source)`` with source ``"mask"``, ``"tissue"`` (no mask given),
        ``"empty_mask_tissue"`` / ``"empty_mask_whole"`` (the given mask was empty) or ``"whole"``
        (tissue detection found nothing either).
    """
    if empty_fallback not in ("tissue", "whole"):
        raise ValueError(f"empty_fallback must be 'tissue' or 'whole', got {empty_fallback!r}")
    width, height = image.size
    if mask is None:
        arr, source = tissue_mask(image), "tissue"
    else:
        if isinstance(mask, (str, Path)):
            arr = load_mask(mask, (width, height), resize=resize, image_path=image_path, max_pixels=max_pixels)
        else:
            arr = normalize_mask(mask)
            if arr.shape != (height, width):
                if not resize:
                    raise DataError(
                        f"{image_path or 'image'}: mask shape {arr.shape} differs from the image's "
                        f"{(height, width)}; pass a mask of the image's size (or resize=True)."
                    )
                arr = (
                    np.asarray(Image.fromarray(arr.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 0
                )
        source = "mask"
        if not arr.any():
            if empty_fallback == "whole":
                return np.ones((height, width), dtype=bool), "empty_mask_whole"
            arr, source = tissue_mask(image), "empty_mask_tissue"
    if not arr.any():
        return np.ones((height, width), dtype=bool), "whole"
    return arr, source


def load_class_mask(
    path: str | Path,
    image_size: tuple[int, int],
    num_labels: int,
    ignore_index: int = 255,
    image_path: str | Path | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Load a multi-class index mask (0 background, 1..N-1 classes, ``ignore_index`` unannotated) as uint8.

    Args:
        path: The mask file: one channel of class indices (8-bit grey or palette indices), lossless.
        image_size: ``(width, height)`` of its image; another size is an error.
        num_labels: Number of classes including the background.
        ignore_index: The value of unannotated pixels, kept as is.
        image_path: The image file, named in errors.
        max_pixels: Raise PIL's decompression-bomb limit (as for images).

    Raises:
        DataError: Unreadable, another size, more than one channel, or a value that is neither a class nor
            ``ignore_index``.
    """
    path = Path(path)
    with pixel_limit(max_pixels):
        try:
            with Image.open(path) as im:
                mode, size, arr = im.mode, im.size, np.asarray(im)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{path}: the mask file cannot be read ({e}); re-export or remove it.") from e
    if size != tuple(image_size):
        raise DataError(
            f"{path}: mask size {size[0]}x{size[1]} differs from image {image_path or ''} size "
            f"{image_size[0]}x{image_size[1]}; fix the mask."
        )
    if arr.ndim != 2 or mode not in ("L", "P", "I", "I;16"):
        raise DataError(
            f"{path}: a multi-class mask must be one channel of class indices (8-bit grey or palette), got mode "
            f"{mode}; save the class index of each pixel as a grey PNG."
        )
    bad = np.setdiff1d(np.unique(arr), [*range(num_labels), ignore_index])
    if bad.size:
        raise DataError(
            f"{path}: mask values {bad[:5].tolist()} are neither classes 0..{num_labels - 1} nor the ignore index "
            f"{ignore_index}; pass the right --classes / --ignore_index, or use --mask_mode binary."
        )
    return arr.astype(np.uint8)
