"""Offline classification metrics of image- or patch-level predictions, with bootstrap confidence intervals."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    log_loss,
    roc_auc_score,
)

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "kappa")
CALIBRATION_KEYS = ("ece", "brier", "nll")  # also in classification_metrics' output, not in the training logs
ECE_BINS = 15
_LABEL_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy_score,
    "balanced_accuracy": balanced_accuracy_score,
    "macro_f1": lambda y, p: f1_score(y, p, average="macro", zero_division=0),
    "kappa": cohen_kappa_score,
}
BOOTSTRAP_METRICS = tuple(_LABEL_METRICS)


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
        ``confusion_matrix`` (list of lists, rows = true, columns = predicted, in ``labels`` order),
        ``ece``, ``brier`` and ``nll`` (see :func:`calibration_metrics`; they read ``probs`` as probabilities)
        and ``n``. With ``n == 0`` every score is ``None``.
    """
    y_true, probs = _check_labels_and_probs(y_true, probs, labels)
    n_classes = len(labels)
    class_ids = list(range(n_classes))
    n = int(y_true.size)
    if n == 0:
        return {
            **dict.fromkeys((*METRIC_KEYS, *CALIBRATION_KEYS)),
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
            **calibration_metrics(y_true, probs),
            "n": n,
        }
    return result


def calibration_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """How far predicted probabilities can be read as frequencies: ECE, Brier score and NLL.

    Args:
        y_true: True class index of each sample, ``[n]``.
        probs: Predicted class probabilities, ``[n, C]`` (rows summing to 1).

    Returns:
        ``{"ece", "brier", "nll"}``: ``ece`` is the expected calibration error over ``ECE_BINS`` (15) equal-width
        bins of the top-label confidence, ``(lo, hi]``: the mean over samples of ``|accuracy - mean confidence|``
        of their bin (bins weighted by size); ``brier`` the multi-class Brier score, the mean over samples of
        ``sum_c (p_c - onehot_c)^2`` (0 to 2); ``nll`` the mean negative log-likelihood of the true class
        (scikit-learn's ``log_loss``, probabilities clipped away from 0). All ``None`` when ``n == 0``.
    """
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y_true.size:
        raise ValueError(f"probs must be [n, C] with n = len(y_true) = {y_true.size}, got shape {probs.shape}")
    if y_true.size == 0:
        return dict.fromkeys(CALIBRATION_KEYS)
    n_classes = probs.shape[1]
    accuracy, confidence, counts = reliability_bins(y_true, probs)
    ece = np.nansum(counts * np.abs(accuracy - confidence)) / counts.sum()
    onehot = np.eye(n_classes)[y_true]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows of a vote that are off 1 by rounding are renormalised
        nll = log_loss(y_true, probs, labels=list(range(n_classes)))
    return {
        "ece": float(ece),
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
        "nll": float(nll),
    }


def _macro_ovr_auroc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    present = np.unique(y_true)
    if present.size < 2:
        return None
    return float(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in present]))


def bootstrap_ci(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    metric: str | Callable[[np.ndarray, np.ndarray], float] = "macro_f1",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a metric, resampling images with replacement (scipy).

    Args:
        y_true: True class indices, ``[n]``.
        y_pred: Predicted class indices, ``[n]``.
        metric: ``"accuracy"``, ``"balanced_accuracy"``, ``"macro_f1"`` (as in :func:`classification_metrics`),
            ``"kappa"``, or a callable ``metric(y_true, y_pred)``.
        n_boot: Number of bootstrap resamples.
        alpha: ``1 - alpha`` is the coverage (0.05 gives a 95% interval).
        seed: Seed of the resampling, for reproducible intervals.

    Returns:
        ``(low, high)``; NaN when the metric is undefined on the resamples (e.g. kappa on one class) or there is
        a single image. Each resample costs one scikit-learn call (~7 ms): 1000 resamples take a few seconds.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(
            f"y_true and y_pred must be non-empty 1-D arrays of equal length, got {y_true.shape}, {y_pred.shape}"
        )
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    if y_true.size < 2:
        return (float("nan"), float("nan"))
    if not callable(metric):
        if metric not in _LABEL_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {BOOTSTRAP_METRICS} or pass a callable")
        metric = _LABEL_METRICS[metric]

    def statistic(t: np.ndarray, p: np.ndarray) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one-class resamples: kappa/balanced accuracy are undefined
            return float(metric(t, p))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on degenerate (constant) resample distributions
        result = bootstrap(
            (y_true, y_pred),
            statistic,
            n_resamples=n_boot,
            paired=True,
            vectorized=False,
            confidence_level=1 - alpha,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    low, high = result.confidence_interval
    return float(low), float(high)


def reliability_bins(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin accuracy, mean confidence and count of the top-label confidence, ``n_bins`` equal-width ``(lo, hi]``
    bins (the bins of ``calibration_metrics``' ECE); empty bins have accuracy and confidence NaN."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    bins = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], confidence, side="left")
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(bins, correct, n_bins) / counts
        mean_confidence = np.bincount(bins, confidence, n_bins) / counts
    return accuracy, mean_confidence, counts
