"""A model folder's splits.json (image ids and content fingerprints per split) and which images a model trained on."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.fingerprint import file_digest
from ..data.listings import few
from ..data.sources import Sample
from .loading import ModelSource, fold_dirs

SPLITS_NAME = "splits.json"
FINGERPRINTS = "fingerprints"  # splits.json key: {split: {image_id: digest of the image file's bytes}}

logger = logging.getLogger(__name__)


def splits_record(split_ids: Mapping[str, Sequence[str]], samples: Sequence[Sample]) -> dict[str, Any]:
    """The content of a model folder's splits.json.

    ``{"train": [image_id, ...], "validation": [...], "test": [...], "fingerprints": {"train": {image_id: digest},
    ...}}``: the digest is the data cache's content hash of the image file (`file_digest`), so an image is recognised
    under another name or in another folder (not once re-encoded).

    Args:
        split_ids: The image ids of each split.
        samples: The samples the ids come from (an id without a sample gets no fingerprint).
    """
    paths = {s.image_id: s.image_path for s in samples}
    record: dict[str, Any] = {name: sorted(ids) for name, ids in split_ids.items()}
    record[FINGERPRINTS] = {
        name: {i: file_digest(paths[i]) for i in ids if i in paths} for name, ids in list(record.items())
    }
    return record


def _model_folders(model: ModelSource) -> list[Path]:
    """The local folders whose splits.json describe a model: the folder, a CV root's folds, or the list; [] for a Hub id."""
    if isinstance(model, str):
        model = os.path.expanduser(model)
    try:
        folds = fold_dirs(model)
    except FileNotFoundError:
        return []
    if folds is not None:
        return folds
    return [Path(model)] if Path(model).is_dir() else []


def _digests(samples: Sequence[Sample]) -> dict[str, str]:
    digests = {}
    for s in samples:
        try:
            digests[s.image_id] = file_digest(Path(s.image_path))
        except OSError:  # unreadable: the evaluation reports it
            continue
    return digests


def trained_on(model: ModelSource, samples: Sequence[Sample]) -> list[str]:
    """The ids of the samples the model trained on, per its splits.json; logs one warning when there are any.

    A sample counts when it is a ``train`` image of the model, or of any fold of a cross-validation ensemble (each
    fold trained on most images). Images are matched by content when splits.json has fingerprints (image ids alone
    collide across data sets: ``img_0000`` in two folders), by image id for folders written before (the warning then
    says "by name"). Models without a local splits.json (Hub ids) are not checked.

    Args:
        model: What `load_engine` loads: a model folder, a CV root, a list of folders, or a Hub id.
        samples: The images about to be evaluated.

    Returns:
        The matching image ids, sorted.
    """
    matched: dict[str, set[str]] = {}
    by_name: list[str] = []
    digests: dict[str, str] | None = None  # computed once, for the first folder that has fingerprints
    for folder in _model_folders(model):
        path = folder / SPLITS_NAME
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # no splits.json (a folder saved by hand) or an unreadable one
            continue
        fingerprints = (record.get(FINGERPRINTS) or {}).get("train")
        if fingerprints:
            digests = _digests(samples) if digests is None else digests
            trained = set(fingerprints.values())
            matched[folder.name] = {i for i, digest in digests.items() if digest in trained}
        else:
            train = set(record.get("train") or [])
            matched[folder.name] = {s.image_id for s in samples if s.image_id in train}
            by_name.append(folder.name)
    ids = sorted(set().union(*matched.values()))
    if ids:
        how = "by content"
        if by_name:
            how = (
                f"by name: the splits.json of {few(by_name)} has no content fingerprints (written by an older "
                "hf-histo), so an image of another data set with the same name counts too"
            )
        folds = "; per fold: " + ", ".join(f"{k} {len(v)}" for k, v in matched.items()) if len(matched) > 1 else ""
        logger.warning(
            "%d of %d evaluated images are images the model trained on (matched %s%s): %s. The figures are "
            "optimistic: evaluate on images the model has not seen.",
            len(ids),
            len(samples),
            how,
            folds,
            few(ids),
        )
    return ids
