"""Temperature scaling of image-level probabilities: fit on labelled images, cross-fitted before/after record."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.model_selection import KFold

from ..models.aggregation import apply_temperature
from .metrics import calibration_metrics, classification_metrics

if TYPE_CHECKING:  # the fit itself needs neither torch nor the engine
    from .results import ImageLevelResult

TEMPERATURE_BOUNDS = (0.05, 20.0)
CROSS_FIT_FOLDS = 5  # the "after" figures: T fitted on 4/5 of the images, applied to the other 1/5


def _nll(log_probs: np.ndarray, y_true: np.ndarray, temperature: float) -> float:
    scaled = log_probs / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(scaled).sum(axis=1))
    return float(np.mean(log_norm - scaled[np.arange(len(y_true)), y_true]))


def fit_temperature(probs: np.ndarray, y_true: Sequence[int] | np.ndarray) -> float:
    """The temperature ``T`` that minimises the NLL of ``softmax(log(p) / T)`` on labelled images.

    Log-probabilities stand for the logits, so this works on the image probabilities of any aggregation (for a
    softmax head they equal its logits up to a constant per row); scaling keeps every row's argmax. ``log T`` is
    searched in ``TEMPERATURE_BOUNDS`` (bounded Brent, scipy): a tiny or perfectly separated set drives ``T`` to
    a bound.

    Args:
        probs: Image probabilities ``[n, C]``.
        y_true: True class index per image, ``[n]`` (all labelled).

    Returns:
        ``T > 0`` (``> 1``: the probabilities were over-confident).
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != y_true.size or y_true.size == 0:
        raise ValueError(f"need probs [n, C] and n >= 1 labels, got shapes {probs.shape} and {y_true.shape}")
    log_probs = np.log(np.clip(probs, 1e-12, None))
    low, high = (math.log(t) for t in TEMPERATURE_BOUNDS)
    found = minimize_scalar(
        lambda log_t: _nll(log_probs, y_true, math.exp(log_t)),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(found.x))


def cross_fitted_probs(probs: np.ndarray, y_true: np.ndarray, seed: int = 0) -> tuple[np.ndarray, int]:
    """Honest calibrated probabilities: each image scaled by a temperature fitted on the other images.

    The labelled images are split into ``K = min(CROSS_FIT_FOLDS, n)`` shuffled folds; each fold is scaled by the
    ``T`` fitted on the ``K - 1`` others, so no image takes part in fitting its own temperature.

    Returns:
        ``(probs [n, C], K)``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    k = min(CROSS_FIT_FOLDS, len(y_true))
    out = np.empty_like(probs)
    for fit, held in KFold(n_splits=k, shuffle=True, random_state=seed).split(probs):
        out[held] = apply_temperature(probs[held], fit_temperature(probs[fit], y_true[fit]))
    return out, k


def calibration_record(
    probs: np.ndarray, y_true: np.ndarray, temperature: float, fitted_on: str, seed: int = 0
) -> tuple[dict[str, Any], np.ndarray]:
    """The ``calibration`` record of metrics.json for a temperature fitted on these labelled images.

    Args:
        probs: Uncalibrated image probabilities of the labelled images, ``[n, C]`` (``n >= 2``).
        y_true: Their true class indices.
        temperature: The temperature fitted on all of them (what the model applies).
        fitted_on: What the images are (``"validation"``, ``"out_of_fold"``).
        seed: Seed of the cross-fitting folds.

    Returns:
        ``(record, cross-fitted probabilities)``. ``record``: ``temperature``, ``fitted_on``, ``n_images``,
        ``before`` (``{ece, brier, nll}`` of ``probs``), ``after`` (of the cross-fitted probabilities: the honest
        estimate), ``after_in_sample`` (of ``probs`` scaled by ``temperature``, which was fitted on them: optimistic)
        and ``cross_fit_folds``.
    """
    crossed, k = cross_fitted_probs(probs, y_true, seed)
    record = {
        "temperature": float(temperature),
        "fitted_on": fitted_on,
        "n_images": int(len(y_true)),
        "before": calibration_metrics(y_true, probs),
        "after": calibration_metrics(y_true, crossed),
        "after_in_sample": calibration_metrics(y_true, apply_temperature(probs, temperature)),
        "cross_fit_folds": k,
    }
    return record, crossed


def with_temperature(
    result: ImageLevelResult, temperature: float | None, calibration: dict[str, Any] | None
) -> ImageLevelResult:
    """``result`` with its probabilities scaled by ``temperature`` and the metrics recomputed.

    ``result.probs`` must be uncalibrated. The uncalibrated probabilities are kept in
    ``calibration["uncalibrated_probs"]`` (so that a later fit starts again from them); the bootstrap interval
    and patch metrics stay (scaling keeps every argmax and happens after the patches are aggregated).
    """
    raw = result.probs_array
    probs = apply_temperature(raw, temperature)
    y = np.asarray(result.y_true, dtype=np.int64)
    metrics = classification_metrics(y[y >= 0], probs[y >= 0], result.labels)
    record = {**(calibration or {}), "uncalibrated_probs": raw.tolist()}
    return dataclasses.replace(
        result, probs=probs.tolist(), metrics=metrics, temperature=temperature, calibration=record
    )


def uncalibrated(result: ImageLevelResult) -> ImageLevelResult:
    """``result`` as it was before `with_temperature` (itself when it was never scaled)."""
    raw = (result.calibration or {}).get("uncalibrated_probs")
    if raw is None:
        return result
    y = np.asarray(result.y_true, dtype=np.int64)
    raw = np.asarray(raw, dtype=np.float64)
    metrics = classification_metrics(y[y >= 0], raw[y >= 0], result.labels)
    return dataclasses.replace(result, probs=raw.tolist(), metrics=metrics, temperature=None, calibration=None)


def calibrate_result(
    result: ImageLevelResult, fitted_on: str, seed: int = 0
) -> tuple[ImageLevelResult, float | None, np.ndarray | None]:
    """Fit a temperature on the labelled images of an uncalibrated result and apply it to all its images.

    Args:
        result: Uncalibrated image-level result (e.g. the engine's with ``calibrate=False``).
        fitted_on: What the images are, for the record (``"validation"``, ``"out_of_fold"``).
        seed: Seed of the cross-fitting folds.

    Returns:
        ``(calibrated result, T, cross-fitted probabilities of the labelled images)``; with fewer than 2 labelled
        images nothing is fitted: ``(result, None, None)``.
    """
    y = np.asarray(result.y_true, dtype=np.int64)
    keep = y >= 0
    if keep.sum() < 2:
        return result, None, None
    raw = result.probs_array
    temperature = fit_temperature(raw[keep], y[keep])
    record, crossed = calibration_record(raw[keep], y[keep], temperature, fitted_on, seed)
    return with_temperature(result, temperature, record), temperature, crossed
