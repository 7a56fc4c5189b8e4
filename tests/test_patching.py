"""Patch selection: vectorised strategies equal the per-tile loops, edge tiles, filters, crops."""

import numpy as np
import pytest
from PIL import Image
from reference_patching import reference_grid_boxes, reference_topk_boxes

from hf_histo.data.patching import (
    PATCHING_VERSION,
    PatchBox,
    PatchingConfig,
    component_boxes,
    crop_patch,
    grid_boxes,
    grid_counts,
    grid_positions,
    topk_boxes,
    whole_box,
)


def blob_mask(shape, seed, density=0.5):
    """Random blocky blobs: a coarse random grid upscaled, so tiles get every coverage from 0 to full."""
    rng = np.random.default_rng(seed)
    cell = int(rng.integers(3, 40))
    coarse = rng.random((shape[0] // cell + 1, shape[1] // cell + 1)) < density
    return np.kron(coarse, np.ones((cell, cell), dtype=bool))[: shape[0], : shape[1]]


@pytest.mark.parametrize("seed", range(40))
def test_grid_and_topk_equal_the_per_tile_loops(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 400, 2))
    mask = blob_mask(shape, seed, density=float(rng.random()))
    size = int(rng.integers(1, 260))
    stride = int(rng.choice([size, max(size // 2, 1), int(rng.integers(1, 300))]))
    min_foreground = int(rng.integers(0, 300))
    assert grid_boxes(mask, size, stride, min_foreground) == reference_grid_boxes(mask, size, stride, min_foreground)
    k = int(rng.integers(1, 30))
    assert topk_boxes(mask, size, stride, k) == reference_topk_boxes(mask, size, stride, k)


# Covers the three counting paths: few-block windows (span <= 16), long windows over blocks (200/8) and
# per-tile-row sums when gcd(size, stride) < 8 (50/7, 224/225).
@pytest.mark.parametrize(
    "size,stride", [(224, 224), (128, 64), (64, 32), (300, 200), (512, 512), (96, 16), (200, 8), (50, 7), (224, 225)]
)
def test_large_mask_configs_match_loop(size, stride):
    mask = blob_mask((1031, 777), 3)
    assert grid_boxes(mask, size, stride) == reference_grid_boxes(mask, size, stride)


def test_boxes_are_plain_patchboxes_with_python_ints():
    boxes = grid_boxes(np.ones((100, 100), bool), 50, min_foreground=1)
    assert all(type(b) is PatchBox and all(type(v) is int for v in b) for b in boxes)
    assert boxes[0].fraction == 1.0


def test_counts_accept_non_bool_and_non_contiguous_masks():
    mask = blob_mask((300, 200), 5)
    as_u8 = (mask * 255).astype(np.uint8)
    assert np.array_equal(grid_counts(as_u8, 64, 32)[2], grid_counts(mask, 64, 32)[2])
    transposed = mask.T  # a non-contiguous view
    assert grid_boxes(transposed, 50, 25, 10) == reference_grid_boxes(np.ascontiguousarray(transposed), 50, 25, 10)


def test_edge_tiles_are_kept_and_positions_stay_inside():
    mask = np.zeros((250, 250), bool)
    mask[240:, 240:] = True  # only the bottom-right corner: 100 pixels in the last, partial tile
    boxes = grid_boxes(mask, 224, min_foreground=100)
    assert boxes == [PatchBox(224, 224, 224, 224, 100)]
    assert grid_positions(250, 224, 224).tolist() == [0, 224]
    assert grid_positions(100, 224, 224).tolist() == [0]  # image smaller than a tile: one padded tile
    assert grid_positions(10, 1, 20).tolist() == [0]  # stride > size never starts outside the image


def test_min_foreground_and_min_fraction():
    mask = np.zeros((100, 200), bool)
    mask[:, :60] = True  # tile 0: 6000 px (60%), tile 1: 0
    mask[:10, 100:] = True  # tile 1: 1000 px (10%)
    assert [b.x for b in grid_boxes(mask, 100, min_foreground=1)] == [0, 100]
    assert [b.x for b in grid_boxes(mask, 100, min_foreground=1001)] == [0]
    assert [b.x for b in grid_boxes(mask, 100, min_foreground=1, min_fraction=0.5)] == [0]
    assert grid_boxes(mask, 100, min_foreground=0) == grid_boxes(mask, 100, min_foreground=1)  # empty tiles never


def test_topk_order_ties_and_empty():
    mask = np.zeros((128, 256), bool)
    mask[:64, :64] = True  # tile (0,0) full
    mask[64:, 192:] = True  # tile (64, 192) full: tie, later in row-major order
    mask[:10, 128:138] = True
    boxes = topk_boxes(mask, 64, 64, k=3)
    assert [(b.x, b.y, b.foreground) for b in boxes] == [(0, 0, 4096), (192, 64, 4096), (128, 0, 100)]
    assert topk_boxes(np.zeros((64, 64), bool), 32, 16, 5) == []
    assert len(topk_boxes(mask, 64, 64, k=100)) == 3  # empty tiles are not padding


def test_component_boxes_min_area_and_pad():
    mask = np.zeros((100, 100), bool)
    mask[10:30, 10:30] = True  # 400 px
    mask[50:55, 50:55] = True  # 25 px: dropped at min_area=200
    mask[30, 30] = True  # diagonal neighbour: joins the first component (8-connectivity)
    boxes = component_boxes(mask, min_area=200)
    assert boxes == [PatchBox(10, 10, 21, 21, 401)]
    assert len(component_boxes(mask, min_area=1)) == 2
    padded = component_boxes(mask, min_area=200, pad=15)
    assert padded == [PatchBox(0, 0, 46, 46, 401)]  # clipped at the image edge
    assert component_boxes(np.zeros((5, 5), bool)) == []


def test_whole_box():
    mask = np.zeros((30, 40), bool)
    mask[0, :5] = True
    assert whole_box(mask) == [PatchBox(0, 0, 40, 30, 5)]


def test_crop_pads_white_and_paints_background():
    image = Image.fromarray(np.full((50, 60, 3), 10, np.uint8))
    patch = crop_patch(image, PatchBox(40, 30, 32, 32, 0))
    arr = np.asarray(patch)
    assert patch.size == (32, 32)
    assert (arr[:20, :20] == 10).all() and (arr[20:, :] == 255).all() and (arr[:, 20:] == 255).all()
    mask = np.zeros((50, 60), bool)
    mask[:, :30] = True
    painted = np.asarray(crop_patch(image, PatchBox(20, 0, 20, 10, 0), mask, paint_background=True))
    assert (painted[:, :10] == 10).all() and (painted[:, 10:] == 255).all()
    unpainted = np.asarray(crop_patch(image, PatchBox(20, 0, 20, 10, 0), mask))
    assert (unpainted == 10).all()  # painting is off by default


def test_config_fallback_dict_roundtrip_and_validation():
    mask = np.zeros((300, 300), bool)
    mask[:5, :5] = True  # 25 px: no grid tile reaches 200, no component reaches min_area
    grid = PatchingConfig(strategy="grid", patch_size=128)
    assert grid.select(mask) == []
    boxes, fell_back = grid.boxes_with_fallback(mask)
    assert fell_back and boxes == [PatchBox(0, 0, 128, 128, 25)]
    assert PatchingConfig(strategy="components").boxes_with_fallback(mask) == ([PatchBox(0, 0, 224, 224, 25)], True)
    assert PatchingConfig(strategy="components", min_area=20).boxes_with_fallback(mask) == (
        [PatchBox(0, 0, 5, 5, 25)],
        False,
    )
    assert PatchingConfig.from_dict({**grid.to_dict(), "future_key": 1}) == grid
    assert PatchingConfig(strategy="topk", patch_size=100).topk_stride == 50
    assert PATCHING_VERSION


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strategy": "random"}, "unknown patching strategy 'random'"),
        ({"patch_size": 0}, "patch_size and stride must be positive"),
        ({"stride": -1}, "patch_size and stride must be positive"),
        ({"empty_fallback": "black"}, "empty_fallback must be 'tissue' or 'whole'"),
        ({"min_fraction": 0.0}, r"min_fraction must be in \(0, 1\]"),
        ({"min_fraction": 1.5}, r"min_fraction must be in \(0, 1\]"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"pad": -2}, "min_foreground, min_area and pad must be >= 0"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PatchingConfig(**kwargs)
