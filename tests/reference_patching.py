"""Plain per-tile loops equal to the vectorised grid/topk selection: the oracle of tests and benchmarks (slow)."""

from __future__ import annotations

import numpy as np

from hf_histo.data.patching import PatchBox, grid_positions


def reference_grid_boxes(
    mask: np.ndarray, size: int, stride: int | None = None, min_foreground: int = 200
) -> list[PatchBox]:
    """What ``grid_boxes`` returns, counted with ``mask[y:y+size, x:x+size].sum()`` tile by tile."""
    mask = np.asarray(mask) > 0
    stride = stride or size
    boxes = []
    for y in grid_positions(mask.shape[0], size, stride):
        for x in grid_positions(mask.shape[1], size, stride):
            count = int(mask[y : y + size, x : x + size].sum())
            if count >= max(min_foreground, 1):
                boxes.append(PatchBox(int(x), int(y), size, size, count))
    return boxes


def reference_topk_boxes(mask: np.ndarray, size: int = 128, stride: int = 64, k: int = 12) -> list[PatchBox]:
    """What ``topk_boxes`` returns: the ``k`` fullest non-empty tiles, best first, ties in row-major order."""
    tiles = reference_grid_boxes(mask, size, stride, min_foreground=1)
    return sorted(tiles, key=lambda box: -box.foreground)[: max(k, 0)]
