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
import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from ..utils import atomic_write_text
from .metrics import METRIC_KEYS, classification_metrics, plot_confusion_matrix

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


def read_fold_predictions(fold_dir: str | Path) -> dict[str, Any]:
    """Read the `image_predictions.json` that `finalize_run` wrote in a fold's output folder."""
    path = Path(fold_dir) / "image_predictions.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the fold did not finish (finalize_run writes it)")
    return json.loads(path.read_text(encoding="utf-8"))


def summarize_folds(fold_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Combine finished folds: per-fold image metrics, mean ± std, and out-of-fold (OOF) metrics.

    Args:
        fold_dirs: Output folders of the folds (each with `metrics.json` and `image_predictions.json`).
        out_dir: Where to write `cv_metrics.json`, `oof_image_predictions.csv` and `oof_confusion_matrix.png`.

    Returns:
        `{"n_folds", "folds": [...], "mean": {...}, "std": {...}, "oof": {"image": ...}, "image_macro_f1": "m ± s"}`;
        `std` is the sample standard deviation over folds (ddof=1).
    """
    folds, ids, y_true, probs = [], [], [], []
    labels = None
    for k, fold_dir in enumerate(fold_dirs):
        fold_dir = Path(fold_dir)
        metrics = json.loads((fold_dir / "metrics.json").read_text(encoding="utf-8"))
        preds = read_fold_predictions(fold_dir)
        if labels is None:
            labels = preds["labels"]
        elif preds["labels"] != labels:
            raise ValueError(f"fold {k} has labels {preds['labels']}, fold 0 has {labels}")
        folds.append({"fold": k, "dir": str(fold_dir), "image": metrics["image"], "patch": metrics["patch"]})
        overlap = set(ids) & set(preds["image_ids"])
        if overlap:
            raise ValueError(f"fold {k} evaluates images already held out by another fold: {sorted(overlap)[:5]}")
        ids += preds["image_ids"]
        y_true += preds["image_labels"]
        probs += preds["image_probs"]
    if labels is None:
        raise ValueError("no folds to summarize")
    keys = [k for k in METRIC_KEYS if all(f["image"].get(k) is not None for f in folds)]
    values = {k: np.array([f["image"][k] for f in folds], dtype=np.float64) for k in keys}
    mean = {k: float(v.mean()) for k, v in values.items()}
    std = {k: float(v.std(ddof=1)) if v.size > 1 else 0.0 for k, v in values.items()}
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    keep = y >= 0
    oof = classification_metrics(y[keep], p[keep], labels)
    summary = {
        "n_folds": len(folds),
        "labels": labels,
        "image_macro_f1": f"{mean.get('macro_f1', float('nan')):.4f} ± {std.get('macro_f1', float('nan')):.4f}",
        "mean": mean,
        "std": std,
        "oof": {"image": oof},
        "folds": folds,
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / "cv_metrics.json", json.dumps(summary, indent=2) + "\n")
        rows = ["image_id,label," + ",".join(f"p_{name}" for name in labels)]
        for image_id, label, row in zip(ids, y_true, probs):
            name = labels[label] if label >= 0 else ""
            rows.append(f"{image_id},{name}," + ",".join(f"{v:.6f}" for v in row))
        atomic_write_text(out_dir / "oof_image_predictions.csv", "\n".join(rows) + "\n")
        plot_confusion_matrix(
            oof["confusion_matrix"],
            labels,
            out_dir / "oof_confusion_matrix.png",
            title=f"out-of-fold images, macro-F1 {oof['macro_f1']:.3f}",
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
    The fold models together form an ensemble (`FoldEnsemble.from_pretrained(output_dir)`).

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
        The summary of `summarize_folds`, also written to `output_dir/cv_metrics.json`.
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
        summary = summarize_folds(fold_dirs, root)
        summary["wall_seconds"] = {str(k): round(v, 1) for k, v in wall.items()}
        atomic_write_text(root / "cv_metrics.json", json.dumps(summary, indent=2) + "\n")
        logger.info(
            "cross-validation image macro-F1: %s (OOF %.4f)",
            summary["image_macro_f1"],
            summary["oof"]["image"]["macro_f1"],
        )
    return summary


class FoldEnsemble(nn.Module):
    """Average the softmax of several fold models (same labels and patching): one model to the outside.

    `forward(pixel_values)` returns `ImageClassifierOutput(logits=log(mean probabilities))`, so softmax of the
    logits is the ensemble probability and argmax the ensemble class.

    Args:
        models: The fold classifiers.
    """

    main_input_name = "pixel_values"

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("FoldEnsemble needs at least one model")
        first = models[0].config
        for k, model in enumerate(models[1:], start=1):
            if dict(model.config.id2label) != dict(first.id2label):
                raise ValueError(f"model {k} has labels {model.config.id2label}, model 0 has {first.id2label}")
            if getattr(model.config, "patching", None) != getattr(first, "patching", None):
                raise ValueError(
                    f"model {k} was trained on other patches ({model.config.patching} vs {first.patching})"
                )
        self.models = nn.ModuleList(models)
        self.config = first

    @classmethod
    def from_pretrained(cls, paths: str | Path | Sequence[str | Path], **kwargs) -> FoldEnsemble:
        """Load fold models from folders; a CV root folder expands to its `fold_*` subfolders."""
        from transformers import AutoModelForImageClassification

        import hf_histo.models  # noqa: F401  (registers the Auto classes)

        if isinstance(paths, (str, Path)):
            root = Path(paths)
            fold_dirs = sorted(p for p in root.glob("fold_*") if (p / "config.json").is_file())
            paths = fold_dirs or [root]
        models = [AutoModelForImageClassification.from_pretrained(str(p), **kwargs).eval() for p in paths]
        return cls(models)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        """Ensemble log-probabilities."""
        probs = None
        for model in self.models:
            p = torch.softmax(model(pixel_values=pixel_values).logits.float(), dim=-1)
            probs = p if probs is None else probs + p
        return ImageClassifierOutput(logits=(probs / len(self.models)).clamp_min(1e-12).log())
