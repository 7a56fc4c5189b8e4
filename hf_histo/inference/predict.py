"""Predict every image of a data folder into a submission CSV (`hf-histo predict`)."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from pathlib import Path

from ..data.sources import Sample, read_samples
from ..utils import atomic_write_text
from .loading import ModelSource, load_engine

SUBMISSION_COLUMNS = ("sample_index", "label")


def _sample_names(samples: list[Sample], root: Path) -> list[str]:
    """File names as in the data; the path relative to the data folder where two files share a name."""
    counts = Counter(s.image_path.name for s in samples)
    base = root if root.is_dir() else root.parent
    names = []
    for sample in samples:
        name = sample.image_path.name
        if counts[name] > 1:
            try:
                name = sample.image_path.relative_to(base).as_posix()
            except ValueError:
                name = sample.image_path.as_posix()
        names.append(name)
    return names


def predict_folder(
    model_dir: ModelSource,
    data_dir: str | os.PathLike,
    out_csv: str | os.PathLike,
    *,
    layout: str | None = None,
    probs: bool = False,
    batch_size: int = 32,
    aggregation: str | None = None,
    tta: str | None = None,
    device: str | None = None,
    progress: bool = True,
    resize_masks: bool = False,
) -> Path:
    """Classify every image of a folder and write the challenge's submission CSV.

    All images are predicted, labelled or not (train and test samples alike), each patched with its mask when the
    data has one and with tissue detection otherwise, by the inference engine `pipeline("histo-image-classification")`
    runs on.

    Args:
        model_dir: Checkpoint folder (or Hub id) saved by hf-histo, or a cross-validation root (fold ensemble).
        data_dir: Data folder in any layout `read_samples` knows, or a clean manifest CSV.
        out_csv: CSV to write (atomically): `sample_index,label`, one row per image in image-id order;
            `sample_index` is the image's file name as in the data.
        layout: Force the data layout; detected when None.
        probs: Add one probability column per class, named by the label, in the model's class order.
        batch_size: Patches per forward pass.
        aggregation: `"soft"`, `"hard"` or `"mask_weighted"`; the model config's choice when None.
        tta: `"none"`, `"flips"` or `"d4"` views averaged per patch; the model config's choice when None.
        device: Torch device (e.g. `"cuda"`); CUDA when available.
        progress: Show a progress bar.
        resize_masks: Resize masks whose size differs from their image instead of failing.

    Returns:
        `out_csv` as a `Path`.

    Raises:
        DataError: A data problem, naming the file (unreadable image, mask of the wrong size, ...).
    """
    from tqdm.auto import tqdm

    sample_set = read_samples(data_dir, layout=layout)
    samples = sample_set.samples
    engine = load_engine(model_dir, device=device, batch_size=batch_size, aggregation=aggregation, tta=tta)
    labels = engine.labels
    names = _sample_names(samples, sample_set.root)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*SUBMISSION_COLUMNS, *(labels if probs else [])])
    items = ((s.image_path, s.mask_path, s.image_id) for s in samples)
    predictions = engine.predict_many(items, resize_mask=resize_masks)
    for name, prediction in zip(
        names, tqdm(predictions, total=len(samples), desc="predict", unit="image", disable=not progress)
    ):
        row = [name, prediction.label]
        if probs:
            row += [f"{p:.6f}" for p in prediction.probs]
        writer.writerow(row)
    return atomic_write_text(out_csv, buffer.getvalue())
