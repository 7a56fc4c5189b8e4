"""Plots of results: the image-level confusion matrix, the training curves and the reliability diagram."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..utils import atomic_savefig
from .metrics import ECE_BINS, calibration_metrics, reliability_bins


def _new_figure(width: float, height: float, layout: str | None = None):
    # Figure without pyplot: no global state, no backend switch, thread-safe; savefig renders with Agg.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray, labels: Sequence[str], path: str | Path, title: str | None = None
) -> Path:
    """Plot a confusion matrix (rows = true) as a PNG, colour = row-normalised recall, text = count and %.

    Args:
        cm: Square count matrix in ``labels`` order, as in ``classification_metrics(...)["confusion_matrix"]``.
        labels: Class names.
        path: Output file (written atomically); the format follows the suffix.
        title: Optional figure title.

    Returns:
        ``path`` as a ``Path``.
    """
    cm = np.asarray(cm, dtype=np.float64)
    n = len(labels)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix must be {n}x{n} for {n} labels, got shape {cm.shape}")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = 2.0 + 1.1 * n
    figure = _new_figure(size + 1.5, size)
    ax = figure.add_subplot()
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(n), labels=list(labels), rotation=35, ha="right")
    ax.set_yticks(range(n), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            colour = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(cm[i, j])}\n{frac[i, j]:.0%}", ha="center", va="center", color=colour, fontsize=9)
    if title:
        ax.set_title(title)
    figure.tight_layout()
    return atomic_savefig(path, figure)


# Logged eval values that are bookkeeping, not learning curves.
_NOT_CURVES = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_image_n", "eval_patch_n"}


def training_curve_points(log_history: Sequence[dict]) -> dict[str, list[tuple[int, float]]]:
    """The points of the training curves: ``{log key: [(step, value), ...]}`` for ``loss``, ``learning_rate``,
    ``eval_loss`` and every ``eval_*`` metric.

    Only what was logged while training ran is a point: entries after the end-of-training entry (the one with
    ``train_runtime``), such as an evaluation of the reloaded best checkpoint at the last step, are left out, and
    so is a second evaluation logged at a step that already has one.

    Args:
        log_history: ``trainer.state.log_history``.
    """
    end = next((i for i, entry in enumerate(log_history) if "train_runtime" in entry), len(log_history))
    points: dict[str, list[tuple[int, float]]] = {}
    evaluated: set[int] = set()
    for position, entry in enumerate(log_history[:end]):
        step = entry.get("step", position)
        keys = ["loss", "learning_rate"]
        if any(k.startswith("eval_") for k in entry) and step not in evaluated:
            evaluated.add(step)
            keys += [k for k in entry if k.startswith("eval_") and k not in _NOT_CURVES]
        for key in keys:
            value = entry.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                points.setdefault(key, []).append((step, float(value)))
    return points


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path:
    """Plot losses, eval metrics (image level, patch level) and learning rate from ``trainer.state.log_history``.

    The points are those of `training_curve_points`; legends sit beside the panels, never over the curves.

    Args:
        log_history: The Trainer's list of logged dicts (``loss`` / ``learning_rate`` on training steps,
            ``eval_*`` on evaluations, each with ``step``).
        path: Output file (written atomically).

    Returns:
        ``path`` as a ``Path``. Panels without data say so instead of failing.
    """
    points = training_curve_points(log_history)
    evals = {k: v for k, v in sorted(points.items()) if k.startswith("eval_") and k != "eval_loss"}
    image = {k.removeprefix("eval_image_"): v for k, v in evals.items() if not k.startswith("eval_patch_")}
    patch = {k.removeprefix("eval_patch_"): v for k, v in evals.items() if k.startswith("eval_patch_")}
    panels = (
        ("loss", {"train loss": points.get("loss", []), "eval loss": points.get("eval_loss", [])}),
        ("eval metrics, image level", image),
        ("eval metrics, patch level", patch),
        ("learning rate", {"learning rate": points.get("learning_rate", [])}),
    )
    figure = _new_figure(14, 7.5, layout="constrained")
    for ax, (title, curves) in zip(figure.subplots(2, 2).flat, panels):
        drawn = 0
        for name, curve in curves.items():
            if curve:
                steps, values = zip(*curve)
                ax.plot(steps, values, marker="o" if len(curve) < 30 else None, markersize=3, label=name)
                drawn += 1
        if drawn > 1:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        elif not drawn:
            ax.text(0.5, 0.5, "no data logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return atomic_savefig(path, figure)


def plot_reliability_diagram(
    y_true: Sequence[int] | np.ndarray,
    probs_before: np.ndarray,
    probs_after: np.ndarray | None,
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Reliability diagram: accuracy per confidence bin (15 bins) before and after temperature scaling, diagonal.

    Each bar is the accuracy of the images whose top-label confidence falls in the bin; a calibrated model's bars
    reach the diagonal. The legend gives each curve's ECE (`calibration_metrics`) and the image count.

    Args:
        y_true: True class index per image, ``[n]``.
        probs_before: Uncalibrated image probabilities, ``[n, C]``.
        probs_after: Calibrated ones (e.g. cross-fitted), or None to draw only ``probs_before``.
        path: Output file (written atomically).
        title: Optional figure title.

    Returns:
        ``path`` as a ``Path``.
    """
    figure = _new_figure(6.0, 5.5)
    ax = figure.add_subplot()
    width = 1.0 / ECE_BINS
    centres = (np.arange(ECE_BINS) + 0.5) * width
    curves = [("before", probs_before, "tab:red")] + (
        [("after", probs_after, "tab:blue")] if probs_after is not None else []
    )
    shift = width / (2 * len(curves))
    for k, (name, probs, colour) in enumerate(curves):
        accuracy, _, _ = reliability_bins(y_true, probs, ECE_BINS)
        ece = calibration_metrics(y_true, probs)["ece"]
        offset = (2 * k - len(curves) + 1) * shift
        ax.bar(
            centres + offset,
            np.nan_to_num(accuracy),
            width=width / len(curves),
            color=colour,
            alpha=0.7,
            edgecolor="black",
            linewidth=0.5,
            label=f"{name} (ECE {ece:.3f})",
        )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"confidence (top-label probability, {ECE_BINS} bins)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=9, title=f"{len(np.asarray(y_true))} images")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    figure.tight_layout()
    return atomic_savefig(path, figure)
