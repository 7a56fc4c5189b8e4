"""Mask-guided patch selection: connected components, grid tiles and top-k tiles as PatchBox lists.

Pure functions on numpy masks, shared by dataset building and the inference pipeline (this module
ships with model checkpoints: it imports only numpy and PIL, and scipy inside ``component_boxes``).
Tile selection is vectorised (block sums in one pass over the mask), so choosing tiles costs far
less than decoding the image they come from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

# Bump when the selection or cropping of patches changes: it is part of the dataset cache key.
PATCHING_VERSION = "1"
STRATEGIES = ("grid", "components", "topk", "whole")


class PatchBox(NamedTuple):
    """A patch rectangle in image pixels; it may reach past the image edge (padded when cropped).

    Attributes:
        x: Left column.
        y: Top row.
        w: Width.
        h: Height.
        foreground: Mask pixels inside the rectangle.
    """

    x: int
    y: int
    w: int
    h: int
    foreground: int

    @property
    def fraction(self) -> float:
        """Foreground pixels over the box area."""
        return self.foreground / float(self.w * self.h) if self.w and self.h else 0.0


def _as_bool(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (height, width), got shape {mask.shape}")
    return mask if mask.dtype == bool else mask > 0


def grid_positions(length: int, size: int, stride: int) -> np.ndarray:
    """Tile starts along one axis: every ``stride``, the last tile reaching (or passing) the edge."""
    if size <= 0 or stride <= 0:
        raise ValueError(f"size and stride must be positive, got size={size}, stride={stride}")
    n = 1 if length <= size else math.ceil((length - size) / stride) + 1
    return np.arange(n, dtype=np.int64) * stride


def _block_sums(arr: np.ndarray, block: int, axis: int) -> np.ndarray:
    """Sums of consecutive ``block``-wide slabs along ``axis`` (the last slab may be shorter).

    0/1 bytes are first summed in uint8 over slabs of at most 255 (exact, and several times faster
    than a wider accumulator), then those partial sums are added in int64.
    """
    moved = np.moveaxis(arr, axis, 0)
    n_full = moved.shape[0] // block
    if moved.dtype == np.uint8 and block > 1:
        sub = max(d for d in range(1, min(block, 255) + 1) if block % d == 0)
        head = (
            moved[: n_full * block].reshape(n_full * block // sub, sub, *moved.shape[1:]).sum(axis=1, dtype=np.uint8)
        )
        head = head.reshape(n_full, block // sub, *moved.shape[1:]).sum(axis=1, dtype=np.int64)
    else:
        head = moved[: n_full * block].reshape(n_full, block, *moved.shape[1:]).sum(axis=1, dtype=np.int64)
    if n_full * block < moved.shape[0]:
        head = np.concatenate([head, moved[n_full * block :].sum(axis=0, dtype=np.int64)[None]], axis=0)
    return np.moveaxis(head, 0, axis)


def _window_sums(blocks: np.ndarray, starts: np.ndarray, size: int, block: int, axis: int) -> np.ndarray:
    """Sums over windows [start, start + size) from block sums (windows are whole blocks, clipped at the end)."""
    moved = np.moveaxis(blocks, axis, 0)
    padded = np.concatenate([moved, np.zeros((1, *moved.shape[1:]), dtype=moved.dtype)], axis=0)
    first = starts // block
    out = np.zeros((len(starts), *moved.shape[1:]), dtype=np.int64)
    for k in range(size // block):  # a window spans size // block blocks (1 when stride == size)
        out += padded[np.minimum(first + k, moved.shape[0])]
    return np.moveaxis(out, 0, axis)


def grid_counts(mask: np.ndarray, size: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask pixels in every grid tile, exactly, in one pass over the mask.

    The mask is summed in blocks of ``gcd(size, stride)`` rows, then columns (contiguous adds that
    numpy vectorises), and each tile adds up the ``size / gcd`` blocks it spans.

    Returns:
        ``(ys, xs, counts)``: tile row starts, column starts and a (len(ys), len(xs)) count array.
    """
    mask = _as_bool(mask)
    ys, xs = grid_positions(mask.shape[0], size, stride), grid_positions(mask.shape[1], size, stride)
    block = math.gcd(size, stride)
    rows = _window_sums(_block_sums(mask.view(np.uint8), block, 0), ys, size, block, 0)  # (ny, W)
    counts = _window_sums(_block_sums(rows, block, 1), xs, size, block, 1)  # (ny, nx)
    return ys, xs, counts


def _grid_counts(mask: np.ndarray, size: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ys, xs, counts = grid_counts(mask, size, stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return yy.ravel(), xx.ravel(), counts.ravel()


def grid_boxes(
    mask: np.ndarray,
    size: int,
    stride: int | None = None,
    min_foreground: int = 200,
    min_fraction: float | None = None,
) -> list[PatchBox]:
    """Tiles of ``size`` every ``stride`` pixels that hold enough mask pixels.

    Tiles at the right and bottom edges reach past the image when it is not a multiple of the
    stride; they are kept when they qualify and padded when cropped.

    Args:
        mask: Boolean (height, width) region of interest.
        size: Tile side in pixels.
        stride: Step between tiles (default ``size``: no overlap).
        min_foreground: Minimum mask pixels in a tile.
        min_fraction: Optional minimum fraction of the tile area covered by the mask.

    Returns:
        Qualifying tiles in row-major order.
    """
    mask = _as_bool(mask)
    stride = stride or size
    ys, xs, counts = _grid_counts(mask, size, stride)
    keep = counts >= max(min_foreground, 1)
    if min_fraction is not None:
        keep &= counts >= min_fraction * size * size
    return [PatchBox(int(x), int(y), size, size, int(c)) for y, x, c in zip(ys[keep], xs[keep], counts[keep])]


def topk_boxes(mask: np.ndarray, size: int = 128, stride: int = 64, k: int = 12) -> list[PatchBox]:
    """The ``k`` grid tiles with the most mask pixels (ties: row-major order), best first."""
    mask = _as_bool(mask)
    ys, xs, counts = _grid_counts(mask, size, stride)
    order = np.argsort(-counts, kind="stable")[:k]
    order = order[counts[order] > 0]
    return [PatchBox(int(xs[i]), int(ys[i]), size, size, int(counts[i])) for i in order]


def component_boxes(mask: np.ndarray, min_area: int = 200, pad: int = 0) -> list[PatchBox]:
    """The bounding box of each 8-connected mask component of at least ``min_area`` pixels.

    Args:
        mask: Boolean (height, width) region of interest.
        min_area: Components with fewer pixels are dropped (the seed's best filter was 200).
        pad: Pixels added on each side of a box (clipped to the image).

    Returns:
        Boxes in the order of the components' first pixel (row-major).
    """
    from scipy import ndimage

    mask = _as_bool(mask)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    h, w = mask.shape
    boxes = []
    for index, slices in enumerate(ndimage.find_objects(labels), start=1):
        if slices is None or areas[index] < min_area:
            continue
        y0, y1 = max(slices[0].start - pad, 0), min(slices[0].stop + pad, h)
        x0, x1 = max(slices[1].start - pad, 0), min(slices[1].stop + pad, w)
        fg = int(np.count_nonzero(mask[y0:y1, x0:x1]))
        boxes.append(PatchBox(int(x0), int(y0), int(x1 - x0), int(y1 - y0), fg))
    return boxes


def whole_box(mask: np.ndarray) -> list[PatchBox]:
    """One box covering the whole image (the ``whole`` strategy: no patching)."""
    mask = _as_bool(mask)
    return [PatchBox(0, 0, mask.shape[1], mask.shape[0], int(mask.sum()))]


def reference_grid_boxes(
    mask: np.ndarray, size: int, stride: int | None = None, min_foreground: int = 200
) -> list[PatchBox]:
    """Plain per-tile loop equivalent of ``grid_boxes`` (for tests and benchmarks only: slow)."""
    mask = _as_bool(mask)
    stride = stride or size
    boxes = []
    for y in grid_positions(mask.shape[0], size, stride):
        for x in grid_positions(mask.shape[1], size, stride):
            count = int(mask[y : y + size, x : x + size].sum())
            if count >= max(min_foreground, 1):
                boxes.append(PatchBox(int(x), int(y), size, size, count))
    return boxes


@dataclass
class PatchingConfig:
    """How patches are cut from an image; stored in the model config so inference cuts the same.

    Attributes:
        strategy: ``"grid"``, ``"components"``, ``"topk"`` or ``"whole"``.
        patch_size: Tile side for grid/topk (pixels at source resolution).
        stride: Tile step (default: ``patch_size`` for grid, ``patch_size // 2`` for topk).
        min_foreground: Minimum mask pixels per grid tile.
        min_fraction: Optional minimum mask fraction per grid tile.
        top_k: Tiles kept by the topk strategy.
        min_area: Minimum component area for the components strategy.
        pad: Padding around component boxes.
        paint_background: Paint pixels outside the mask white before cropping.
        empty_fallback: What an empty mask becomes: ``"tissue"`` detection or the ``"whole"`` image.
    """

    strategy: str = "grid"
    patch_size: int = 224
    stride: int | None = None
    min_foreground: int = 200
    min_fraction: float | None = None
    top_k: int = 12
    min_area: int = 200
    pad: int = 0
    paint_background: bool = False
    empty_fallback: str = "tissue"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown patching strategy {self.strategy!r}; choose one of {list(STRATEGIES)}")
        if self.patch_size <= 0 or (self.stride is not None and self.stride <= 0):
            raise ValueError(f"patch_size and stride must be positive, got {self.patch_size}, {self.stride}")
        if self.empty_fallback not in ("tissue", "whole"):
            raise ValueError(f"empty_fallback must be 'tissue' or 'whole', got {self.empty_fallback!r}")

    def boxes(self, mask: np.ndarray) -> list[PatchBox]:
        """Select the patch boxes of one mask with this configuration."""
        if self.strategy == "grid":
            return grid_boxes(mask, self.patch_size, self.stride, self.min_foreground, self.min_fraction)
        if self.strategy == "topk":
            return topk_boxes(mask, self.patch_size, self.stride or max(self.patch_size // 2, 1), self.top_k)
        if self.strategy == "components":
            return component_boxes(mask, self.min_area, self.pad)
        return whole_box(mask)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored in model configs and dataset cache keys)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PatchingConfig:
        """Build from ``to_dict()`` output, ignoring unknown keys (newer versions may add some)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


def crop_patch(
    image: Image.Image, box: PatchBox, mask: np.ndarray | None = None, paint_background: bool = False
) -> Image.Image:
    """Crop ``box`` from ``image``, padding with white past the edges.

    Args:
        image: RGB image.
        box: The rectangle.
        mask: The image's boolean mask, needed with ``paint_background``.
        paint_background: Paint pixels outside the mask white.
    """
    x0, y0 = max(box.x, 0), max(box.y, 0)
    x1, y1 = min(box.x + box.w, image.width), min(box.y + box.h, image.height)
    inside = image.crop((x0, y0, x1, y1))
    if paint_background and mask is not None:
        keep = np.asarray(mask[y0:y1, x0:x1], dtype=bool)
        arr = np.asarray(inside.convert("RGB")).copy()
        arr[~keep] = 255
        inside = Image.fromarray(arr)
    if (x0, y0, x1, y1) == (box.x, box.y, box.x + box.w, box.y + box.h):
        return inside
    canvas = Image.new("RGB", (box.w, box.h), (255, 255, 255))
    canvas.paste(inside, (x0 - box.x, y0 - box.y))
    return canvas


def extract_patches(
    image: Image.Image, mask: np.ndarray, config: PatchingConfig
) -> list[tuple[PatchBox, Image.Image]]:
    """Select boxes on ``mask`` with ``config`` and crop them from ``image``."""
    return [(box, crop_patch(image, box, mask, config.paint_background)) for box in config.boxes(mask)]
