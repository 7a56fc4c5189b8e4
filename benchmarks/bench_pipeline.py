"""Patches per second: the histo pipeline on a whole image vs the standard image-classification pipeline per patch.

Run: `python benchmarks/bench_pipeline.py [--patches 64] [--repeats 3] [--device cpu]`

Builds a tiny ViT classifier (hidden 32, 2 layers, 32 px input), saves it Hub-ready in a temporary folder, makes one
image that yields `--patches` grid patches, and times
- baseline: `pipeline("image-classification", model=DIR)` called once per patch (a PIL crop),
- ours: one `pipeline("histo-image-classification")` call on the whole image (patching, batching, aggregation).
Prints patches/s of both and the ratio (the issue asks for >= 5x on CPU).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import ViTImageProcessor  # noqa: E402
from transformers import pipeline as hf_pipeline  # noqa: E402

from hf_histo.data.patching import PatchBox, PatchingConfig, crop_patch  # noqa: E402
from hf_histo.hub import save_for_hub  # noqa: E402
from hf_histo.inference.loading import load_pipeline  # noqa: E402
from hf_histo.models import (  # noqa: E402
    HistoClassifierConfig,
    HistoClassifierForImageClassification,
    tiny_backbone_config,
)

PATCH = 32


def build_model(folder: str) -> None:
    """Save a tiny, randomly initialised ViT classifier with its processor to `folder`."""
    torch.manual_seed(0)
    labels = {0: "HER2(+)", 1: "Luminal A", 2: "Luminal B", 3: "Triple negative"}
    patching = PatchingConfig(strategy="grid", patch_size=PATCH, min_foreground=1)
    config = HistoClassifierConfig(
        backbone_config=tiny_backbone_config("vit"),
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        patching=patching.to_dict(),
    )
    model = HistoClassifierForImageClassification(config).eval()
    processor = ViTImageProcessor(size={"height": PATCH, "width": PATCH})
    save_for_hub(model, folder, image_processor=processor)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=64, help="grid patches in the test image (a square number)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument("--batch_size", type=int, default=32, help="patches per forward pass of our pipeline")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    side = int(math.isqrt(args.patches)) * PATCH
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    mask = np.ones((side, side), dtype=bool)

    with tempfile.TemporaryDirectory() as folder:
        build_model(folder)
        ours = load_pipeline(folder, device=args.device, batch_size=args.batch_size)
        baseline = hf_pipeline("image-classification", model=folder, device=args.device)
        boxes = PatchingConfig.from_dict(ours.model.config.patching).boxes(mask)
        from PIL import Image

        pil = Image.fromarray(image)
        crops = [crop_patch(pil, PatchBox(*b)) for b in boxes]
        n = len(crops)

        result = ours(image, mask=mask, return_patches=True)
        assert len(result["patches"]) == n, (len(result["patches"]), n)
        t_ours = best_time(lambda: ours(image, mask=mask), args.repeats)
        t_base = best_time(lambda: [baseline(crop) for crop in crops], args.repeats)

    ours_rate, base_rate = n / t_ours, n / t_base
    print(
        f"image {side}x{side}, {n} patches of {PATCH}px, tiny ViT (hidden 32), device {args.device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"baseline  pipeline('image-classification') per patch : {base_rate:9.1f} patches/s")
    print(f"ours      pipeline('histo-image-classification')     : {ours_rate:9.1f} patches/s")
    print(f"speed-up  {ours_rate / base_rate:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
