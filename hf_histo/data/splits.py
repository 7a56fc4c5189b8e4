"""Grouped, stratified train/validation splits and k-fold assignments of images (made before patching)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np

from .sources import DataError, Sample

logger = logging.getLogger(__name__)

__all__ = ["fold_assignments", "split_samples"]

_said: set[str] = set()  # fold notes already given in this process


def _arrays(samples: Sequence[Sample]) -> tuple[list[Sample], np.ndarray, np.ndarray]:
    ordered = sorted(samples, key=lambda s: s.image_id)  # input order must not change the split
    labels = np.array([s.label or "" for s in ordered], dtype=object)
    groups = np.array([s.group_id for s in ordered], dtype=object)
    return ordered, labels, groups


def _groups_per_class(labels: np.ndarray, groups: np.ndarray) -> dict[str, int]:
    return {c: len(set(groups[labels == c])) for c in sorted(set(labels))}


def _group_folds(labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> tuple[np.ndarray, str | None]:
    """Fold index of every sample: StratifiedGroupKFold, or GroupKFold when stratifying is impossible.

    Returns:
        ``(folds, reason)``: ``reason`` says why the folds are by group only, None when they are stratified.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    folds = np.full(len(labels), -1, dtype=np.int64)
    x = np.zeros((len(labels), 1))
    try:
        if max(_groups_per_class(labels, groups).values()) < n_folds:
            raise ValueError(f"no class has {n_folds} groups")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class": the callers say it in our words
            for fold, (_, val_idx) in enumerate(splitter.split(x, labels, groups)):
                folds[val_idx] = fold
        if any(not (folds == f).any() for f in range(n_folds)):
            raise ValueError("a fold came out empty")
        return folds, None
    except ValueError as e:
        folds[:] = -1
        for fold, (_, val_idx) in enumerate(
            GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x, labels, groups)
        ):
            folds[val_idx] = fold
        return folds, str(e)


def fold_assignments(samples: Sequence[Sample], n_folds: int, seed: int = 0) -> dict[str, int]:
    """Assign every image to one of ``n_folds`` validation folds, whole groups together, stratified by label.

    Args:
        samples: Labelled samples (test samples do not belong in folds).
        n_folds: Number of folds (at least 2, at most the number of groups).
        seed: Shuffling seed; the same seed gives the same folds.

    Returns:
        ``{image_id: fold}``.

    Raises:
        DataError: Fewer groups than folds.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    ordered, labels, groups = _arrays(samples)
    n_groups = len(set(groups.tolist()))
    if n_groups < n_folds:
        raise DataError(
            f"{n_folds} folds need at least {n_folds} groups (patients), but the data has {n_groups}; "
            "use fewer folds or add data."
        )
    folds, unstratified = _group_folds(labels, groups, n_folds, seed)
    group_count = _groups_per_class(labels, groups)
    short = [c for c, n in group_count.items() if n < n_folds]
    if unstratified:
        note = (
            f"cannot stratify {len(labels)} images of {n_groups} groups into {n_folds} folds by label "
            f"(groups per class: {group_count}; {unstratified}); splitting by group only."
        )
    else:
        note = f"classes {short} have fewer groups than the {n_folds} folds: some folds miss them" if short else ""
    if note and note not in _said:  # once per process: cross-validation asks once per fold
        _said.add(note)
        if unstratified:
            warnings.warn(note, UserWarning, stacklevel=2)
        else:
            logger.info("%s", note)
    return {s.image_id: int(f) for s, f in zip(ordered, folds)}


def split_samples(
    samples: Sequence[Sample],
    val_fraction: float = 0.1,
    seed: int = 0,
    n_folds: int | None = None,
    fold: int | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """Split images into train and validation: whole groups only, stratified by label, deterministic per seed.

    A single split uses ``StratifiedGroupKFold`` with ``round(1 / val_fraction)`` folds (at most the
    number of groups) and takes fold 0 as validation; with ``n_folds`` the validation part is fold
    ``fold``. When labels cannot be stratified (no class has as many groups as there are folds), the
    split is by group only (``GroupKFold`` with shuffling): with ``n_folds`` a warning says so; a single split
    only logs (INFO) the classes left without a validation image.

    Args:
        samples: Labelled samples.
        val_fraction: Share of the groups kept for validation (0: no validation set).
        seed: Shuffling seed.
        n_folds: Cross-validation folds (overrides ``val_fraction``).
        fold: Which fold is validation, 0 to ``n_folds - 1``.

    Returns:
        ``(train, validation)`` sample lists, sorted by ``image_id``.

    Raises:
        DataError: Fewer than two groups while a validation set is asked for.
    """
    ordered = sorted(samples, key=lambda s: s.image_id)
    if n_folds is not None:
        fold = 0 if fold is None else fold
        if not 0 <= fold < n_folds:
            raise ValueError(f"fold must be in [0, {n_folds}), got {fold}")
        assignment = fold_assignments(ordered, n_folds, seed)
        return (
            [s for s in ordered if assignment[s.image_id] != fold],
            [s for s in ordered if assignment[s.image_id] == fold],
        )
    if fold is not None:
        raise ValueError("fold needs n_folds")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0 or not ordered:
        return ordered, []
    n_groups = len({s.group_id for s in ordered})
    if n_groups < 2:
        raise DataError(
            f"a validation split needs at least 2 groups (patients), but the {len(ordered)} images have "
            f"{n_groups}; pass val_fraction=0 or add data."
        )
    n_splits = min(max(round(1.0 / val_fraction), 2), n_groups)
    _, labels, groups = _arrays(ordered)
    folds, _ = _group_folds(labels, groups, n_splits, seed)  # by group only when stratifying is impossible
    train = [s for s, f in zip(ordered, folds) if f != 0]
    validation = [s for s, f in zip(ordered, folds) if f == 0]
    missing = sorted({s.label for s in train if s.label} - {s.label for s in validation})
    if missing:  # what matters to the run (stratified or not): its validation figures say nothing of these classes
        logger.info(
            "the validation split (%d images of %d groups) has no image of %s: its figures do not cover them",
            len(validation),
            len({s.group_id for s in validation}),
            ", ".join(missing),
        )
    return train, validation
