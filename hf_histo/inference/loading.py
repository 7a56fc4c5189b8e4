"""Load a trained model folder (or a cross-validation root as a fold ensemble) into an `InferenceEngine`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..models.ensemble import FoldEnsemble
from .engine import DEFAULT_BATCH_SIZE, InferenceEngine

ModelSource = str | os.PathLike | Sequence[str | os.PathLike]


def _fold_dirs(source: ModelSource) -> list[Path] | None:
    """The fold folders of a CV root or a list of folders; None for a single model folder (or a Hub id)."""
    if not isinstance(source, (str, os.PathLike)):
        return [Path(p) for p in source]
    root = Path(source)
    if (root / "config.json").is_file() or not root.is_dir():
        return None
    folds = sorted(p for p in root.glob("fold_*") if (p / "config.json").is_file())
    if not folds:
        raise FileNotFoundError(f"{root}: no config.json and no fold_*/config.json; pass a trained model folder.")
    return folds


def load_engine(
    model: ModelSource,
    *,
    device: str | torch.device | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    aggregation: str | None = None,
    tta: str | None = None,
) -> InferenceEngine:
    """The inference engine of a trained hf-histo model folder, Hub id, CV root (fold ensemble) or list of folders.

    Args:
        model: A model folder or Hub id; a cross-validation root (its ``fold_*`` models are averaged); or a list of
            model folders.
        device: Torch device (default: CUDA when available).
        batch_size: Patches per forward pass.
        aggregation: Override of the model's aggregation.
        tta: Override of the model's TTA (``none``, ``flips``, ``d4``).

    Raises:
        FileNotFoundError: A folder that holds no model.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folds = _fold_dirs(model)
    if folds is None:
        if isinstance(model, (str, os.PathLike)) and os.path.exists(model) and not Path(model).is_dir():
            raise FileNotFoundError(f"{model}: not a model folder; pass the folder a recipe wrote.")
        first = os.fspath(model)
        network = AutoModelForImageClassification.from_pretrained(first)
    else:
        for fold in folds:
            if not (fold / "config.json").is_file():
                raise FileNotFoundError(f"{fold}: no config.json; pass trained model folders.")
        first = os.fspath(folds[0])
        network = FoldEnsemble.from_pretrained(folds)
    processor = AutoImageProcessor.from_pretrained(first)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return InferenceEngine(network.to(device), processor, aggregation=aggregation, tta=tta, batch_size=batch_size)
