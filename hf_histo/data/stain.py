"""Stain normalisation of whole H&E images before they are cut (Macenko, through torchstain), for training and inference."""

# Ships with checkpoints (the engine applies it; patching.py names the methods): stdlib, numpy, PIL, and
# torchstain only when a model normalises stain, so a folder of a model that does not loads without it.

from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image

try:  # only a model trained with stain normalisation needs torchstain (see `normalize_stain`)
    import torchstain
except ImportError:
    torchstain = None

from .patching import check_stain_norm

logger = logging.getLogger(__name__)

# As in pyproject.toml; a Hub folder's requirements.txt lists it when its model normalises stain.
TORCHSTAIN_REQUIREMENT = "torchstain>=1.3"

# The Macenko target: H&E stain vectors in optical density (columns) and the 99th-percentile stain concentrations.
# torchstain's reference (1.3 and 1.4), pinned here so that a torchstain release cannot change a trained model's inputs.
MACENKO_HE_REF = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MACENKO_MAX_C_REF = (1.9705, 1.0308)
MACENKO_IO, MACENKO_ALPHA, MACENKO_BETA = 240, 1, 0.15  # light intensity, angle percentile, optical-density threshold
# Fewer stained pixels (optical density >= beta in every channel) than this leave the stain estimate to noise.
MIN_STAINED_PIXELS = 256
# torchstain's one-piece normalisation peaks at ~85 bytes per pixel (float64 densities, concentrations, copies).
# Larger images are estimated on an evenly strided subsample of about this many pixels and transformed in bands of
# rows, so that memory stays ~10 bytes per pixel beyond the image at any size.
MACENKO_ONE_PIECE_PIXELS = 4_000_000


def stained_pixels(rgb: np.ndarray) -> int:
    """Pixels of an ``(H, W, 3)`` uint8 image that Macenko's estimate uses: optical density >= beta in every channel."""
    brightest = int(MACENKO_IO * np.exp(-MACENKO_BETA)) - 1  # -log((I + 1) / Io) >= beta  <=>  I + 1 <= Io * e^-beta
    return int(np.count_nonzero(rgb.max(axis=2) <= brightest))


def macenko(rgb: np.ndarray) -> np.ndarray | None:
    """Macenko normalisation of an ``(H, W, 3)`` uint8 image to the pinned reference; None when the estimate fails.

    The estimate fails on an image with too few stained pixels (blank, background only) and when the
    eigen-decomposition, the percentiles or the least squares fail or divide by zero.

    torchstain's numpy backend, not its torch one: the dataset builder cuts in forked processes, and torch's OpenMP
    pool, started by an earlier training in the parent process, hangs in a forked child.
    """
    if stained_pixels(rgb) < MIN_STAINED_PIXELS:
        return None
    normalizer = torchstain.normalizers.MacenkoNormalizer(backend="numpy")  # one per call: threads share none
    normalizer.HERef = np.array(MACENKO_HE_REF)
    normalizer.maxCRef = np.array(MACENKO_MAX_C_REF)
    height, width = rgb.shape[:2]
    try:
        with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):  # exp() may saturate
            if height * width <= MACENKO_ONE_PIECE_PIXELS:
                out, _, _ = normalizer.normalize(
                    I=rgb, Io=MACENKO_IO, alpha=MACENKO_ALPHA, beta=MACENKO_BETA, stains=False
                )
                return out
            step = math.ceil(math.sqrt(height * width / MACENKO_ONE_PIECE_PIXELS))
            sample = np.ascontiguousarray(rgb[::step, ::step])
            if stained_pixels(sample) < MIN_STAINED_PIXELS:
                return None
            normalizer.fit(sample, Io=MACENKO_IO, alpha=MACENKO_ALPHA, beta=MACENKO_BETA)  # the image's own stains
            out = np.empty_like(rgb)
            rows = max(1, MACENKO_ONE_PIECE_PIXELS // 4 // width)
            for top in range(0, height, rows):
                out[top : top + rows] = _to_reference(rgb[top : top + rows], normalizer.HERef, normalizer.maxCRef)
            return out
    except (ArithmeticError, ValueError, IndexError):  # FloatingPointError; LinAlgError is a ValueError
        return None


def _to_reference(rgb: np.ndarray, stains: np.ndarray, max_c: np.ndarray) -> np.ndarray:
    """Pixels of stain matrix ``stains`` and 99th-percentile concentrations ``max_c`` redrawn in the reference's.

    torchstain's ``normalize`` after its estimate, applied to a band of rows; torchstain has no call that takes a
    given estimate.
    """
    density = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / MACENKO_IO)
    concentrations = np.linalg.lstsq(stains, density.T, rcond=None)[0]
    concentrations /= (max_c / np.array(MACENKO_MAX_C_REF))[:, None]
    redrawn = np.minimum(MACENKO_IO * np.exp(-np.array(MACENKO_HE_REF) @ concentrations), 255)
    return redrawn.T.reshape(rgb.shape).astype(np.uint8)


def normalize_stain(image: Image.Image, method: str = "none", name: str | None = None) -> Image.Image:
    """The whole image with its stain normalised by ``method`` (``"none"``: the image itself).

    The dataset builder applies it to each image before cutting its patches and the inference engine before
    cutting, with the method stored in the model's ``PatchingConfig``: training and inference see the same pixels.
    An image whose stain cannot be estimated (blank, background only, degenerate colours) is used as it is, with a
    warning naming it.

    Args:
        image: An RGB image.
        method: One of ``patching.STAIN_NORMS``.
        name: The image's path or id, for the warning.

    Raises:
        ImportError: ``method`` needs torchstain and it is not installed.
    """
    check_stain_norm(method)
    if method == "none":
        return image
    if torchstain is None:
        raise ImportError(
            f"this model normalises stain ({method}) with torchstain, which is not installed: "
            f"pip install '{TORCHSTAIN_REQUIREMENT}'"
        )
    normalised = macenko(np.asarray(image.convert("RGB")))
    if normalised is None:
        logger.warning(
            "%s: the %s stain estimate failed (blank, background only or degenerate colours); the image is used "
            "without stain normalisation.",
            name or "image",
            method,
        )
        return image
    return Image.fromarray(normalised)
