"""Segmentation scores from a pooled confusion matrix (per-class IoU and Dice, mean IoU, pixel accuracy) and plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def confusion(target: np.ndarray, predicted: np.ndarray, num_labels: int, ignore_index: int = 255) -> np.ndarray:
    """``(num_labels, num_labels)`` pixel counts, rows true class, columns predicted; ``ignore_index`` pixels left out."""
    if target.shape != predicted.shape:
        raise ValueError(f"target shape {target.shape} differs from the prediction's {predicted.shape}")
    keep = target != ignore_index
    index = target[keep].astype(np.int64) * num_labels + predicted[keep].astype(np.int64)
    return np.bincount(index, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def segmentation_scores(matrix: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Scores of a confusion matrix summed over images (pixels pooled, as mmsegmentation reports them).

    Args:
        matrix: From `confusion`, summed over the images.
        labels: Class names, the background first.

    Returns:
        ``iou`` and ``dice`` per class name, ``mean_iou`` and ``mean_dice`` over the classes other than the
        background (a class absent from both truth and prediction is left out of the means), ``pixel_accuracy``
        and ``pixels``. For a binary model ``mean_dice`` is the region-of-interest Dice.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    true, pred = matrix.sum(1), matrix.sum(0)
    union = true + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(true + pred > 0, 2 * tp / (true + pred), np.nan)
    foreground = slice(1, None) if len(labels) > 1 else slice(None)
    total = matrix.sum()

    def mean(values: np.ndarray) -> float:
        kept = values[foreground][~np.isnan(values[foreground])]
        return float(kept.mean()) if kept.size else float("nan")

    return {
        "iou": {name: float(v) for name, v in zip(labels, iou)},
        "dice": {name: float(v) for name, v in zip(labels, dice)},
        "mean_iou": mean(iou),
        "mean_dice": mean(dice),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "pixels": int(total),
    }


def plot_predictions(
    path: str | Path,
    examples: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    num_labels: int,
) -> Path:
    """Save a figure with one row per example: image, true mask, predicted mask.

    Args:
        path: The PNG to write (atomically).
        examples: ``(name, image RGB uint8, true classes, predicted classes)`` tuples.
        num_labels: Number of classes (fixes the colour scale).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_savefig

    rows = max(len(examples), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for row, (name, image, target, predicted) in zip(axes, examples):
        shown = np.where(target == 255, np.nan, target.astype(float))
        for ax, data, title in zip(row, (image, shown, predicted), (name, "true mask", "predicted mask")):
            if data.ndim == 3:
                ax.imshow(data)
            else:
                ax.imshow(data, cmap="viridis", vmin=0, vmax=max(num_labels - 1, 1), interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    try:
        return atomic_savefig(path, fig, dpi=90)
    finally:
        plt.close(fig)
