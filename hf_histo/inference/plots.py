"""Plots of results: the image-level confusion matrix and the training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..utils import atomic_savefig


def _new_figure(width: float, height: float):
    # Figure without pyplot: no global state, no backend switch, thread-safe; savefig renders with Agg.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
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


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path:
    """Plot losses, eval metrics and learning rate from ``trainer.state.log_history`` as one PNG.

    Args:
        log_history: The Trainer's list of logged dicts (``loss`` / ``learning_rate`` on training steps,
            ``eval_*`` on evaluations, each with ``step``).
        path: Output file (written atomically).

    Returns:
        ``path`` as a ``Path``. Panels without data say so instead of failing.
    """
    train_loss: list[tuple[int, float]] = []
    learning_rate: list[tuple[int, float]] = []
    eval_curves: dict[str, list[tuple[int, float]]] = {}
    for position, entry in enumerate(log_history):
        step = entry.get("step", position)
        if isinstance(entry.get("loss"), int | float):
            train_loss.append((step, float(entry["loss"])))
        if isinstance(entry.get("learning_rate"), int | float):
            learning_rate.append((step, float(entry["learning_rate"])))
        for key, value in entry.items():
            if key.startswith("eval_") and key not in _NOT_CURVES and isinstance(value, int | float):
                eval_curves.setdefault(key, []).append((step, float(value)))
    eval_loss = eval_curves.pop("eval_loss", [])

    figure = _new_figure(15, 4.2)
    ax_loss, ax_metrics, ax_lr = figure.subplots(1, 3)
    for ax, curves, title in (
        (ax_loss, {"train loss": train_loss, "eval loss": eval_loss}, "loss"),
        (ax_metrics, {k.removeprefix("eval_"): v for k, v in sorted(eval_curves.items())}, "eval metrics"),
        (ax_lr, {"learning rate": learning_rate}, "learning rate"),
    ):
        drawn = False
        for name, points in curves.items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return atomic_savefig(path, figure)
