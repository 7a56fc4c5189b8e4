"""ROI segmentation on grouped CV (architectures side by side), then the classifier with true, predicted and no masks.

Run: `python benchmarks/bench_roi.py [DATA] [--out runs/bench_roi] [--architectures unet segformer] [--seed 0]
[--classifier CV_ROOT]`.

1. For each architecture, `recipes/roi_segmentation.py --n_folds 5 --fold k` runs through its real entry point (a
   subprocess, as a user launches it): patient-grouped folds, each scored on its held-out whole images by the
   sliding-window inference. Prints per-fold ROI Dice without and with hole filling (the default for binary
   masks), mean IoU (background excluded), pixel accuracy and the training wall time, then mean ± std, and the
   paired difference between architectures (`--compare_folds N`: the others on the first N folds only).
2. The classifier (`resnet_scratch.py` defaults, patient-grouped CV on the *same* folds: the benchmark checks the
   held-out image lists agree) is trained on the true masks (or taken from `--classifier`, a CV root of the same
   data and seed), and each fold model is scored on its held-out images three times through the inference engine:
   with the true masks, with the masks the same fold's segmentation model predicts (it never saw those images),
   and with tissue detection (no mask). Prints image macro-F1 and balanced accuracy per fold, mean ± std.

Resumable: finished folds are kept. On 2 CPU cores one U-Net fold takes ~13 min, one classifier fold ~4 min.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
from scipy.ndimage import binary_fill_holes  # noqa: E402

from hf_histo.data.sources import read_samples  # noqa: E402
from hf_histo.inference.evaluate import evaluate_samples  # noqa: E402
from hf_histo.inference.loading import load_engine  # noqa: E402
from hf_histo.inference.roi import RoiSegmenter  # noqa: E402
from hf_histo.inference.segmentation_metrics import confusion, segmentation_scores  # noqa: E402
from hf_histo.training.segmentation_data import SegmentationArguments, load_pair  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
SOURCES = ("true mask", "predicted mask", "tissue detection")


def run_recipe(name: str, **flags: object) -> None:
    """Launch ``recipes/NAME.py`` with ``--key=value`` flags, as a user does (its training log is not shown)."""
    command = [sys.executable, str(ROOT / "recipes" / f"{name}.py"), *(f"--{k}={v}" for k, v in flags.items())]
    subprocess.run([*command, "--disable_tqdm=true"], check=True, stdout=subprocess.DEVNULL)


def run_segmentation(data: Path, out: Path, architecture: str, seed: int, n_folds: int, folds: list[int]) -> list:
    """Run (or finish) the recipe's grouped CV folds for one architecture; each fold's metrics record."""
    for k in folds:
        if not (out / f"fold_{k}" / "metrics.json").is_file():
            run_recipe(
                "roi_segmentation",
                data_dir=data,
                output_dir=out,
                n_folds=n_folds,
                fold=k,
                seed=seed,
                architecture=architecture,
            )
    return [json.loads((out / f"fold_{k}" / "metrics.json").read_text()) for k in folds]


def rescore(data: Path, out: Path, records: list, folds: list[int]) -> list[dict[str, float]]:
    """ROI Dice of each fold model on its held-out images without and with hole filling (pixels pooled)."""
    samples = {s.image_id: s for s in read_samples(data).samples}
    args = SegmentationArguments(data_dir=str(data))
    scores = []
    for k, record in zip(folds, records):
        matrices = {fill: np.zeros((2, 2), dtype=np.int64) for fill in (False, True)}
        segmenter = RoiSegmenter.from_pretrained(out / f"fold_{k}")
        for image_id in record["validation_images"]:
            image, target = load_pair(samples[image_id], args)
            logits = segmenter.logits(image)  # one forward pass; raw and filled differ only in the filling
            raw = logits.argmax(0).numpy().astype(np.uint8)
            filled = binary_fill_holes(raw > 0).astype(np.uint8)
            matrices[False] += confusion(target, raw, 2)
            matrices[True] += confusion(target, filled, 2)
        labels = ["background", "roi"]
        scores.append({fill: segmentation_scores(m, labels)["mean_dice"] for fill, m in matrices.items()})
    return scores


def run_classifier(data: Path, out: Path, seed: int, n_folds: int) -> Path:
    """The default classifier's grouped CV (the recipe's real entry point); its CV root."""
    if all((out / f"fold_{k}" / "metrics.json").is_file() for k in range(n_folds)):
        return out
    run_recipe(
        "resnet_scratch", data_dir=data, output_dir=out, n_folds=n_folds, seed=seed, overwrite_output_dir="true"
    )
    return out


def print_segmentation(name: str, records: list, rescored: list, folds: list[int]) -> dict[str, np.ndarray]:
    """Per-fold and mean ± std segmentation scores of one architecture; the per-fold Dice arrays."""
    print(f"\n=== segmentation: {name} ===")
    print(f"{'fold':>4} | {'Dice':>6} {'filled':>6} {'mIoU':>6} {'pix acc':>7} | {'train s':>7} {'images':>6}")
    for k, record, dice in zip(folds, records, rescored):
        v = record["validation"]
        print(
            f"{k:>4} | {dice[False]:6.3f} {dice[True]:6.3f} {v['mean_iou']:6.3f} {v['pixel_accuracy']:7.3f} | "
            f"{record['train_seconds']:7.0f} {record['n_validation_images']:>6}"
        )
    raw = np.array([d[False] for d in rescored])
    filled = np.array([d[True] for d in rescored])
    walls = [r["train_seconds"] for r in records]
    print(
        f"mean | ROI Dice {raw.mean():.3f} ± {raw.std(ddof=1):.3f}, holes filled {filled.mean():.3f} ± "
        f"{filled.std(ddof=1):.3f}  (one training: median {np.median(walls) / 60:.1f} min)"
    )
    return {"raw": raw, "filled": filled}


def score_classifier(
    data: Path, classifier: Path, segmentation: Path, n_folds: int, min_fraction: float | None = None
) -> dict[str, list]:
    """Each classifier fold on its held-out images with true, predicted and no masks: per-fold results.

    ``min_fraction`` keeps only the tiles at least that share ROI (a patching override at inference): with the
    recipe's own grid (tiles with >= 200 ROI pixels) every GlaS tile touches a gland, so the mask source cannot
    change the patches there.
    """
    samples = read_samples(data).samples
    scored: dict[str, list] = {source: [] for source in SOURCES}
    for k in range(n_folds):
        held_out = set(json.loads((classifier / f"fold_{k}" / "splits.json").read_text())["validation"])
        seg_fold = segmentation / f"fold_{k}"
        seg_held_out = set(json.loads((seg_fold / "metrics.json").read_text())["validation_images"])
        if held_out != seg_held_out:
            raise SystemExit(f"fold {k}: the classifier and segmentation folds differ; use the same data and seed")
        with_masks = [s for s in samples if s.image_id in held_out]
        without = [dataclasses.replace(s, mask_path=None) for s in with_masks]
        engine = load_engine(classifier / f"fold_{k}", aggregation="soft", calibrate=False)
        if min_fraction is not None:
            engine.patching = dataclasses.replace(engine.patching, min_fraction=min_fraction)
        scored["true mask"].append(evaluate_samples(engine, with_masks, n_bootstrap=1))
        scored["tissue detection"].append(evaluate_samples(engine, without, n_bootstrap=1))
        engine.roi = RoiSegmenter.from_pretrained(seg_fold, device=engine.device, fill_holes=True)
        scored["predicted mask"].append(evaluate_samples(engine, without, n_bootstrap=1))
    return scored


def print_classifier(scored: dict[str, list], title: str) -> None:
    """Image macro-F1 and balanced accuracy per fold and mean ± std, per mask source."""
    print(f"\n=== classifier (resnet_scratch defaults) on held-out folds, image level: {title} ===")
    print(f"{'fold':>4} | " + " | ".join(f"{s:>16}" for s in SOURCES) + "   (macro-F1 / balanced accuracy)")
    n = len(scored[SOURCES[0]])
    for k in range(n):
        cells = [
            f"{scored[s][k].metrics['macro_f1']:.3f} / {scored[s][k].metrics['balanced_accuracy']:.3f}"
            for s in SOURCES
        ]
        print(f"{k:>4} | " + " | ".join(f"{c:>16}" for c in cells))
    for metric in ("macro_f1", "balanced_accuracy"):
        cells = []
        for s in SOURCES:
            values = np.array([r.metrics[metric] for r in scored[s]])
            cells.append(f"{values.mean():.3f} ± {values.std(ddof=1):.3f}")
        print(f"{metric:>17}: " + "   ".join(f"{s} {c}" for s, c in zip(SOURCES, cells)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(SHARED / "glas_train"))
    parser.add_argument("--out", default="runs/bench_roi")
    parser.add_argument("--architectures", nargs="+", default=["unet", "segformer"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_folds", type=int, default=5)
    parser.add_argument(
        "--compare_folds",
        type=int,
        default=None,
        help="Run the architectures after the first on the first N folds only.",
    )
    parser.add_argument("--classifier", default=None, help="An existing classifier CV root (same data and seed).")
    parser.add_argument("--skip_classifier", action="store_true")
    parser.add_argument(
        "--min_fractions", nargs="*", type=float, default=[0.5], help="Also score with tiles at least this share ROI."
    )
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    if not data.exists():
        raise SystemExit(f"{data}: not found (the real data lives in ../shared/data)")
    dice = {}
    for i, architecture in enumerate(args.architectures):
        folds = list(range(args.n_folds if i == 0 or not args.compare_folds else args.compare_folds))
        seg_out = out / f"seg_{architecture}"
        records = run_segmentation(data, seg_out, architecture, args.seed, args.n_folds, folds)
        dice[architecture] = print_segmentation(architecture, records, rescore(data, seg_out, records, folds), folds)
    first = args.architectures[0]
    for other in args.architectures[1:]:
        n = len(dice[other]["filled"])
        diff = dice[other]["filled"] - dice[first]["filled"][:n]
        print(
            f"{other} - {first} on the same {n} folds (holes filled): {diff.mean():+.3f} (per fold {np.round(diff, 3)})"
        )
    if args.skip_classifier:
        return
    classifier = (
        Path(args.classifier) if args.classifier else run_classifier(data, out / "classifier", args.seed, args.n_folds)
    )
    print(f"\npredicted masks from: {first} (holes filled)")
    seg_first = out / f"seg_{first}"
    print_classifier(score_classifier(data, classifier, seg_first, args.n_folds), "the recipe's patching")
    for fraction in args.min_fractions:
        scored = score_classifier(data, classifier, seg_first, args.n_folds, fraction)
        print_classifier(scored, f"tiles at least {fraction:.0%} ROI")


if __name__ == "__main__":
    main()
