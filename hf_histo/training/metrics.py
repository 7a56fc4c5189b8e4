"""Offline patch- and image-level classification metrics, bootstrap confidence intervals and plots."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from ..models.aggregation import AGGREGATIONS, aggregate_by_image, hard_vote_from_counts
from ..utils import atomic_savefig

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "kappa")
BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "kappa")


def _none_if_nan(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _check_labels_and_probs(y_true, probs, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(labels)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise ValueError(f"probs must be [n, {n_classes}] (one column per label), got shape {probs.shape}")
    if y_true.shape != (probs.shape[0],):
        raise ValueError(f"y_true must have shape ({probs.shape[0]},) to match probs, got {y_true.shape}")
    if y_true.dtype.kind in "USO":  # label names -> indices
        lookup = {name: i for i, name in enumerate(labels)}
        unknown = sorted({str(v) for v in y_true} - set(lookup))
        if unknown:
            raise ValueError(f"y_true has labels {unknown} that are not in labels {list(labels)}")
        y_true = np.array([lookup[str(v)] for v in y_true], dtype=np.int64)
    y_true = y_true.astype(np.int64)
    if y_true.size and (y_true.min() < 0 or y_true.max() >= n_classes):
        raise ValueError(f"y_true has class indices outside [0, {n_classes - 1}]")
    return y_true, probs


def classification_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> dict:
    """Compute the standard multi-class metrics from true labels and predicted probabilities.

    Args:
        y_true: True class index (or label name) of each sample, ``[n]``.
        probs: Predicted class probabilities (or any scores whose argmax is the prediction), ``[n, C]``.
        labels: Class names in index order, ``C`` long.

    Returns:
        A dict with keys ``accuracy``, ``balanced_accuracy``, ``macro_f1`` (F1 averaged over the
        classes present in ``y_true`` or in the predictions, as scikit-learn does by default),
        ``per_class_f1`` (``{label: f1}`` for every label, 0.0 for a class neither present nor
        predicted), ``auroc`` (macro one-vs-rest ROC AUC over the classes present in ``y_true``;
        ``None`` when fewer than 2 are present), ``kappa`` (Cohen's; ``None`` when undefined),
        ``confusion_matrix`` (list of lists, rows = true, columns = predicted, in ``labels`` order)
        and ``n``. With ``n == 0`` every score is ``None``.
    """
    y_true, probs = _check_labels_and_probs(y_true, probs, labels)
    n_classes = len(labels)
    class_ids = list(range(n_classes))
    n = int(y_true.size)
    if n == 0:
        return {
            **dict.fromkeys(METRIC_KEYS),
            "per_class_f1": dict.fromkeys(labels),
            "confusion_matrix": [[0] * n_classes for _ in labels],
            "n": 0,
        }
    y_pred = probs.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes missing from y_true or y_pred are expected on small sets
        per_class = f1_score(y_true, y_pred, labels=class_ids, average=None, zero_division=0)
        result = {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "per_class_f1": {name: float(f) for name, f in zip(labels, per_class)},
            "auroc": _macro_ovr_auroc(y_true, probs),
            "kappa": _none_if_nan(cohen_kappa_score(y_true, y_pred, labels=class_ids)),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=class_ids).tolist(),
            "n": n,
        }
    return result


def _macro_ovr_auroc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    present = np.unique(y_true)
    if present.size < 2:
        return None
    return float(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in present]))


def _scores_from_confusion(cm: np.ndarray, metric: str) -> np.ndarray:
    """Metric values from a stack of confusion matrices ``[B, C, C]`` (rows = true), matching scikit-learn."""
    cm = cm.astype(np.float64)
    n = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "accuracy":
            return tp.sum(axis=1) / n
        if metric == "balanced_accuracy":
            recall = np.where(support > 0, tp / np.where(support > 0, support, 1), np.nan)
            return np.nanmean(recall, axis=1)
        if metric == "macro_f1":
            denom = support + predicted
            f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)
            return np.nanmean(f1, axis=1)
        if metric == "kappa":
            observed = tp.sum(axis=1) / n
            expected = (support * predicted).sum(axis=1) / n**2
            return (observed - expected) / (1 - expected)
    raise ValueError(f"unknown metric {metric!r}; choose one of {BOOTSTRAP_METRICS} or pass a callable")


def bootstrap_ci(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    metric: str | Callable[[np.ndarray, np.ndarray], float] = "macro_f1",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a metric, resampling samples (images) with replacement.

    Named metrics are computed for all resamples at once from stacked confusion matrices (1000
    resamples of 100 images take milliseconds); a callable ``metric(y_true, y_pred)`` is called per resample.

    Args:
        y_true: True class indices, ``[n]``.
        y_pred: Predicted class indices, ``[n]``.
        metric: ``"accuracy"``, ``"balanced_accuracy"``, ``"macro_f1"`` (as in :func:`classification_metrics`),
            ``"kappa"``, or a callable.
        n_boot: Number of bootstrap resamples.
        alpha: ``1 - alpha`` is the coverage (0.05 gives a 95% interval).
        seed: Seed of the resampling, for reproducible intervals.

    Returns:
        ``(low, high)``; resamples where the metric is undefined (e.g. kappa on one class) are skipped.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(
            f"y_true and y_pred must be non-empty 1-D arrays of equal length, got {y_true.shape}, {y_pred.shape}"
        )
    if min(y_true.min(), y_pred.min()) < 0:
        raise ValueError("y_true and y_pred must be non-negative class indices")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, y_true.size, size=(n_boot, y_true.size))
    if callable(metric):
        scores = np.array([metric(y_true[i], y_pred[i]) for i in idx], dtype=np.float64)
    else:
        if metric not in BOOTSTRAP_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {BOOTSTRAP_METRICS} or pass a callable")
        n_classes = int(max(y_true.max(), y_pred.max())) + 1
        cells = (y_true * n_classes + y_pred)[idx] + (np.arange(n_boot) * n_classes**2)[:, None]
        cm = np.bincount(cells.ravel(), minlength=n_boot * n_classes**2).reshape(n_boot, n_classes, n_classes)
        scores = _scores_from_confusion(cm, metric)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        return (float("nan"), float("nan"))
    low, high = np.quantile(scores, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _image_labels(image_ids: Sequence[str], patch_labels: np.ndarray, ids: list[str]) -> np.ndarray:
    """The label of each image in ``ids``, checking that all patches of an image agree."""
    first: dict[str, int] = {}
    for image_id, label in zip(image_ids, patch_labels.tolist()):
        image_id = str(image_id)
        if first.setdefault(image_id, label) != label:
            raise ValueError(f"image {image_id!r} has patches with different labels ({first[image_id]} and {label})")
    return np.array([first[i] for i in ids], dtype=np.int64)


def image_level_metrics(
    image_ids: Sequence[str],
    probs: np.ndarray,
    patch_labels: Sequence[int] | np.ndarray,
    labels: Sequence[str],
    aggregation: str = "soft",
    foreground: Sequence[float] | np.ndarray | None = None,
) -> dict:
    """Aggregate patch probabilities per image and compute :func:`classification_metrics` on images.

    Args:
        image_ids: Image id of each patch.
        probs: Patch probabilities ``[n_patches, C]``.
        patch_labels: Class index of each patch (its image's label); patches labelled < 0 are left out.
        labels: Class names in index order.
        aggregation: One of ``AGGREGATIONS`` (see :func:`hf_histo.models.aggregation.aggregate`).
        foreground: Per-patch weights for ``"mask_weighted"``.

    Returns:
        The metrics dict of the images.
    """
    probs = np.asarray(probs, dtype=np.float64)
    patch_labels = np.asarray(patch_labels, dtype=np.int64)
    ids_arr = np.asarray([str(i) for i in image_ids], dtype=object)
    if patch_labels.shape != (probs.shape[0],) or ids_arr.shape != patch_labels.shape:
        raise ValueError(
            f"image_ids ({ids_arr.size}), probs ({probs.shape[0]}) and patch_labels ({patch_labels.size}) must "
            "have one entry per patch"
        )
    weights = None if foreground is None else np.asarray(foreground, dtype=np.float64).reshape(-1)
    if weights is not None and weights.shape != patch_labels.shape:
        raise ValueError(f"foreground must have one value per patch ({patch_labels.size}), got {weights.size}")
    keep = patch_labels >= 0
    weights = None if weights is None else weights[keep]
    if not keep.any():
        return classification_metrics(np.zeros(0, dtype=np.int64), np.zeros((0, len(labels))), labels)
    ids, image_probs = aggregate_by_image(list(ids_arr[keep]), probs[keep], aggregation, weights)
    y_true = _image_labels(list(ids_arr[keep]), patch_labels[keep], ids)
    return classification_metrics(y_true, image_probs, labels)


class PatchPredictionAccumulator:
    """Streaming patch predictions -> patch- and image-level metrics, batch by batch.

    Per image it keeps running sums (probabilities, foreground-weighted probabilities, foreground
    weight, argmax votes, patch count), so image-level memory is ``O(images x classes)``. Patch-level
    AUROC needs every patch's probabilities, kept as float32: ``n_patches x C x 4`` bytes (1.6 MB for
    100k patches and 4 classes); pass ``keep_patch_probs=False`` to keep only the argmax (patch AUROC
    is then ``None``).

    Args:
        num_labels: Number of classes ``C``.
        keep_patch_probs: Whether to keep per-patch probabilities for patch-level AUROC.
    """

    def __init__(self, num_labels: int, keep_patch_probs: bool = True):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.keep_patch_probs = keep_patch_probs
        self._index: dict[str, int] = {}
        self._image_label: list[int] = []
        self._capacity = 0
        self._prob_sum = np.zeros((0, num_labels))
        self._weighted_sum = np.zeros((0, num_labels))
        self._weight_sum = np.zeros(0)
        self._votes = np.zeros((0, num_labels))
        self._count = np.zeros(0)
        self._patch_probs: list[np.ndarray] = []
        self._patch_pred: list[np.ndarray] = []
        self._patch_labels: list[np.ndarray] = []

    def __len__(self) -> int:
        """Number of patches added so far."""
        return int(self._count.sum())

    @property
    def image_ids(self) -> list[str]:
        """Image ids seen so far, in order of first appearance."""
        return list(self._index)

    def _grow(self, n_images: int) -> None:
        if n_images <= self._capacity:
            return
        new_capacity = max(n_images, 2 * self._capacity, 64)
        for name in ("_prob_sum", "_weighted_sum", "_weight_sum", "_votes", "_count"):
            old = getattr(self, name)
            new = np.zeros((new_capacity, *old.shape[1:]))
            new[: old.shape[0]] = old
            setattr(self, name, new)
        self._capacity = new_capacity

    def add(
        self,
        image_ids: Sequence[str],
        probs: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        foreground: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """Add one batch of patch predictions.

        Args:
            image_ids: Image id of each patch in the batch.
            probs: Patch probabilities ``[batch, C]`` (numpy or anything ``np.asarray`` accepts, e.g. a CPU tensor).
            labels: Class index of each patch (its image's label); < 0 marks unlabelled patches, which
                are aggregated but left out of the metrics.
            foreground: Per-patch weights for ``"mask_weighted"`` (foreground fraction or pixel count);
                without them every patch weighs 1.
        """
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        ids = [str(i) for i in image_ids]
        if probs.ndim != 2 or probs.shape[1] != self.num_labels:
            raise ValueError(f"probs must be [batch, {self.num_labels}], got shape {probs.shape}")
        if not len(ids) == labels.size == probs.shape[0]:
            raise ValueError(f"got {len(ids)} image_ids, {labels.size} labels and {probs.shape[0]} probability rows")
        weights = np.ones(len(ids)) if foreground is None else np.asarray(foreground, dtype=np.float64).reshape(-1)
        if weights.shape != (len(ids),) or np.any(weights < 0):
            raise ValueError(f"foreground must be {len(ids)} non-negative values, got shape {weights.shape}")
        rows = np.empty(len(ids), dtype=np.int64)
        for k, (image_id, label) in enumerate(zip(ids, labels.tolist())):
            row = self._index.get(image_id)
            if row is None:
                row = self._index[image_id] = len(self._index)
                self._image_label.append(label)
            elif self._image_label[row] != label:
                raise ValueError(
                    f"image {image_id!r} has patches with different labels ({self._image_label[row]} and {label})"
                )
            rows[k] = row
        self._grow(len(self._index))
        pred = probs.argmax(axis=1)
        np.add.at(self._prob_sum, rows, probs)
        np.add.at(self._weighted_sum, rows, probs * weights[:, None])
        np.add.at(self._weight_sum, rows, weights)
        np.add.at(self._votes, (rows, pred), 1.0)
        np.add.at(self._count, rows, 1.0)
        self._patch_pred.append(pred.astype(np.int32))
        self._patch_labels.append(labels)
        if self.keep_patch_probs:
            self._patch_probs.append(probs.astype(np.float32))

    def image_probs(self, aggregation: str = "soft") -> tuple[list[str], np.ndarray]:
        """Aggregated image probabilities ``(ids, [n_images, C])``, as ``aggregate_by_image`` computes them."""
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
        n = len(self._index)
        count = self._count[:n, None]
        means = self._prob_sum[:n] / np.where(count > 0, count, 1)
        if aggregation == "hard" and n:
            return self.image_ids, hard_vote_from_counts(self._votes[:n], means)
        if aggregation == "mask_weighted":
            w = self._weight_sum[:n, None]
            return self.image_ids, np.where(w > 0, self._weighted_sum[:n] / np.where(w > 0, w, 1), means)
        return self.image_ids, means

    def compute(self, labels: Sequence[str], aggregation: str = "soft") -> dict:
        """Metrics of everything added so far.

        Args:
            labels: Class names in index order.
            aggregation: How patches are aggregated into images (one of ``AGGREGATIONS``).

        Returns:
            ``{"image": classification_metrics(...), "patch": classification_metrics(...)}``; the patch
            ``auroc`` is ``None`` when ``keep_patch_probs=False``.
        """
        if len(labels) != self.num_labels:
            raise ValueError(f"got {len(labels)} labels for an accumulator of {self.num_labels} classes")
        ids, image_probs = self.image_probs(aggregation)
        image_y = np.asarray(self._image_label, dtype=np.int64)
        keep = image_y >= 0
        image = classification_metrics(image_y[keep], image_probs[keep], labels)

        patch_y = np.concatenate(self._patch_labels) if self._patch_labels else np.zeros(0, dtype=np.int64)
        keep = patch_y >= 0
        if self.keep_patch_probs and self._patch_probs:
            patch = classification_metrics(patch_y[keep], np.concatenate(self._patch_probs)[keep], labels)
        else:
            pred = np.concatenate(self._patch_pred)[keep] if self._patch_pred else np.zeros(0, dtype=np.int64)
            patch = classification_metrics(patch_y[keep], np.eye(self.num_labels)[pred], labels)
            patch["auroc"] = None
        return {"image": image, "patch": patch}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _flat(prefix: str, metrics: dict) -> dict[str, float]:
    """Scalar metrics as ``{prefix_name: float}``; undefined values become NaN so Trainer can log them."""
    return {f"{prefix}_{key}": float("nan") if metrics[key] is None else float(metrics[key]) for key in METRIC_KEYS}


def make_compute_metrics(
    labels: Sequence[str],
    image_ids_eval: Sequence[str],
    foreground_eval: Sequence[float] | np.ndarray | None = None,
    aggregation: str = "soft",
) -> Callable[[object], dict[str, float]]:
    """Build a ``compute_metrics`` for ``transformers.Trainer`` that reports patch and image metrics.

    The eval dataset must not be shuffled (Trainer's eval loader is not) so that prediction ``i``
    belongs to ``image_ids_eval[i]``.

    Args:
        labels: Class names in index order.
        image_ids_eval: Image id of every patch of the eval dataset, in dataset order.
        foreground_eval: Per-patch foreground weights of the eval dataset (for ``"mask_weighted"``).
        aggregation: How patches are aggregated into images.

    Returns:
        ``compute_metrics(eval_prediction) -> dict`` with flat keys ``image_accuracy``,
        ``image_balanced_accuracy``, ``image_macro_f1``, ``image_auroc``, ``image_kappa``, the same
        with ``patch_``, and ``image_n`` / ``patch_n`` (Trainer prefixes them with ``eval_``).
        Undefined values (AUROC with one class) are NaN.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    labels = list(labels)
    image_ids_eval = [str(i) for i in image_ids_eval]
    foreground = None if foreground_eval is None else np.asarray(foreground_eval, dtype=np.float64)
    if foreground is not None and foreground.shape != (len(image_ids_eval),):
        raise ValueError(f"foreground_eval must have {len(image_ids_eval)} values, got shape {foreground.shape}")
    if aggregation == "mask_weighted" and foreground is None:
        raise ValueError('aggregation="mask_weighted" needs foreground_eval (the eval dataset\'s foreground column)')

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, tuple | list):  # models returning extra outputs put logits first
            logits = logits[0]
        logits = np.asarray(logits, dtype=np.float64)
        y_true = np.asarray(eval_prediction.label_ids).reshape(-1)
        if logits.shape[0] != len(image_ids_eval):
            raise ValueError(
                f"got {logits.shape[0]} eval predictions for {len(image_ids_eval)} eval patches: the eval dataset "
                "given to make_compute_metrics must be the one Trainer evaluates, unshuffled and not truncated"
            )
        probs = _softmax(logits)
        keep = y_true >= 0
        patch = classification_metrics(y_true[keep], probs[keep], labels)
        image = image_level_metrics(image_ids_eval, probs, y_true, labels, aggregation, foreground)
        return {
            **_flat("image", image),
            "image_n": float(image["n"]),
            **_flat("patch", patch),
            "patch_n": float(patch["n"]),
        }

    return compute_metrics


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
