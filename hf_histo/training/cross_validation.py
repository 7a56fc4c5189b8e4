"""Grouped k-fold cross-validation of a recipe: out-of-fold image metrics, mean ± std, fold-model ensembles."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..inference.metrics import METRIC_KEYS
from ..inference.plots import plot_confusion_matrix
from ..inference.results import ImageLevelResult
from ..utils import atomic_write_text

logger = logging.getLogger(__name__)


def _fold_args(
    data_args: Any, training_args: Any, n_folds: int, fold: int, output_dir: Path, select_on_heldout: bool
) -> tuple[Any, Any]:
    fold_data = copy.copy(data_args)
    fold_data.n_folds, fold_data.fold = n_folds, fold
    fold_training = copy.copy(training_args)
    if not select_on_heldout:  # the held-out fold scores the model; it must not also pick it
        fold_training.load_best_model_at_end = False
        if hasattr(fold_training, "early_stopping_patience"):
            fold_training.early_stopping_patience = None
    fold_training.push_final_to_hub = False  # fold models stay local (an ensemble); push the one you pick
    fold_training.output_dir = str(output_dir / f"fold_{fold}")
    if getattr(training_args, "logging_dir", None):
        fold_training.logging_dir = str(output_dir / f"fold_{fold}" / "logs")
    fold_training.resume_from_checkpoint = None
    return fold_data, fold_training


def summarize_folds(
    fold_dirs: Sequence[str | Path], out_dir: str | Path | None = None, n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Combine finished folds: per-fold image metrics, mean ± std, and out-of-fold (OOF) metrics.

    Args:
        fold_dirs: Output folders of the folds (each with the `metrics.json` that `finalize_run` wrote).
        out_dir: Where to write `cv_metrics.json`, `oof_image_predictions.csv` and `oof_confusion_matrix.png`.
        n_bootstrap: Resamples of the out-of-fold macro-F1 confidence interval.
        seed: Seed of the resampling.

    Returns:
        `{"n_folds", "folds": [...], "mean": {...}, "std": {...}, "oof": ImageLevelResult.to_dict(),
        "image_macro_f1": "m ± s"}`; `std` is the sample standard deviation over folds (ddof=1).
    """
    results = []
    for k, fold_dir in enumerate(fold_dirs):
        path = Path(fold_dir) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the fold did not finish (finalize_run writes it)")
        result = ImageLevelResult.load(path)
        if results and result.labels != results[0].labels:
            raise ValueError(f"fold {k} has labels {result.labels}, fold 0 has {results[0].labels}")
        seen = {i for r in results for i in r.image_ids}
        overlap = seen & set(result.image_ids)
        if overlap:
            raise ValueError(f"fold {k} evaluates images already held out by another fold: {sorted(overlap)[:5]}")
        results.append(result)
    if not results:
        raise ValueError("no folds to summarize")
    folds = [
        {"fold": k, "dir": str(d), "image": r.metrics, "patch": r.patch_metrics}
        for k, (d, r) in enumerate(zip(fold_dirs, results))
    ]
    keys = [k for k in METRIC_KEYS if all(f["image"].get(k) is not None for f in folds)]
    values = {k: np.array([f["image"][k] for f in folds], dtype=np.float64) for k in keys}
    mean = {k: float(v.mean()) for k, v in values.items()}
    std = {k: float(v.std(ddof=1)) if v.size > 1 else 0.0 for k, v in values.items()}
    first = results[0]
    oof = ImageLevelResult.from_predictions(
        first.labels,
        [i for r in results for i in r.image_ids],
        [y for r in results for y in r.y_true],
        np.concatenate([r.probs_array for r in results]),
        aggregation=first.aggregation,
        tta=first.tta,
        split="out_of_fold",
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    summary = {
        "n_folds": len(folds),
        "labels": first.labels,
        "image_macro_f1": f"{mean.get('macro_f1', float('nan')):.4f} ± {std.get('macro_f1', float('nan')):.4f}",
        "mean": mean,
        "std": std,
        "oof": oof.to_dict(),
        "folds": folds,
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / "cv_metrics.json", json.dumps(summary, indent=2) + "\n")
        rows = ["image_id,label," + ",".join(f"p_{name}" for name in oof.labels)]
        for image_id, label, row in zip(oof.image_ids, oof.y_true, oof.probs):
            name = oof.labels[label] if label >= 0 else ""
            rows.append(f"{image_id},{name}," + ",".join(f"{v:.6f}" for v in row))
        atomic_write_text(out_dir / "oof_image_predictions.csv", "\n".join(rows) + "\n")
        plot_confusion_matrix(
            oof.metrics["confusion_matrix"],
            oof.labels,
            out_dir / "oof_confusion_matrix.png",
            title=f"out-of-fold images, macro-F1 {oof.metrics['macro_f1']:.3f}",
        )
    return summary


def run_cross_validation(
    train_fn: Callable[[Any, Any, Any], Any],
    data_args: Any,
    model_args: Any,
    training_args: Any,
    n_folds: int | None = None,
    folds: Sequence[int] | None = None,
    select_on_heldout: bool = False,
) -> dict[str, Any]:
    """Run a recipe's `main(data_args, model_args, training_args)` once per grouped fold and summarize.

    Each fold trains into `output_dir/fold_k` on the images outside fold `k` (groups, e.g. patients, never
    straddle folds: the split is done by `load_patch_dataset(n_folds=, fold=)`) and is evaluated on fold `k`.
    The fold models together form an ensemble (`hf-histo evaluate|predict --model output_dir`).

    Args:
        train_fn: The recipe's `main`.
        data_args: Data arguments (`n_folds` taken from here when not given).
        model_args: Model arguments.
        training_args: Training arguments; `output_dir` is the CV root.
        n_folds: Number of folds.
        folds: Subset of folds to run (default: all); the summary covers the folds that have finished.
        select_on_heldout: Allow best-checkpoint selection and early stopping on the held-out fold. Off by
            default: each fold keeps its final model, so out-of-fold metrics are not optimistically biased.

    Returns:
        The summary of `summarize_folds` with `wall_seconds` and `select_on_heldout`, also written to
        `output_dir/cv_metrics.json` (main process; None on the other ranks).
    """
    n_folds = n_folds or data_args.n_folds
    if not n_folds or n_folds < 2:
        raise ValueError("run_cross_validation needs n_folds >= 2 (--n_folds)")
    root = Path(training_args.output_dir)
    wall = {}
    for fold in folds if folds is not None else range(n_folds):
        fold_data, fold_training = _fold_args(data_args, training_args, n_folds, fold, root, select_on_heldout)
        start = time.perf_counter()
        train_fn(fold_data, model_args, fold_training)
        wall[fold] = time.perf_counter() - start
        logger.info("fold %d/%d done in %.0f s", fold + 1, n_folds, wall[fold])
    fold_dirs = [root / f"fold_{k}" for k in range(n_folds) if (root / f"fold_{k}" / "metrics.json").is_file()]
    summary = None
    if getattr(training_args, "process_index", 0) == 0:
        summary = summarize_folds(fold_dirs, root, training_args.n_bootstrap, training_args.seed)
        summary["wall_seconds"] = {str(k): round(v, 1) for k, v in wall.items()}
        summary["select_on_heldout"] = select_on_heldout
        atomic_write_text(root / "cv_metrics.json", json.dumps(summary, indent=2) + "\n")
        logger.debug(  # the recipes print it in their end-of-run summary (training.summary)
            "cross-validation image macro-F1: %s (OOF %.4f)",
            summary["image_macro_f1"],
            summary["oof"]["metrics"]["macro_f1"],
        )
    return summary
