"""Soft vote vs attention MIL over the same patch features, and calibration before/after, on grouped CV of GlaS.

Run: `python benchmarks/bench_mil.py [--out runs/bench_mil] [--tasks binary grade5] [--seeds 0] [--n_folds 5]`.

For each task (GlaS benign/malignant, `../shared/data/glas_train`; the same images' 5-class grade,
`../shared/data/glas_train_grade5.csv`) and seed, `resnet_scratch.py` runs patient-grouped k-fold CV through its real
entry point with `--aggregation attention`: each fold trains the patch model, then the gated-attention MIL head on
the training images' cached patch embeddings (the held-out fold is never seen). Every fold model is then scored on
its held-out images twice through the inference engine, once with the soft vote of its patch probabilities and once
with its MIL head: same folds, same patch model, same features, only the aggregation differs. It prints per-fold
image macro-F1 and balanced accuracy, mean ± std over folds (and seeds), the paired difference attention − soft with
a 95% t-interval over folds, and the out-of-fold ECE (15 bins) / Brier / NLL before and after temperature scaling
(cross-fitted: the temperature of each image is fitted on the other folds' images, so "after" is not in-sample).

Resumable: finished folds (their `metrics.json`) are kept; run it again after an interruption. It takes about
4-5 minutes per fold on 2 CPU cores (the patch model dominates).
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
from hf_histo.recipes.resnet_scratch import RECIPE_DEFAULTS, main  # noqa: E402
from scipy import stats  # noqa: E402

from hf_histo.data.sources import read_samples  # noqa: E402
from hf_histo.inference.calibration import fit_temperature  # noqa: E402
from hf_histo.inference.evaluate import evaluate_samples  # noqa: E402
from hf_histo.inference.loading import load_engine  # noqa: E402
from hf_histo.inference.metrics import calibration_metrics  # noqa: E402
from hf_histo.models.aggregation import apply_temperature  # noqa: E402
from hf_histo.training.arguments import parse_args  # noqa: E402
from hf_histo.training.cross_validation import run_cross_validation  # noqa: E402

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TASKS = {"binary": SHARED / "glas_train", "grade5": SHARED / "glas_train_grade5.csv"}
AGGREGATIONS = ("soft", "attention")


def run_cv(data: Path, out: Path, seed: int, n_folds: int, *flags: str) -> dict:
    """Run, finish or re-summarise `resnet_scratch.py`'s grouped CV with extra `flags`; its `cv_metrics.json`.

    A folder with folds continues with `--resume_folds`: finished folds are kept, and a run made with other settings
    (a changed recipe default, other flags) is refused rather than mixed with this one.
    """
    argv = [f"--data_dir={data}", f"--output_dir={out}", f"--n_folds={n_folds}", f"--seed={seed}", *flags]
    argv += ["--report_to=none", "--disable_tqdm=true", f"--resume_folds={any(out.glob('fold_*'))}"]
    run_cross_validation(main, *parse_args(RECIPE_DEFAULTS, argv))
    return json.loads((out / "cv_metrics.json").read_text())


def score_folds(data: Path, out: Path, n_folds: int) -> dict[str, list]:
    """Each fold model on its held-out images with each aggregation, uncalibrated: per-fold results."""
    samples = read_samples(data).samples
    scored: dict[str, list] = {agg: [] for agg in AGGREGATIONS}
    for k in range(n_folds):
        fold = out / f"fold_{k}"
        held_out = set(json.loads((fold / "splits.json").read_text())["validation"])
        fold_samples = [s for s in samples if s.image_id in held_out]
        engine = load_engine(fold, calibrate=False)
        for agg in AGGREGATIONS:
            engine.aggregation = agg
            scored[agg].append(evaluate_samples(engine, fold_samples, n_bootstrap=1, seed=0))
    return scored


def cross_fitted(probs: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Temperature-scaled probabilities where each fold's images get the temperature fitted on the other folds."""
    out = np.empty_like(probs)
    for g in np.unique(groups):
        held = groups == g
        out[held] = apply_temperature(probs[held], fit_temperature(probs[~held], y[~held]))
    return out


def interval(diffs: np.ndarray) -> tuple[float, float]:
    """95% t-interval of the mean of paired differences."""
    if diffs.size < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.975, diffs.size - 1) * diffs.std(ddof=1) / np.sqrt(diffs.size)
    return float(diffs.mean() - half), float(diffs.mean() + half)


def report(task: str, runs: list[tuple[int, dict, dict[str, list]]]) -> None:
    """Print the per-fold table, mean ± std, the paired difference and the calibration figures of one task."""
    print(f"\n=== {task}: {len(runs)} seed(s) x {len(runs[0][2]['soft'])} folds, image level ===")
    print(f"{'seed':>4} {'fold':>4} | {'soft F1':>8} {'attn F1':>8} | {'soft bAcc':>9} {'attn bAcc':>9}")
    f1 = {a: [] for a in AGGREGATIONS}
    bacc = {a: [] for a in AGGREGATIONS}
    for seed, _, scored in runs:
        for k, (soft, attn) in enumerate(zip(scored["soft"], scored["attention"])):
            for agg, result in (("soft", soft), ("attention", attn)):
                f1[agg].append(result.metrics["macro_f1"])
                bacc[agg].append(result.metrics["balanced_accuracy"])
            print(
                f"{seed:>4} {k:>4} | {soft.metrics['macro_f1']:8.3f} {attn.metrics['macro_f1']:8.3f} | "
                f"{soft.metrics['balanced_accuracy']:9.3f} {attn.metrics['balanced_accuracy']:9.3f}"
            )
    for name, values in (("macro-F1", f1), ("balanced accuracy", bacc)):
        s, a = np.array(values["soft"]), np.array(values["attention"])
        lo, hi = interval(a - s)
        print(
            f"{name:>17}: soft {s.mean():.3f} ± {s.std(ddof=1):.3f}   attention {a.mean():.3f} ± {a.std(ddof=1):.3f}"
            f"   attention - soft {np.mean(a - s):+.3f} (95% CI {lo:+.3f} to {hi:+.3f})"
        )
    print("out-of-fold calibration (ECE 15 bins / Brier / NLL), before -> after cross-fitted temperature scaling:")
    for agg in AGGREGATIONS:
        for seed, _, scored in runs:
            results = scored[agg]
            probs = np.concatenate([r.probs_array for r in results])
            y = np.concatenate([np.asarray(r.y_true) for r in results])
            groups = np.concatenate([np.full(len(r.y_true), k) for k, r in enumerate(results)])
            before = calibration_metrics(y, probs)
            after = calibration_metrics(y, cross_fitted(probs, y, groups))
            t_all = fit_temperature(probs, y)
            print(
                f"  {agg:>9} seed {seed}: ECE {before['ece']:.3f} -> {after['ece']:.3f}   Brier {before['brier']:.3f}"
                f" -> {after['brier']:.3f}   NLL {before['nll']:.3f} -> {after['nll']:.3f}   (T on all OOF {t_all:.2f})"
            )
    walls = [v for _, cv, _ in runs for v in (cv.get("wall_seconds") or {}).values()]
    if walls:
        print(f"one fold's training (patch model + MIL head + evaluation): median {np.median(walls) / 60:.1f} min")


def main_bench() -> None:
    """Parse the options and run every task."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench_mil"), help="run folder (default: runs/bench_mil)"
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="tasks (default: both)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="CV seeds (default: 0)")
    parser.add_argument("--n_folds", type=int, default=5, help="grouped folds (default: 5)")
    args = parser.parse_args()
    for task in args.tasks:
        data = TASKS[task]
        if not data.exists():
            sys.exit(f"{data} is missing: this benchmark needs ../shared/data (see its README)")
    for task in args.tasks:
        runs = []
        for seed in args.seeds:
            out = args.out / task / f"seed{seed}"
            start = time.perf_counter()
            cv = run_cv(TASKS[task], out, seed, args.n_folds, "--aggregation=attention")
            scored = score_folds(TASKS[task], out, args.n_folds)
            print(f"{task} seed {seed}: CV + scoring {time.perf_counter() - start:.0f} s", flush=True)
            runs.append((seed, cv, scored))
        report(task, runs)


if __name__ == "__main__":
    main_bench()
