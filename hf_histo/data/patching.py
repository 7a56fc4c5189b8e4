"""Mask-guided patch selection: connected components, grid tiles and top-k tiles as PatchBox lists."""

# Pure functions on numpy masks, shared by dataset building and inference. This module ships with model
# checkpoints: it imports only numpy and PIL (and scipy inside ``component_boxes``). Tile selection is vectorised
# (block sums in one pass over the mask), so choosing tiles costs far less than decoding the image.

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

# Bump when the selection or cropping of patches changes: it is part of the dataset cache key.
PATCHING_VERSION = "2"
STRATEGIES = ("grid", "components", "topk", "whole")
FIXED_SIZE_STRATEGIES = ("grid", "topk")  # every patch (fallback tile included) is patch_size x patch_size
EMPTY_FALLBACKS = ("tissue", "whole")
STAIN_NORMS = ("none", "macenko")  # hf_histo/data/stain.py applies them


def check_stain_norm(method: str) -> None:
    """Raise a ValueError naming the choices unless ``method`` is one of ``STAIN_NORMS``."""
    if method not in STAIN_NORMS:
        raise ValueError(f"unknown stain normalisation {method!r}; choose one of {list(STAIN_NORMS)}")


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
    """Tile starts along one axis: every ``stride``, the last tile reaching (or passing) the edge.

    Starts are always inside the image (with ``stride > size`` a start past the edge is dropped).
    """
    if size <= 0 or stride <= 0:
        raise ValueError(f"size and stride must be positive, got size={size}, stride={stride}")
    n = 1 if length <= size else math.ceil((length - size) / stride) + 1
    starts = np.arange(n, dtype=np.int64) * stride
    return starts[starts < max(length, 1)]


def _u8_chunk(block: int) -> int:
    """The largest divisor of ``block`` that is at most 255 (0/1 bytes summed that far cannot overflow)."""
    return max(d for d in range(1, min(block, 255) + 1) if block % d == 0)


def _sum_rows_u8(rows: np.ndarray) -> np.ndarray:
    """Exact column totals of a 0/1 uint8 array, summing at most 255 rows at a time in uint8."""
    out = np.zeros(rows.shape[1:], dtype=np.int32)
    for start in range(0, rows.shape[0], 255):
        out += rows[start : start + 255].sum(axis=0, dtype=np.uint8)
    return out


def _row_block_sums(u8: np.ndarray, block: int) -> np.ndarray:
    """Sums of consecutive ``block``-row slabs of a 0/1 uint8 (H, W) array (the last slab may be shorter).

    This is the only pass over every mask pixel. Whole rows are added as contiguous vectors in uint8
    (exact for up to 255 rows, and memory-bound), so it runs at about the speed of reading the mask.
    """
    height, width = u8.shape
    n_full = height // block
    parts = []
    if n_full:
        sub = _u8_chunk(block)
        head = u8[: n_full * block].reshape(n_full * block // sub, sub, width).sum(axis=1, dtype=np.uint8)
        if block > sub:
            head = head.reshape(n_full, block // sub, width).sum(axis=1, dtype=np.int32)
        parts.append(head)
    if n_full * block < height:
        parts.append(_sum_rows_u8(u8[n_full * block :])[None])
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0, dtype=np.int32)


def _col_block_sums(rows: np.ndarray, block: int) -> np.ndarray:
    """Sums of consecutive ``block``-column slabs of a small (n, W) array, as int32."""
    if block == 1:
        return rows.astype(np.int32)
    n_blocks = -(-rows.shape[1] // block)
    if block <= 16:  # few strided adds beat a reduction over a short inner axis
        out = np.zeros((rows.shape[0], n_blocks), dtype=np.int32)
        for k in range(block):
            part = rows[:, k::block]
            out[:, : part.shape[1]] += part
        return out
    return np.add.reduceat(rows, np.arange(0, rows.shape[1], block), axis=1, dtype=np.int32)


def _window_sums(blocks: np.ndarray, n: int, step: int, span: int, axis: int) -> np.ndarray:
    """Sums of ``span`` consecutive blocks for ``n`` windows starting every ``step`` blocks along ``axis``.

    Windows past the last block are clipped (zero padding), which is how edge tiles are counted.
    """
    n_blocks = blocks.shape[axis]
    if span == 1 and step == 1 and n == n_blocks:
        return blocks.astype(np.int32, copy=False)
    need = (n - 1) * step + span
    if need > n_blocks:
        pad = [(0, 0)] * blocks.ndim
        pad[axis] = (0, need - n_blocks)
        blocks = np.pad(blocks, pad)
    index: list[slice] = [slice(None)] * blocks.ndim
    if span <= 16:
        out = None
        for k in range(span):
            index[axis] = slice(k, k + (n - 1) * step + 1, step)
            part = blocks[tuple(index)]
            out = part.astype(np.int32) if out is None else out + part
        return out
    # Long windows (size much larger than gcd(size, stride)): difference of prefix sums, taken along
    # the contiguous axis (numpy's cumsum across rows is many times slower).
    moved = np.ascontiguousarray(np.moveaxis(blocks, axis, -1))
    cumulative = np.zeros((*moved.shape[:-1], moved.shape[-1] + 1), dtype=np.int64)
    np.cumsum(moved, axis=-1, out=cumulative[..., 1:])
    cumulative = np.moveaxis(cumulative, -1, axis)
    index[axis] = slice(span, span + (n - 1) * step + 1, step)
    upper = cumulative[tuple(index)]
    index[axis] = slice(0, (n - 1) * step + 1, step)
    return (upper - cumulative[tuple(index)]).astype(np.int32)


def grid_counts(mask: np.ndarray, size: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask pixels in every grid tile, exactly, in one pass over the mask.

    The mask is summed in slabs of ``gcd(size, stride)`` rows (the one full pass), those slabs in
    blocks of as many columns, and each tile then adds up the ``size / gcd`` blocks it spans on the
    small block array. Tiles reaching past the right/bottom edge count the pixels inside the image.

    Returns:
        ``(ys, xs, counts)``: tile row starts, column starts and a (len(ys), len(xs)) int32 count array.
    """
    mask = np.ascontiguousarray(_as_bool(mask))
    height, width = mask.shape
    ys, xs = grid_positions(height, size, stride), grid_positions(width, size, stride)
    if mask.size == 0:
        return ys, xs, np.zeros((len(ys), len(xs)), dtype=np.int32)
    block = math.gcd(size, stride)
    if block < 8:  # e.g. co-prime size and stride: slabs would be single rows, sum each tile row directly
        return ys, xs, _direct_counts(mask.view(np.uint8), ys, xs, size)
    blocks = _col_block_sums(_row_block_sums(mask.view(np.uint8), block), block)
    span, step = size // block, stride // block
    counts = _window_sums(_window_sums(blocks, len(ys), step, span, 0), len(xs), step, span, 1)
    return ys, xs, counts


def _direct_counts(u8: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """Tile counts summing each tile row's ``size`` mask rows, then column windows by prefix sums."""
    width = u8.shape[1]
    rows = np.empty((len(ys), width), dtype=np.int32)
    for i, y in enumerate(ys.tolist()):
        rows[i] = _sum_rows_u8(u8[y : y + size])
    cumulative = np.zeros((len(ys), width + 1), dtype=np.int64)
    np.cumsum(rows, axis=1, out=cumulative[:, 1:])
    return (cumulative[:, np.minimum(xs + size, width)] - cumulative[:, xs]).astype(np.int32)


_tuple_new = tuple.__new__


def _make_boxes(xs: list[int], ys: list[int], ws: Any, hs: Any, counts: list[int]) -> list[PatchBox]:
    """PatchBoxes from columns of plain ints, built at C speed (no per-box Python call)."""
    return list(map(_tuple_new, repeat(PatchBox), zip(xs, ys, ws, hs, counts)))


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
        min_foreground: Minimum mask pixels in a tile (at least 1: empty tiles are never kept).
        min_fraction: Optional minimum fraction of the tile area covered by the mask.

    Returns:
        Qualifying tiles in row-major order.
    """
    stride = stride or size
    ys, xs, counts = grid_counts(mask, size, stride)
    threshold = max(min_foreground, 1)
    if min_fraction is not None:
        threshold = max(threshold, math.ceil(min_fraction * size * size))
    iy, ix = np.nonzero(counts >= threshold)
    return _make_boxes(xs[ix].tolist(), ys[iy].tolist(), repeat(size), repeat(size), counts[iy, ix].tolist())


def topk_boxes(mask: np.ndarray, size: int = 128, stride: int = 64, k: int = 12) -> list[PatchBox]:
    """The ``k`` grid tiles with the most mask pixels (ties: row-major order), best first; empty tiles never."""
    ys, xs, counts = grid_counts(mask, size, stride)
    flat = counts.ravel()
    if k <= 0 or flat.size == 0:
        return []
    if k < flat.size:
        # Only tiles at least as full as the k-th best can be chosen: sort those few, not all tiles.
        kth = np.partition(flat, flat.size - k)[flat.size - k]
        candidates = np.flatnonzero(flat >= max(kth, 1))
    else:
        candidates = np.flatnonzero(flat > 0)
    order = candidates[np.argsort(-flat[candidates], kind="stable")][:k]
    iy, ix = np.divmod(order, counts.shape[1])
    return _make_boxes(xs[ix].tolist(), ys[iy].tolist(), repeat(size), repeat(size), flat[order].tolist())


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


@dataclass
class PatchingConfig:
    """How patches are cut from an image; stored in the model config so that inference cuts the same.

    Each field's ``metadata["help"]`` is its documentation (also shown by ``--help`` of the recipes and of
    ``hf-histo build``, which expose every field under the same name).
    """

    strategy: str = field(
        default="grid",
        metadata={
            "help": "Patching: grid (tiles), components (mask components), topk (tiles with most mask) or "
            "whole (the whole image resized to one input)."
        },
    )
    patch_size: int = field(default=224, metadata={"help": "Tile side in source pixels (grid, topk)."})
    stride: int | None = field(
        default=None,
        metadata={"help": "Tile step in pixels (default: patch_size for grid, patch_size // 2 for topk)."},
    )
    min_foreground: int = field(default=200, metadata={"help": "Minimum mask pixels in a grid tile."})
    min_fraction: float | None = field(
        default=None, metadata={"help": "Optional minimum mask fraction of a grid tile, in (0, 1]."}
    )
    top_k: int = field(default=12, metadata={"help": "Tiles kept per image by the topk strategy."})
    min_area: int = field(default=200, metadata={"help": "Minimum mask component area (components strategy)."})
    pad: int = field(default=0, metadata={"help": "Pixels added around each component box (components strategy)."})
    paint_background: bool = field(
        default=False, metadata={"help": "Paint pixels outside the mask white before cropping patches."}
    )
    empty_fallback: str = field(
        default="tissue",
        metadata={"help": "What an empty mask becomes: tissue (detected tissue) or whole (the whole image)."},
    )
    stain_norm: str = field(
        default="none",
        metadata={
            "help": "Stain normalisation of each whole image before cutting, in training and inference alike: "
            "none or macenko (Macenko to a fixed H&E reference, with torchstain)."
        },
    )

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown patching strategy {self.strategy!r}; choose one of {list(STRATEGIES)}")
        if self.patch_size <= 0 or (self.stride is not None and self.stride <= 0):
            raise ValueError(f"patch_size and stride must be positive, got {self.patch_size}, {self.stride}")
        if self.empty_fallback not in EMPTY_FALLBACKS:
            raise ValueError(f"empty_fallback must be 'tissue' or 'whole', got {self.empty_fallback!r}")
        check_stain_norm(self.stain_norm)
        if self.min_fraction is not None and not 0.0 < self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in (0, 1] (or None), got {self.min_fraction}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if min(self.min_foreground, self.min_area, self.pad) < 0:
            raise ValueError(
                f"min_foreground, min_area and pad must be >= 0, got {self.min_foreground}, {self.min_area}, {self.pad}"
            )

    def select(self, mask: np.ndarray) -> list[PatchBox]:
        """The boxes of the strategy itself; may be empty (see ``boxes`` for the fallback)."""
        if self.strategy == "grid":
            return grid_boxes(mask, self.patch_size, self.stride, self.min_foreground, self.min_fraction)
        if self.strategy == "topk":
            return topk_boxes(mask, self.patch_size, self.topk_stride, self.top_k)
        if self.strategy == "components":
            return component_boxes(mask, self.min_area, self.pad)
        return whole_box(mask)

    @property
    def topk_stride(self) -> int:
        """Tile step of the topk strategy (and of the fallback tile): ``stride`` or half the patch size."""
        return self.stride or max(self.patch_size // 2, 1)

    def boxes_with_fallback(self, mask: np.ndarray) -> tuple[list[PatchBox], bool]:
        """Select boxes; when the strategy finds none, fall back to the single best ``patch_size`` tile.

        Every image with any mask pixel thus yields at least one patch (a grid that no tile passes, or
        components all under ``min_area``, would otherwise drop the image from training and inference).

        Returns:
            ``(boxes, fell_back)``.
        """
        boxes = self.select(mask)
        if boxes:
            return boxes, False
        return topk_boxes(mask, self.patch_size, self.topk_stride, 1), True

    def boxes(self, mask: np.ndarray) -> list[PatchBox]:
        """Select the patch boxes of one mask with this configuration (with the fallback tile, see above)."""
        return self.boxes_with_fallback(mask)[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored in model configs and dataset cache keys)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PatchingConfig:
        """Build from ``to_dict()`` output, ignoring unknown keys (newer versions may add some)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


def _clip(box: PatchBox, width: int, height: int) -> tuple[int, int, int, int]:
    """``x0, y0, x1, y1``: the part of ``box`` inside a ``width`` x ``height`` image."""
    x0, y0 = max(box.x, 0), max(box.y, 0)
    return x0, y0, max(min(box.x + box.w, width), x0), max(min(box.y + box.h, height), y0)


def _paint_and_pad(
    inside: np.ndarray, box: PatchBox, x0: int, y0: int, mask: np.ndarray | None, paint_background: bool
) -> np.ndarray:
    """A box's pixels from its part ``inside`` the image (top-left at x0, y0), white past the image edges.

    With ``paint_background``, pixels outside the mask are white too.
    """
    h, w = inside.shape[:2]
    if paint_background and mask is not None:
        inside = inside.copy()
        inside[~np.asarray(mask[y0 : y0 + h, x0 : x0 + w], dtype=bool)] = 255
    if (x0, y0, w, h) == (box.x, box.y, box.w, box.h):
        return inside
    canvas = np.full((box.h, box.w, 3), 255, dtype=np.uint8)
    canvas[y0 - box.y : y0 - box.y + h, x0 - box.x : x0 - box.x + w] = inside
    return canvas


def crop_array(
    image: np.ndarray, box: PatchBox, mask: np.ndarray | None = None, paint_background: bool = False
) -> np.ndarray:
    """`crop_patch` of an ``(H, W, 3)`` uint8 array: the ``(box.h, box.w, 3)`` crop, a view unless padded or painted."""
    x0, y0, x1, y1 = _clip(box, image.shape[1], image.shape[0])
    return _paint_and_pad(image[y0:y1, x0:x1], box, x0, y0, mask, paint_background)


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
    x0, y0, x1, y1 = _clip(box, image.width, image.height)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and (x1 - x0) * (y1 - y0) > limit:
        # PIL checks a crop's size against the decompression-bomb limit; this image is decoded already (under the
        # limit its caller chose), so a large crop (strategy "whole") is cut from the array instead.
        inside = np.asarray(image.convert("RGB"))[y0:y1, x0:x1]
    else:
        crop = image.crop((x0, y0, x1, y1))
        if (x0, y0, x1, y1) == (box.x, box.y, box.x + box.w, box.y + box.h) and not (
            paint_background and mask is not None
        ):
            return crop
        inside = np.asarray(crop.convert("RGB"))
    return Image.fromarray(_paint_and_pad(inside, box, x0, y0, mask, paint_background))
