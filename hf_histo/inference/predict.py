"""Predict every image of a data folder into a submission CSV (`hf-histo predict`)."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from pathlib import Path

from ..data.sources import DataError, Sample, load_image, read_samples
from ..utils import atomic_write_text
from .pipeline import load_pipeline

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
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_csv: str | os.PathLike,
    *,
    layout: str | None = None,
    probs: bool = False,
    batch_size: int = 32,
    aggregation: str | None = None,
    tta: bool = False,
    device: int | str | None = None,
    progress: bool = True,
    resize_masks: bool = False,
) -> Path:
    """Classify every image of a folder and write the challenge's submission CSV.

    All images are predicted, labelled or not (train and test samples alike), each patched with its mask when the
    data has one and with tissue detection otherwise, exactly as `pipeline("histo-image-classification")` does.

    Args:
        model_dir: Checkpoint folder (or Hub id) saved by hf-histo.
        data_dir: Data folder in any layout `read_samples` knows, or a clean manifest CSV.
        out_csv: CSV to write (atomically): `sample_index,label`, one row per image in image-id order;
            `sample_index` is the image's file name as in the data.
        layout: Force the data layout; detected when None.
        probs: Add one probability column per class, named by the label, in the model's class order.
        batch_size: Patches per forward pass.
        aggregation: `"soft"`, `"hard"` or `"mask_weighted"`; the model config's choice when None.
        tta: Average each patch over flips and 90-degree rotations.
        device: Torch device or index (e.g. `"cuda"`); the default device when None.
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
    pipe = load_pipeline(model_dir, device=device, batch_size=batch_size)
    config = pipe.model.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    names = _sample_names(samples, sample_set.root)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*SUBMISSION_COLUMNS, *(labels if probs else [])])
    for name, sample in zip(tqdm(names, desc="predict", unit="image", disable=not progress), samples):
        try:
            result = pipe(
                load_image(sample.image_path),
                mask=sample.mask_path,
                aggregation=aggregation,
                tta=tta,
                top_k=len(labels),
                return_patches=True,
                resize_mask=resize_masks,
            )
        except DataError:
            raise
        except ValueError as error:  # mask/image problems from the shipped code: name the file
            raise DataError(f"{sample.image_path}: {error}") from error
        scores = {entry["label"]: entry["score"] for entry in result["predictions"]}
        row = [name, result["predictions"][0]["label"]]
        if probs:
            row += [f"{scores[label]:.6f}" for label in labels]
        writer.writerow(row)
    return atomic_write_text(out_csv, buffer.getvalue())
