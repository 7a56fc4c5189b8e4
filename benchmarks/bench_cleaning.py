"""Benchmark `hf-histo clean`: images/s and peak memory on N generated 1000x1000 images with masks.

    python benchmarks/bench_cleaning.py --n 1000 --size 1000 --workers 2

Images are H&E-like textures (5% exact duplicates, 5% cartoon twins sharing a mask, 5% pasted blobs) written
as PNG to a temporary folder; only the cleaning is timed. Peak memory is the largest resident set of this
process and of any worker process.
"""

from __future__ import annotations

import argparse
import csv
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contamination import DEV_PARAMS, make_cartoon, paste_blobs, synthetic_tissue  # noqa: E402

from hf_histo.data.cleaning import CleaningConfig, clean_dataset  # noqa: E402


def make_dataset(root: Path, n: int, size: int, seed: int = 0) -> None:
    """Write ``n`` images (table layout) of ``size`` x ``size`` with one elliptic mask each."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    noise = rng.normal(0, 7, (size, size, 3)).astype(np.float32)
    rows = []
    n_orig = int(n * 0.85)
    for i in range(n):
        name = f"img_{i:05d}.png"
        if i < n_orig:
            base = synthetic_tissue((size // 4, size // 4), rng).resize((size, size), Image.BICUBIC)
            arr = np.asarray(base, np.float32) + np.roll(noise, tuple(rng.integers(0, size, 2)), axis=(0, 1))
            image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
            mask = Image.new("L", (size, size), 0)
            x, y, r = *rng.integers(size // 4, 3 * size // 4, 2), int(rng.integers(size // 10, size // 4))
            ImageDraw.Draw(mask).ellipse([x - r, y - r, x + r, y + r], fill=255)
        else:  # contaminated copies of an earlier image
            src = f"img_{int(rng.integers(n_orig)):05d}.png"
            image = Image.open(root / "images" / src).convert("RGB")
            mask = Image.open(root / "masks" / src)
            kind = (i - n_orig) % 3
            if kind == 1:
                image = Image.blend(image, make_cartoon(image.size, rng, DEV_PARAMS), float(rng.uniform(0.5, 0.7)))
            elif kind == 2:
                image, _ = paste_blobs(image, rng, DEV_PARAMS)
        image.save(root / "images" / name, compress_level=1)
        mask.save(root / "masks" / name)
        rows.append((name, "ab"[i % 2], f"p{i % 50}"))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filename", "label", "patient_id"), *rows])


def peak_rss_mib() -> tuple[float, float]:
    """Peak resident memory (MiB) of this process and of the largest child process (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of images")
    parser.add_argument("--size", type=int, default=1000, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=2, help="feature worker processes (0: in-process)")
    parser.add_argument("--data", type=Path, default=None, help="reuse/keep the generated data in this folder")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_cleaning_"))
    data = args.data or tmp / "data"
    try:
        if not (data / "labels.csv").is_file():
            t0 = time.perf_counter()
            make_dataset(data, args.n, args.size)
            print(f"generated {args.n} images of {args.size}x{args.size} in {time.perf_counter() - t0:.1f} s")
        base_rss = peak_rss_mib()[0]
        t0 = time.perf_counter()
        result = clean_dataset(data, tmp / "out", config=CleaningConfig(num_workers=args.workers), progress=False)
        elapsed = time.perf_counter() - t0
        own, child = peak_rss_mib()
        counts = {r: len(f) for r, f in result.by_reason().items() if f}
        print(
            f"cleaned {args.n} images in {elapsed:.1f} s: {args.n / elapsed:.1f} images/s with {args.workers} workers"
        )
        workers = f", largest worker {child:.0f} MiB (shares the parent's pages)" if args.workers > 1 else ""
        print(f"peak RSS: main process {own:.0f} MiB (after imports, before cleaning: {base_rss:.0f} MiB){workers}")
        print(f"flagged: {len(result.flags)} {counts}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
