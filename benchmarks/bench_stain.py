"""Benchmark Macenko stain normalisation: seconds and peak memory per image size, against decoding the image.

    python benchmarks/bench_stain.py --sizes 1024 2048 4096 8192

Images are H&E-like tiles of a GlaS image when ../shared/data is there (generated H&E texture otherwise), tiled to
each size and saved as PNG. The limit of the work is decoding the image (`Image.open(...).convert("RGB")`, which
every path does first): the table prints normalisation time / decode time. Memory is numpy's traced peak
(`tracemalloc`) in bytes per pixel, for the banded path (`normalize_stain`, images over
`MACENKO_ONE_PIECE_PIXELS`) and for torchstain's one-piece normalisation (up to `--one_piece_max` pixels).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_stain import LAB_B, he_image  # noqa: E402

from hf_histo.data import stain  # noqa: E402

GLAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "glas_train" / "images"


def base_tile() -> np.ndarray:
    """A GlaS image when the shared data is there, else a generated H&E texture."""
    images = sorted(GLAS.glob("*.png")) if GLAS.is_dir() else []
    return np.asarray(Image.open(images[0]).convert("RGB")) if images else he_image(LAB_B, size=512)


def decode_rgb(path: Path) -> Image.Image:
    """The image at `path` decoded to RGB: the work every path does before normalising."""
    return Image.open(path).convert("RGB")


def traced(fn, *args) -> tuple[float, int, object]:
    """(seconds, peak traced bytes, result) of `fn(*args)`."""
    tracemalloc.start()
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096, 8192], help="image sides")
    parser.add_argument("--one_piece_max", type=int, default=4096**2, help="largest image run in one piece")
    args = parser.parse_args()
    tile = base_tile()
    print(f"one piece up to {stain.MACENKO_ONE_PIECE_PIXELS:,} pixels; bands above (subsampled estimate)")
    print(f"{'side':>6} {'decode s':>9} {'norm s':>8} {'norm/decode':>12} {'norm B/px':>12} {'one-piece B/px':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sizes:
            reps = (side // tile.shape[0] + 1, side // tile.shape[1] + 1, 1)
            path = Path(tmp) / f"{side}.png"
            Image.fromarray(np.tile(tile, reps)[:side, :side]).save(path)
            decode, _, image = traced(decode_rgb, path)
            seconds, peak, _ = traced(stain.normalize_stain, image, "macenko")
            one_piece = "-"
            if side * side <= args.one_piece_max:
                limit, stain.MACENKO_ONE_PIECE_PIXELS = stain.MACENKO_ONE_PIECE_PIXELS, side * side
                one_piece = f"{traced(stain.normalize_stain, image, 'macenko')[1] / side**2:.1f}"
                stain.MACENKO_ONE_PIECE_PIXELS = limit
            print(
                f"{side:>6} {decode:>9.2f} {seconds:>8.2f} {seconds / decode:>12.1f} {peak / side**2:>12.1f} "
                f"{one_piece:>15}"
            )


if __name__ == "__main__":
    main()
