"""Patch-to-image aggregation of class probabilities (soft, hard and mask-weighted votes) and temperature scaling."""

# This module ships with model checkpoints (flattened next to the modeling code): stdlib + numpy only.

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# "attention": the gated-attention MIL head of the model over the patch embeddings (models/mil.py), computed by the
# inference engine; the votes of this module cannot compute it from patch probabilities.
AGGREGATIONS = ("soft", "hard", "mask_weighted", "attention")
VOTES = ("soft", "hard", "mask_weighted")
# Test-time augmentation: the views whose softmax is averaged per patch before the image vote (identity; + h/v
# flips; the 8 flips and quarter turns). Here, not in the config module, so the CLI lists them without transformers.
TTA_MODES = ("none", "flips", "d4")

# Added to the tie-winner's vote fraction (before renormalising) so that argmax names the winner.
TIE_EPSILON = 1e-6


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be a 2-D array [n_patches, n_classes], got shape {probs.shape}")
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs must have at least one patch and one class, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or infinite values")
    return probs


def _check_weights(weights: np.ndarray | Sequence[float] | None, n: int) -> np.ndarray:
    if weights is None:
        raise ValueError('method="mask_weighted" needs weights (foreground pixel counts or fractions per patch)')
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},) (one per patch), got {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("weights must be finite and non-negative")
    return weights


def _check_method(method: str) -> None:
    if method == "attention":
        raise ValueError(
            'aggregation "attention" needs the model\'s MIL head over the patch embeddings, not patch probabilities: '
            "predict with hf_histo.InferenceEngine (or the pipeline), or use soft, hard or mask_weighted here"
        )
    if method not in VOTES:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {AGGREGATIONS}")


def hard_vote_from_counts(votes: np.ndarray, mean_probs: np.ndarray) -> np.ndarray:
    """Turn vote counts into an image vector whose argmax is the majority-vote winner.

    The result is the vote fractions ``votes / votes.sum()``. When several classes share the top
    vote count, the winner is the tied class with the highest mean probability (then the lowest
    index); it gets ``TIE_EPSILON`` extra before the vector is renormalised to sum to 1, so that
    ``np.argmax(result) == winner``. Works row-wise on ``[..., C]`` arrays.

    Args:
        votes: Per-class vote counts (number of patches whose argmax is that class), ``[..., C]``.
        mean_probs: Per-class mean patch probability, same shape, used only to break ties.

    Returns:
        Float64 array of the same shape, each row summing to 1.
    """
    votes = np.asarray(votes, dtype=np.float64)
    mean_probs = np.asarray(mean_probs, dtype=np.float64)
    if votes.shape != mean_probs.shape:
        raise ValueError(f"votes {votes.shape} and mean_probs {mean_probs.shape} must have the same shape")
    totals = votes.sum(axis=-1, keepdims=True)
    if np.any(totals <= 0):
        raise ValueError("every row of votes needs at least one vote")
    fractions = votes / totals
    tied = votes == votes.max(axis=-1, keepdims=True)
    n_tied = tied.sum(axis=-1)
    # Among the tied classes pick the highest mean probability; np.argmax keeps the lowest index on equality.
    winner = np.argmax(np.where(tied, mean_probs, -np.inf), axis=-1)
    bonus = np.zeros_like(fractions)
    np.put_along_axis(bonus, winner[..., None], np.where(n_tied > 1, TIE_EPSILON, 0.0)[..., None], axis=-1)
    fractions = fractions + bonus
    return fractions / fractions.sum(axis=-1, keepdims=True)


def aggregate(
    probs: np.ndarray, method: str = "soft", weights: np.ndarray | Sequence[float] | None = None
) -> np.ndarray:
    """Aggregate the patch probabilities of one image into one image probability vector.

    Args:
        probs: Patch class probabilities, ``[n_patches, C]``.
        method: ``"soft"``: mean probability. ``"hard"``: majority vote of the per-patch argmax; the
            result is the vote fractions, ties broken by mean probability (see
            :func:`hard_vote_from_counts`). ``"mask_weighted"``: mean weighted by ``weights``; falls
            back to ``"soft"`` when the weights sum to 0.
        weights: One non-negative weight per patch (foreground pixel count or fraction); only used
            (and required) by ``"mask_weighted"``.

    Returns:
        Float64 array ``[C]``.

    Raises:
        ValueError: On an unknown method or ``"attention"`` (the engine computes it), a non-2-D or empty
            ``probs``, non-finite values, or weights of the wrong shape or sign.
    """
    _check_method(method)
    probs = _check_probs(probs)
    if method == "hard":
        votes = np.bincount(np.argmax(probs, axis=1), minlength=probs.shape[1])
        return hard_vote_from_counts(votes, probs.mean(axis=0))
    if method == "mask_weighted":
        weights = _check_weights(weights, probs.shape[0])
        total = weights.sum()
        if total > 0:
            return weights @ probs / total
    return probs.mean(axis=0)


def aggregate_by_image(
    image_ids: Sequence[str],
    probs: np.ndarray,
    method: str = "soft",
    weights: np.ndarray | Sequence[float] | None = None,
) -> tuple[list[str], np.ndarray]:
    """Aggregate the patches of many images at once, grouping them by ``image_ids``.

    Args:
        image_ids: Image id of each patch, ``n_patches`` long; patches of one image need not be contiguous.
        probs: Patch class probabilities, ``[n_patches, C]``.
        method: One of :data:`VOTES`, as in :func:`aggregate` (``"attention"`` raises: it needs the model).
        weights: Per-patch weights for ``"mask_weighted"``.

    Returns:
        ``(ids, image_probs)``: the unique image ids in order of first appearance and the
        ``[n_images, C]`` aggregated probabilities in the same order.
    """
    _check_method(method)
    probs = _check_probs(probs)
    ids = [str(i) for i in image_ids]
    if len(ids) != probs.shape[0]:
        raise ValueError(f"got {len(ids)} image_ids for {probs.shape[0]} patch probability rows")
    if method == "mask_weighted":
        weights = _check_weights(weights, probs.shape[0])
    index: dict[str, int] = {}
    rows = np.fromiter((index.setdefault(i, len(index)) for i in ids), dtype=np.int64, count=len(ids))
    n_images, n_classes = len(index), probs.shape[1]
    counts = np.bincount(rows, minlength=n_images).astype(np.float64)
    sums = np.zeros((n_images, n_classes))
    np.add.at(sums, rows, probs)
    means = sums / counts[:, None]
    if method == "soft":
        out = means
    elif method == "hard":
        votes = np.zeros((n_images, n_classes))
        np.add.at(votes, (rows, np.argmax(probs, axis=1)), 1.0)
        out = hard_vote_from_counts(votes, means)
    else:
        weight_sums = np.bincount(rows, weights=weights, minlength=n_images)
        weighted = np.zeros((n_images, n_classes))
        np.add.at(weighted, rows, probs * weights[:, None])
        has_weight = weight_sums > 0
        out = np.where(has_weight[:, None], weighted / np.where(has_weight, weight_sums, 1.0)[:, None], means)
    return list(index), out


def apply_temperature(probs: np.ndarray, temperature: float | None) -> np.ndarray:
    """Temperature-scale image probabilities: ``softmax(log(clip(p, 1e-12)) / T)`` row-wise.

    The log-probabilities stand for the logits (for a softmax head they equal them up to a constant per row), so
    the row's order, and hence its argmax, is kept; ``T > 1`` softens over-confident probabilities, ``T < 1``
    sharpens them.

    Args:
        probs: Probabilities ``[C]`` or ``[n, C]`` (rows summing to 1).
        temperature: ``T > 0``; None (or 1) returns the probabilities unchanged (as float64).

    Returns:
        Float64 array of the same shape, each row summing to 1.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if temperature is None or temperature == 1.0:
        return probs
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = np.log(np.clip(probs, 1e-12, None)) / float(temperature)
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)
