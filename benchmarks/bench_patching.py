"""Patch selection speed vs per-tile loops, and the patch dataset build time vs plain image I/O.

Run: `python benchmarks/bench_patching.py [--size 4096] [--data ../shared/data/glas_train] [--strategy grid]`

1. Selection on a `--size`^2 random-blob mask: `grid_boxes` / `topk_boxes` (vectorised) against the plain per-tile
   loops `reference_grid_boxes` / `reference_topk_boxes` of `tests/reference_patching.py` (`mask[y:y+s, x:x+s].sum()`
   per tile) in the same run, timed in back-to-back pairs, checking that both return the same tiles. Also shown: a
   tighter loop using `np.count_nonzero` per tile (no box objects), the fastest plain-numpy loop we know.
2. Building the patch dataset of `--data` in a fresh cache, next to the time of just decoding its images and
   masks and PNG-encoding the same patches (no selection, no Arrow), and the selection time alone.
3. Loading the same dataset again (the Arrow cache).
4. Patches per image (min/median/max) per strategy on `--data` and every folder in `--also`.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The per-tile reference loops are the tests' oracle; they live with the tests, not in the library.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from reference_patching import reference_grid_boxes, reference_topk_boxes  # noqa: E402

from hf_histo.data.builder import build_patch_dataset  # noqa: E402
from hf_histo.data.images import load_image  # noqa: E402
from hf_histo.data.masks import load_mask  # noqa: E402
from hf_histo.data.patch_storage import encode_patch  # noqa: E402
from hf_histo.data.patching import PatchingConfig, crop_patch, grid_boxes, grid_positions, topk_boxes  # noqa: E402
from hf_histo.data.sources import read_samples  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# (name, function, reference loop, size, stride, extra args)
CONFIGS = [
    ("grid 224/224", grid_boxes, reference_grid_boxes, 224, 224, {}),
    ("grid 128/64", grid_boxes, reference_grid_boxes, 128, 64, {}),
    ("grid 64/32", grid_boxes, reference_grid_boxes, 64, 32, {}),
    ("topk 128/64 k=12", topk_boxes, reference_topk_boxes, 128, 64, {"k": 12}),
    ("topk 64/32 k=12", topk_boxes, reference_topk_boxes, 64, 32, {"k": 12}),
]


def blob_mask(size: int, seed: int = 0) -> np.ndarray:
    """Random smooth blobs covering about 40% of a size x size mask (tissue-like regions of all sizes)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = rng.random((size // 32, size // 32)).astype(np.float32)
    smooth = ndimage.zoom(ndimage.gaussian_filter(coarse, 1.5), 32, order=1)[:size, :size]
    return smooth > np.quantile(smooth, 0.6)


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def count_nonzero_loop(mask: np.ndarray, size: int, stride: int) -> int:
    """A tighter per-tile loop (count_nonzero, no box objects): how fast a loop can get in numpy."""
    kept = 0
    for y in grid_positions(mask.shape[0], size, stride):
        for x in grid_positions(mask.shape[1], size, stride):
            kept += np.count_nonzero(mask[y : y + size, x : x + size]) >= 200
    return kept


def paired_times(fast, slow, repeat: int) -> tuple[float, float, float]:
    """Best times of ``fast`` and ``slow`` and the median of their ratios, timed back to back.

    Pairing the two in each round makes the ratio fair on a busy machine: both see the same load.
    """
    ratios, best_fast, best_slow = [], float("inf"), float("inf")
    for _ in range(repeat):
        fast_t = best_time(fast, 3)[0]
        slow_t = best_time(slow, 1)[0]
        ratios.append(slow_t / fast_t)
        best_fast, best_slow = min(best_fast, fast_t), min(best_slow, slow_t)
    return best_fast, best_slow, statistics.median(ratios)


def bench_selection(size: int, repeat: int) -> None:
    mask = blob_mask(size)
    print(f"\n1. Selection on a {size}x{size} mask ({mask.mean():.0%} foreground), {repeat} paired rounds")
    print(
        f"{'config':<18} {'tiles':>6} {'vectorised':>11} {'per-tile loop':>14} {'speed-up':>9}   same"
        "  count_nonzero loop (speed-up)"
    )
    for name, fn, reference, tile, stride, extra in CONFIGS:
        fast, slow = fn(mask, tile, stride, **extra), reference(mask, tile, stride, **extra)
        if fast != slow:
            raise SystemExit(f"{name}: vectorised and loop tiles differ")
        fast_t, loop_t, ratio = paired_times(
            lambda: fn(mask, tile, stride, **extra),  # noqa: B023
            lambda: reference(mask, tile, stride, **extra),  # noqa: B023
            repeat,
        )
        _, cnz_t, cnz_ratio = paired_times(
            lambda: fn(mask, tile, stride, **extra),  # noqa: B023
            lambda: count_nonzero_loop(mask, tile, stride),  # noqa: B023
            max(3, repeat // 2),
        )
        print(
            f"{name:<18} {len(fast):>6} {fast_t * 1e3:>9.2f}ms {loop_t * 1e3:>12.1f}ms {ratio:>8.1f}x"
            f"   {str(fast == slow):<5} {cnz_t * 1e3:.1f}ms ({cnz_ratio:.1f}x)"
        )
    floor_t, _ = best_time(lambda: np.count_nonzero(mask), 3 * repeat)
    print("(times: best of the rounds; speed-up: median of the per-round ratios)")
    print(
        f"floor: one np.count_nonzero(mask) over the whole mask takes {floor_t * 1e3:.2f}ms; exact selection must read"
        " every pixel once, so with stride == size the loop has little to lose and the speed-up is bounded by memory."
    )


def bench_build(data: Path, strategy: str, patch_size: int) -> None:
    samples = read_samples(data).samples
    config = PatchingConfig(strategy=strategy, patch_size=patch_size)
    print(f"\n2. {data.name}: {len(samples)} images, strategy {strategy}, patch {patch_size}")
    # Decode + encode only: the I/O a build cannot avoid (the boxes are chosen beforehand, untimed).
    plans = []
    for s in samples:
        image = load_image(s.image_path)
        plans.append(config.boxes(load_mask(s.mask_path, image.size)))
    start = time.perf_counter()
    n_patches = 0
    for s, boxes in zip(samples, plans):
        image = load_image(s.image_path)
        load_mask(s.mask_path, image.size)
        for box in boxes:
            encode_patch(crop_patch(image, box), "png")
            n_patches += 1
    io_t = time.perf_counter() - start
    masks = [load_mask(s.mask_path) for s in samples]
    select_t, _ = best_time(lambda: [config.boxes(m) for m in masks], 3)
    with tempfile.TemporaryDirectory() as cache:
        _, report = build_patch_dataset(data, config, cache_dir=cache)
        _, cached = build_patch_dataset(data, config, cache_dir=cache)
    print(f"  build (fresh cache)              {report.seconds:7.2f}s  ({sum(report.n_patches.values())} patches)")
    print(
        f"  decode images+masks, encode PNG  {io_t:7.2f}s  ({n_patches} patches): build / I/O = {report.seconds / io_t:.2f}"
    )
    print(f"  selection alone (all masks)      {select_t:7.3f}s  ({select_t / io_t:.1%} of the I/O)")
    print(
        f"3. cached load                      {cached.seconds:7.3f}s  ({report.seconds / cached.seconds:.0f}x faster)"
    )


def patches_per_image(folders: list[Path], patch_size: int) -> None:
    print(f"\n4. Patches per image (min/median/max), patch {patch_size}, defaults otherwise")
    strategies = ("grid", "components", "topk", "whole")
    print(f"{'data':<12}" + "".join(f"{s:>18}" for s in strategies))
    for folder in folders:
        samples = read_samples(folder).samples
        counts = {s: [] for s in strategies}
        for sample in samples:
            with Image.open(sample.image_path) as im:
                size = im.size
            mask = load_mask(sample.mask_path, size)
            for s in strategies:
                counts[s].append(len(PatchingConfig(strategy=s, patch_size=patch_size).boxes(mask)))
        cells = [f"{min(c)}/{statistics.median(c):g}/{max(c)}" for c in counts.values()]
        print(f"{folder.name:<12}" + "".join(f"{c:>18}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="side of the synthetic mask")
    parser.add_argument("--repeat", type=int, default=15, help="paired timing rounds")
    parser.add_argument("--data", type=Path, default=SHARED / "glas_train", help="data folder to build")
    parser.add_argument("--also", type=Path, nargs="*", default=[SHARED / "monuseg"], help="more folders for 4.")
    parser.add_argument("--strategy", default="grid")
    parser.add_argument("--patch_size", type=int, default=224)
    args = parser.parse_args()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()
    import sklearn.model_selection  # noqa: F401  (imported once per process: not part of a build's cost)

    bench_selection(args.size, args.repeat)
    if not args.data.is_dir():
        print(f"\n{args.data} not found: skipping the build benchmark")
        return
    bench_build(args.data, args.strategy, args.patch_size)
    patches_per_image([args.data] + [f for f in args.also if f.is_dir()], args.patch_size)


if __name__ == "__main__":
    main()
