"""Per-image measurements for cleaning: hashes, H&E colour, artifact regions, colour/texture statistics."""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..images import DataError, load_image
from ..masks import load_mask
from ..sources import Sample
from ..workers import available_cpus
from .config import CleaningConfig

logger = logging.getLogger(__name__)

EmbeddingModel = Callable[[Image.Image], np.ndarray]
THUMBNAIL = 64  # side of the RGB thumbnail kept per image (12 KB) for pairwise comparisons

FEATURE_NAMES = (
    "non_stain_colour",  # fraction of coloured pixels outside the H&E hues
    "hue_spread",  # 1 - circular mean length of the hues
    "hue_x",  # mean hue direction, weighted by concentration (cos, sin)
    "hue_y",
    "saturation_p10",
    "saturation_p50",
    "saturation_p90",
    "value_p10",
    "value_p50",
    "value_p90",
    "dark_fraction",  # near-black pixels: outlines and text
    "log_gradient_p50",  # texture strength: tissue is textured everywhere, cartoons and blends are not
    "log_gradient_p90",
    "flat_fraction",  # pixels without any local gradient
    "edge_fraction",  # very strong edges: outlines
    "flat_patch_fraction",  # 5x5 windows without contrast
)
GRADIENT_FEATURE = FEATURE_NAMES.index("log_gradient_p50")


@dataclass
class ImageFeatures:
    """What the streaming pass keeps about one image (a few KB: no full-size pixels).

    Attributes:
        image_id: The image.
        size: ``(width, height)``.
        pixel_hash: SHA-1 of the decoded RGB pixels and their shape (not of the file bytes).
        mask_hash: SHA-1 of the boolean mask, or None (no mask, or an empty or full one).
        phash: ``imagehash.phash`` as an int (64 bits).
        dhash: ``imagehash.dhash`` as an int (64 bits).
        stain_fraction: Fraction of the coloured pixels outside artifact regions with H&E hues.
        artifact_fraction: Area fraction of the foreign-colour regions.
        artifact_box: Their bounding box ``(x0, y0, x1, y1)`` as fractions of the image, or None.
        vector: Colour/texture statistics (``FEATURE_NAMES``) outside artifact regions.
        thumbnail: 64x64 RGB uint8, for near-duplicate checks and twin comparisons.
    """

    image_id: str
    size: tuple[int, int]
    pixel_hash: str
    mask_hash: str | None
    phash: int
    dhash: int
    stain_fraction: float
    artifact_fraction: float
    artifact_box: tuple[float, float, float, float] | None
    vector: np.ndarray = field(repr=False)
    thumbnail: np.ndarray = field(repr=False)


def in_ranges(hue: np.ndarray, ranges: Iterable[tuple[float, float]]) -> np.ndarray:
    """Whether each hue (degrees) lies in one of the inclusive ``(low, high)`` ranges."""
    out = np.zeros(hue.shape, dtype=bool)
    for lo, hi in ranges:
        out |= (hue >= lo) & (hue <= hi)
    return out


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    return pil.convert("RGB")


def _small_hsv(image: Image.Image, size: int) -> tuple[Image.Image, np.ndarray]:
    """A copy at most ``size`` pixels on its longer side, and its HSV (hue in degrees, S and V in 0-1)."""
    small = image.copy()
    if max(small.size) > size:
        small.thumbnail((size, size), Image.BILINEAR)
    hsv = np.asarray(small.convert("HSV"), dtype=np.float32) / 255.0
    hsv[..., 0] *= 360.0
    return small, hsv


def artifact_regions(
    image: Image.Image | np.ndarray, config: CleaningConfig | None = None
) -> tuple[np.ndarray, float, tuple[float, float, float, float] | None]:
    """Find compact regions of saturated colour foreign to H&E (yellow, green, cyan, vivid blue).

    Args:
        image: RGB image (PIL or uint8 array), analysed at ``config.analysis_size``.
        config: Thresholds (defaults when None).

    Returns:
        ``(regions, fraction, box)``: a boolean map at analysis size, the area fraction it covers, and the
        bounding box of all regions as fractions ``(x0, y0, x1, y1)`` of the image (None when no region).
    """
    cfg = config or CleaningConfig()
    _, hsv = _small_hsv(_as_pil(image), cfg.analysis_size)
    return _artifact_regions_hsv(hsv, cfg)


def _artifact_regions_hsv(hsv: np.ndarray, cfg: CleaningConfig):
    from scipy import ndimage
    from skimage.measure import regionprops

    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    foreign = in_ranges(hue, cfg.artifact_hues) & (sat >= cfg.artifact_saturation) & (val >= 0.2)
    foreign |= (
        in_ranges(hue, cfg.artifact_blue_hues)
        & (sat >= cfg.artifact_blue_saturation)
        & (val >= cfg.artifact_blue_value)
    )
    regions = np.zeros(foreign.shape, dtype=bool)
    if foreign.sum() < cfg.artifact_min_region * foreign.size:
        return regions, 0.0, None
    foreign = ndimage.binary_opening(foreign, structure=np.ones((3, 3), dtype=bool))
    foreign = ndimage.binary_closing(foreign, structure=np.ones((5, 5), dtype=bool), border_value=0)
    labels, _ = ndimage.label(foreign)
    min_area = cfg.artifact_min_region * foreign.size
    for prop in regionprops(labels):
        if prop.area >= min_area and prop.solidity >= cfg.artifact_min_solidity:
            regions[labels == prop.label] = True
    if not regions.any():
        return regions, 0.0, None
    # Grow the compact cores into adjacent non-H&E coloured pixels: a semi-transparent blob turns brown or
    # orange over purple tissue, and those parts belong to it too.
    weak = (sat >= cfg.chromatic_saturation) & (val >= 0.15) & ~in_ranges(hue, cfg.stain_hues)
    weak = ndimage.binary_closing(weak, structure=np.ones((3, 3), dtype=bool))
    near = ndimage.distance_transform_edt(~regions) <= cfg.artifact_grow * max(regions.shape)
    regions = ndimage.binary_propagation(regions, mask=(weak & near) | regions)
    ys, xs = np.nonzero(regions)
    h, w = regions.shape
    box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
    return regions, float(regions.mean()), tuple(round(float(b), 4) for b in box)


def stain_fraction(image: Image.Image | np.ndarray, config: CleaningConfig | None = None) -> float:
    """Fraction of the coloured (non-background) pixels whose hue is in the H&E stain range.

    Returns 1.0 for an image without coloured pixels (nothing contradicts H&E; the outlier score decides).
    """
    cfg = config or CleaningConfig()
    _, hsv = _small_hsv(_as_pil(image), cfg.analysis_size)
    chromatic = (hsv[..., 1] >= cfg.chromatic_saturation) & (hsv[..., 2] >= 0.15)
    if not chromatic.any():
        return 1.0
    return float(in_ranges(hsv[..., 0][chromatic], cfg.stain_hues).mean())


def _hash_array(arr: np.ndarray) -> str:
    h = hashlib.sha1(f"{arr.shape}|{arr.dtype}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def image_features(
    image: Image.Image, mask: np.ndarray | None = None, config: CleaningConfig | None = None, image_id: str = ""
) -> ImageFeatures:
    """Compute everything the detectors need from one decoded image (and its mask).

    Args:
        image: The RGB image.
        mask: Its boolean mask, or None. Empty and full masks get no hash (they say nothing about the image).
        config: Thresholds (defaults when None).
        image_id: Carried into the result.
    """
    import imagehash
    from scipy import ndimage

    cfg = config or CleaningConfig()
    image = _as_pil(image)
    mask_hash = None
    if mask is not None and mask.any() and not mask.all():
        mask_hash = f"{_hash_array(np.packbits(mask, axis=None))}-{mask.shape[0]}x{mask.shape[1]}"
    small, hsv = _small_hsv(image, cfg.analysis_size)
    regions, art_fraction, art_box = _artifact_regions_hsv(hsv, cfg)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    # Measure the tissue outside artifact regions (and their rims): a pasted blob should not make a real
    # image look like an outlier; it is reported as an artifact instead.
    outside = ~ndimage.binary_dilation(regions, iterations=2) if regions.any() else np.ones(hue.shape, bool)
    if outside.mean() < 0.3:
        outside = np.ones(hue.shape, bool)
    chromatic = (sat >= cfg.chromatic_saturation) & (val >= 0.15) & outside
    foreground = ~((val > 0.85) & (sat < cfg.chromatic_saturation)) & outside
    n_chrom = int(chromatic.sum())
    return ImageFeatures(
        image_id=image_id,
        size=image.size,
        pixel_hash=_hash_array(np.asarray(image)),
        mask_hash=mask_hash,
        phash=int(str(imagehash.phash(small)), 16),
        dhash=int(str(imagehash.dhash(small)), 16),
        stain_fraction=float(in_ranges(hue[chromatic], cfg.stain_hues).mean()) if n_chrom else 1.0,
        artifact_fraction=art_fraction,
        artifact_box=art_box,
        vector=_texture_colour_vector(small, hsv, chromatic, foreground, outside, cfg.stain_hues),
        thumbnail=np.asarray(small.resize((THUMBNAIL, THUMBNAIL), Image.BOX), dtype=np.uint8),
    )


def _texture_colour_vector(
    small: Image.Image,
    hsv: np.ndarray,
    chromatic: np.ndarray,
    foreground: np.ndarray,
    outside: np.ndarray,
    stain_hues: Iterable[tuple[float, float]],
) -> np.ndarray:
    """Colour and texture statistics (``FEATURE_NAMES``): the embedding used when no pretrained backbone is given."""
    from scipy import ndimage

    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    h = hue[chromatic]
    if h.size:
        rad = np.deg2rad(h)
        cx, cy = float(np.cos(rad).mean()), float(np.sin(rad).mean())
        colour = [1.0 - float(in_ranges(h, stain_hues).mean()), 1.0 - math.hypot(cx, cy), cx, cy]
    else:
        colour = [0.0, 1.0, 0.0, 0.0]
    fg = foreground if foreground.any() else outside
    sv = [float(q) for channel in (sat, val) for q in np.percentile(channel[fg], [10, 50, 90])]
    gray = np.asarray(small.convert("L"), dtype=np.float32) / 255.0
    grad = np.hypot(ndimage.sobel(gray, 1), ndimage.sobel(gray, 0))[fg]
    local_std = np.sqrt(np.maximum(ndimage.uniform_filter(gray**2, 5) - ndimage.uniform_filter(gray, 5) ** 2, 0))
    texture = [
        float(((val < 0.15) & outside).sum()) / max(int(outside.sum()), 1),
        math.log(float(np.median(grad)) + 1e-3),
        math.log(float(np.percentile(grad, 90)) + 1e-3),
        float((grad < 0.02).mean()),
        float((grad > 1.0).mean()),
        float((local_std[fg] < 0.01).mean()),
    ]
    return np.asarray(colour + sv + texture, dtype=np.float32)


def _features_for(job: tuple[str, str, str | None, CleaningConfig]) -> ImageFeatures:
    image_id, image_path, mask_path, cfg = job
    image = load_image(image_path)
    mask = None
    if mask_path:
        try:
            mask = load_mask(mask_path)
        except DataError as e:
            logger.warning("%s: mask not used for duplicate detection (%s)", image_id, e)
    return image_features(image, mask, cfg, image_id=image_id)


def stream_features(samples: Sequence[Sample], config: CleaningConfig, progress: bool = False) -> list[ImageFeatures]:
    """Measure every sample's image, one at a time (in worker processes when several CPUs are free).

    Memory stays bounded: a worker holds one decoded image at a time and returns a few KB per image.
    """
    jobs = [(s.image_id, str(s.image_path), str(s.mask_path) if s.mask_path else None, config) for s in samples]
    workers = config.num_workers
    if workers is None:
        workers = min(available_cpus(), 8) if len(jobs) >= 64 else 0
    bar = tqdm(total=len(jobs), desc="clean: reading images", unit="img", disable=not progress)
    out: list[ImageFeatures] = []
    if workers <= 1:
        for job in jobs:
            out.append(_features_for(job))
            bar.update(1)
    else:
        # fork: the workers only decode and measure images, and callers' scripts need no __main__ guard.
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for feat in pool.map(_features_for, jobs, chunksize=4):
                out.append(feat)
                bar.update(1)
    bar.close()
    return out


def embed_samples(samples: Sequence[Sample], model: str | Path | EmbeddingModel, progress: bool = False) -> np.ndarray:
    """Embeddings of every image from a callable ``PIL.Image -> 1-D array`` or a local transformers model folder."""
    fn = model if callable(model) else _local_backbone(Path(model))
    bar = tqdm(total=len(samples), desc="clean: embedding images", unit="img", disable=not progress)
    out = []
    for s in samples:
        out.append(np.asarray(fn(load_image(s.image_path)), dtype=np.float64).ravel())
        bar.update(1)
    bar.close()
    return np.stack(out)


def _local_backbone(path: Path) -> EmbeddingModel:
    """A pretrained backbone from a local folder (``save_pretrained`` output); nothing is downloaded."""
    if not path.is_dir():
        raise DataError(f"{path}: embedding model folder not found; pass a local folder saved with save_pretrained.")
    import torch
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    net = AutoModel.from_pretrained(path, local_files_only=True).eval()

    @torch.no_grad()
    def embed(image: Image.Image) -> np.ndarray:
        out = net(**processor(images=image, return_tensors="pt"))
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(dim=1)
        return pooled.reshape(-1).float().numpy()

    return embed
