"""The recipe's defaults against a hand-written peer and whole images, on the same repeated patient-grouped folds.

Run: `python benchmarks/bench_quality.py [--out runs/bench_quality] [--tasks binary grade5] [--seeds 0 1]
[--n_folds 5] [--methods recipe peer whole] [--recipe_flags="--image_size=112 ..."]`.

For each task (GlaS benign/malignant, `../shared/data/glas_train`; the same images' 5-class grade,
`../shared/data/glas_train_grade5.csv`) and seed, on the folds of `hf_histo.data.splits.split_samples` (the ones
the recipe's `--n_folds` uses; checked against each fold's `splits.json`):
- (a) `recipe`: `resnet_scratch.py`'s defaults through its real entry point, scored by the inference engine on each
  held-out fold (the figures `hf-histo evaluate` and the pipeline reproduce);
- (b) `peer`: a plain PyTorch + timm script written in this file, no hf-histo training code (`train_peer`):
  `resnet10t` from scratch on full-resolution 224 px tiles at stride 112 with >= 200 mask pixels, flips + quarter
  turns + mild brightness/contrast jitter, cross-entropy with label smoothing 0.1, AdamW 2e-3 with a one-cycle
  schedule, batch 32, 12 epochs on all training-fold images, the mean of the tile probabilities per image;
- (c) `whole`: the recipe on whole images resized to 224 px (`--strategy whole`), `--whole_epochs` epochs (60 took
  about the CPU time of (a) on GlaS; the wall times are printed to check).
(a), (b) and (c) are scored alike, by `hf_histo.inference.metrics.classification_metrics` on each held-out image's
probabilities (macro-F1 over the classes present in the fold or predicted, as scikit-learn averages by default).
It prints per-fold image macro-F1 and balanced accuracy, mean ± std over folds and seeds, the paired difference
(a) - (b) with a 95% t-interval over folds, the std over seeds of fold 0, and the wall time of one training of each.

Resumable: finished recipe folds keep their `metrics.json` and finished peer folds their `peer.json`; run it again
after an interruption. On 2 CPU cores it takes hours: run it in the background, one task or seed at a time if needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from bench_mil import TASKS, interval, run_cv  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from hf_histo.data.sources import Sample, read_samples  # noqa: E402
from hf_histo.data.splits import split_samples  # noqa: E402
from hf_histo.inference.metrics import classification_metrics  # noqa: E402

METHODS = ("recipe", "peer", "whole")
TILE, STRIDE, MIN_MASK = 224, 112, 200
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# ---- (b) the peer: what a competent user writes by hand in an afternoon ------------------------------------------
def peer_tiles(sample: Sample) -> np.ndarray:
    """`[n, 224, 224, 3]` uint8 tiles at stride 112 with >= 200 mask pixels (the best-covered one when none has)."""
    image = np.asarray(Image.open(sample.image_path).convert("RGB"))
    mask = (np.asarray(Image.open(sample.mask_path).convert("L")) > 0) if sample.mask_path else None
    mask = np.ones(image.shape[:2], bool) if mask is None else mask
    height, width = mask.shape
    if height < TILE or width < TILE:  # pad small images with white
        padded = np.full((max(height, TILE), max(width, TILE), 3), 255, np.uint8)
        padded[:height, :width] = image
        grown = np.zeros(padded.shape[:2], bool)
        grown[:height, :width] = mask
        image, mask, (height, width) = padded, grown, grown.shape
    boxes = [(y, x) for y in range(0, height - TILE + 1, STRIDE) for x in range(0, width - TILE + 1, STRIDE)]
    counts = [int(mask[y : y + TILE, x : x + TILE].sum()) for y, x in boxes]
    keep = [b for b, c in zip(boxes, counts) if c >= MIN_MASK] or [boxes[int(np.argmax(counts))]]
    return np.stack([image[y : y + TILE, x : x + TILE] for y, x in keep])


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips, quarter turns and mild brightness/contrast jitter of a float batch in [0, 1]."""
    out = []
    for image in x:
        if torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        image = torch.rot90(image, int(torch.randint(4, (), generator=generator)), dims=(-2, -1))
        brightness, contrast = 1 + (torch.rand(2, generator=generator) - 0.5) * 0.2
        mean = image.mean()
        out.append(((image - mean) * contrast + mean * brightness).clamp(0, 1))
    return torch.stack(out)


def _batch(tiles: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def train_peer(train: list[Sample], test: list[Sample], labels: list[str], seed: int, epochs: int = 12) -> dict:
    """Train the peer on `train` and score `test`: per-image probabilities, macro-F1, balanced accuracy, seconds."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tiles, targets = [], []
    for sample in train:
        t = peer_tiles(sample)
        tiles.append(t)
        targets += [labels.index(sample.label)] * len(t)
    x, y = np.concatenate(tiles), torch.tensor(targets)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=len(labels))
    steps = epochs * int(np.ceil(len(x) / 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 32):
            idx = order[i : i + 32]
            pixels = _augment(torch.from_numpy(x[idx.numpy()]).permute(0, 3, 1, 2).float() / 255, generator)
            loss = loss_fn(model((pixels - MEAN) / STD), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        probs = [model(_batch(peer_tiles(s))).softmax(-1).mean(0).tolist() for s in test]
    return {"image_ids": [s.image_id for s in test], "probs": probs, "train_seconds": seconds}


# ---- the runs ------------------------------------------------------------------------------------------------------
def folds_of(data: Path, seed: int, n_folds: int) -> tuple[list[str], list[tuple[list[Sample], list[Sample]]]]:
    """The labels and each fold's (train, held-out) samples, as the recipe's `--n_folds --seed` splits them."""
    sample_set = read_samples(data)
    train = sample_set.train
    return sample_set.labels, [split_samples(train, 0.2, seed, n_folds, k) for k in range(n_folds)]


def recipe_folds(data: Path, out: Path, seed: int, n_folds: int, folds: list, *flags: str) -> list[dict]:
    """Run (or finish) the recipe's CV; per-fold image figures of its held-out images and the fold's seconds."""
    cv = run_cv(data, out, seed, n_folds, *flags)
    rows = []
    for k, (_, held_out) in enumerate(folds):
        split = json.loads((out / f"fold_{k}" / "splits.json").read_text())
        if sorted(split["validation"]) != sorted(s.image_id for s in held_out):
            raise RuntimeError(f"fold {k} of {out} holds out other images than split_samples: not the same folds")
        image = cv["folds"][k]["image"]
        wall = (cv.get("wall_seconds") or {}).get(str(k))
        rows.append({"macro_f1": image["macro_f1"], "balanced_accuracy": image["balanced_accuracy"], "seconds": wall})
    return rows


def peer_folds(out: Path, labels: list[str], folds: list, seed: int, epochs: int = 12) -> list[dict]:
    """Train (or reload) the peer on every fold; per-fold figures."""
    rows = []
    for k, (train, held_out) in enumerate(folds):
        path = out / f"fold_{k}" / "peer.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            result = train_peer(train, held_out, labels, seed, epochs)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(path)
        result = json.loads(path.read_text())
        if result["image_ids"] != [s.image_id for s in held_out]:
            raise RuntimeError(f"{path} scored other images than fold {k}: not the same folds")
        # Scored like the recipe's figures (macro-F1 over the classes present or predicted), not by the peer itself.
        scores = classification_metrics([labels.index(s.label) for s in held_out], np.array(result["probs"]), labels)
        rows.append({**{k: scores[k] for k in ("macro_f1", "balanced_accuracy")}, "seconds": result["train_seconds"]})
    return rows


def report(task: str, table: dict[str, dict[int, list[dict]]]) -> None:
    """Per-fold figures, mean ± std, (a) - (b) with its 95% interval, fold 0's std over seeds, wall times."""
    methods = [m for m in METHODS if m in table]
    seeds = sorted(next(iter(table.values())))
    print(f"\n=== {task}: image macro-F1 / balanced accuracy per fold ({', '.join(methods)}) ===")
    for seed in seeds:
        for k in range(len(table[methods[0]][seed])):
            cells = [
                f"{table[m][seed][k]['macro_f1']:.3f} / {table[m][seed][k]['balanced_accuracy']:.3f}" for m in methods
            ]
            print(f"seed {seed} fold {k}: " + "   ".join(f"{m} {c}" for m, c in zip(methods, cells)))
    for metric in ("macro_f1", "balanced_accuracy"):
        values = {m: np.array([r[metric] for s in seeds for r in table[m][s]]) for m in methods}
        line = "   ".join(f"{m} {v.mean():.3f} ± {v.std(ddof=1):.3f}" for m, v in values.items())
        print(f"{metric}: {line}")
        if "recipe" in values and "peer" in values:
            diff = values["recipe"] - values["peer"]
            lo, hi = interval(diff)
            print(f"  recipe - peer {diff.mean():+.3f} (95% CI {lo:+.3f} to {hi:+.3f}, {diff.size} folds)")
    for m in methods:
        fold0 = np.array([table[m][s][0]["macro_f1"] for s in seeds])
        seconds = [r["seconds"] for s in seeds for r in table[m][s] if r["seconds"]]
        spread = f"{fold0.std(ddof=1):.3f}" if fold0.size > 1 else "n/a (one seed)"
        wall = f"{np.median(seconds) / 60:.1f} min" if seconds else "n/a"
        print(f"{m}: std over seeds of fold 0's macro-F1 {spread}; one training {wall} (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_quality"), help="run folder")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="tasks (default: both)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="CV seeds (default: 0 1)")
    parser.add_argument("--n_folds", type=int, default=5, help="grouped folds (default: 5)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="(default: all)")
    parser.add_argument("--whole_epochs", type=int, default=60, help="epochs of (c) (default: 60)")
    parser.add_argument("--peer_epochs", type=int, default=12, help="epochs of (b) (default: 12, the issue's peer)")
    parser.add_argument(
        "--recipe_flags",
        type=str.split,
        default=[],
        help='recipe flags for (a): a candidate default, in its own folder (--recipe_flags="--image_size=112 ...")',
    )
    args = parser.parse_args()
    for task in args.tasks:
        if not TASKS[task].exists():
            sys.exit(f"{TASKS[task]} is missing: this benchmark needs ../shared/data (see its README)")
    for task in args.tasks:
        table: dict[str, dict[int, list[dict]]] = {m: {} for m in args.methods}
        for seed in args.seeds:
            labels, folds = folds_of(TASKS[task], seed, args.n_folds)
            root = args.out / task / f"seed{seed}"
            if "recipe" in table:
                name = "_".join(["recipe", *(f.lstrip("-").replace("=", "-") for f in args.recipe_flags)])
                table["recipe"][seed] = recipe_folds(
                    TASKS[task], root / name, seed, args.n_folds, folds, *args.recipe_flags
                )
            if "peer" in table:
                table["peer"][seed] = peer_folds(
                    root / f"peer{args.peer_epochs}", labels, folds, seed, args.peer_epochs
                )
            if "whole" in table:
                flags = ("--strategy=whole", "--image_size=224", f"--num_train_epochs={args.whole_epochs}")
                table["whole"][seed] = recipe_folds(TASKS[task], root / "whole", seed, args.n_folds, folds, *flags)
        report(task, table)


if __name__ == "__main__":
    main()
