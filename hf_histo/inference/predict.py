"""Predict every image of a data folder into a submission CSV (`hf-histo predict`)."""

from __future__ import annotations

import copy
import csv
import io
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..data.images import DataError
from ..data.sources import OnError, Sample, SampleSet, read_samples
from ..utils import atomic_write_text, csv_safe
from .engine import (
    DEFAULT_NUM_WORKERS,
    ITEM_ERRORS,
    InferenceEngine,
    check_aggregation,
    check_num_workers,
    check_tta,
    item_error,
)
from .loading import ModelSource, check_output_file, load_engine
from .roi import RoiSegmenter, load_roi

logger = logging.getLogger("hf_histo.inference")  # predict, evaluate and explain report failures here

SUBMISSION_COLUMNS = ("sample_index", "label")
ERROR_COLUMN = "error"
MASK_SOURCE_COLUMN = "mask_source"  # with an ROI model: where each image's region came from
SKIP_HINT = "pass --on_error skip (on_error='skip') to go on with the other images and list this one"


def check_on_error(on_error: str) -> OnError:
    """Return ``on_error`` if it is ``"raise"`` or ``"skip"``; raise a clear error otherwise."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return on_error  # type: ignore[return-value]


def with_skip_hint(error: Exception, name: str | None, where: str) -> DataError:
    """A bad image's error (naming it) that also says how to keep going: `--on_error skip` and where it is listed."""
    error = item_error(error, name)
    return DataError(f"{str(error).rstrip('.')}; or {SKIP_HINT} {where}.")


def log_failures(failed: Sequence[tuple[str, str]], total: int, where: str) -> None:
    """One warning: how many images failed, where they are listed, and each file with its reason."""
    if failed:
        lines = [reason if name in reason else f"{name}: {reason}" for name, reason in failed]
        logger.warning("%d of %d images failed (%s):\n  %s", len(failed), total, where, "\n  ".join(lines))


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


def _select_split(sample_set: SampleSet, split: str | None) -> tuple[list[Sample], str]:
    """The samples `predict_folder` predicts, and how to name them in a message.

    None takes every image, except on the challenge layout: its `test_data` images (a submission); a challenge folder
    without them gives its train_data images, with a warning.
    """
    if split is not None:
        return sample_set.select(split), f"split {split!r}"
    if sample_set.layout != "challenge":
        return sample_set.samples, "all images"
    if sample_set.test:
        return sample_set.test, "split 'test', the challenge layout's default: --split all for every image"
    logger.warning(
        "%s: no test_data/ images, so the %d train_data images are predicted; pass --split train (split='train') to "
        "say so, or add the images to submit to test_data/.",
        sample_set.root,
        len(sample_set.samples),
    )
    return sample_set.samples, "split 'train': no test_data/ images"


def predict_folder(
    model_dir: ModelSource | InferenceEngine,
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
    max_image_pixels: int | None = None,
    on_error: str = "raise",
    masks: str | os.PathLike | None = None,
    split: str | None = None,
    num_workers: int = DEFAULT_NUM_WORKERS,
    calibrate: bool = True,
    roi_model: str | os.PathLike | RoiSegmenter | bool | None = None,
) -> Path:
    """Classify the images of a folder (or one image file) and write the challenge's submission CSV.

    Every image is predicted, labelled or not, except on the challenge layout, where the default is the `test_data`
    images only (a valid submission); `split` chooses. Each image is patched with its mask when there is one and with
    tissue detection otherwise, by the inference engine `pipeline("histo-image-classification")` runs on. The output
    path is checked before any work; how many rows were written, and of which split, is logged (info).

    Args:
        model_dir: Checkpoint folder (or Hub id) saved by hf-histo, a cross-validation root (fold ensemble), or a
            loaded `InferenceEngine` (its model is reused; `batch_size`, `aggregation`, `tta` and `num_workers`
            still apply).
        data_dir: Data folder in any layout `read_samples` knows (a plain folder of images too), a clean manifest
            CSV, or one image file.
        out_csv: CSV to write (atomically): `sample_index,label`, one row per image in image-id order;
            `sample_index` is the image's file name as in the data. With `on_error="skip"` and a failed image, an
            `error` column says why (empty for the images that were predicted; their label is empty). Cells a
            spreadsheet would run as a formula get a leading `'`, except the challenge layout's `sample_index`.
        layout: Force the data layout; detected when None.
        probs: Add one probability column per class, named by the label, in the model's class order.
        batch_size: Patches per forward pass.
        aggregation: `"soft"`, `"hard"` or `"mask_weighted"`; the model config's choice when None.
        tta: `"none"`, `"flips"` or `"d4"` views averaged per patch; the model config's choice when None.
        device: Torch device (e.g. `"cuda"`); CUDA when available.
        progress: Show a progress bar.
        resize_masks: Resize masks whose size differs from their image instead of failing.
        max_image_pixels: Raise PIL's decompression-bomb limit for trusted large images.
        on_error: `"raise"` stops at the first bad image (nothing is written); `"skip"` goes on, gives the bad image
            a row with its `error`, leaves unreadable data rows out, and logs every failure in one warning.
        masks: A folder of masks named like the images (`masks/<image name>`), or one mask file when `data_dir` is one
            image file; a given mask overrides the layout's own for its image (see `read_samples`).
        split: `"all"`, `"train"` or `"test"` (`Sample.split`); None: the challenge layout's `test_data` images (its
            `train_data` images, with a warning, when there are none), every image of the other layouts.
            `"train"`/`"test"` need a layout with splits (challenge, table, manifest).
        num_workers: Threads that decode and patch the next images while the model runs (0: none, one image at a
            time); the CSV is the same for any value.
        calibrate: Scale the image probabilities by the model's temperature (`config.calibration_temperature`, fitted on its
            validation images), as its reported figures are; False: the raw aggregated probabilities.
        roi_model: ROI segmentation model (folder or Hub id) whose predicted region patches the images without a mask;
            None: the model config's `roi_model` when set, else tissue detection; False: tissue detection. With one,
            a `mask_source` column says per image where its region came from (`roi_model`, `mask`,
            `empty_roi_tissue`: it predicted none, ...).

    Returns:
        `out_csv` as a `Path`.

    Raises:
        DataError: A data problem, naming the file (unreadable image, mask of the wrong size, ...), a split the data
            does not have, or an output path that cannot be written.
    """
    from tqdm.auto import tqdm

    check_on_error(on_error)
    num_workers = check_num_workers(num_workers)
    out_csv = check_output_file(out_csv, "submission.csv")
    sample_set = read_samples(data_dir, layout=layout, on_error=on_error, masks=masks)
    samples, chosen = _select_split(sample_set, split)
    if isinstance(model_dir, InferenceEngine):  # e.g. the web app's loaded model: the overrides go on a copy
        engine = copy.copy(model_dir)
        engine.batch_size = batch_size
        engine.aggregation = check_aggregation(aggregation) if aggregation else engine.aggregation
        engine.tta = check_tta(tta) if tta else engine.tta
        engine.max_image_pixels = max_image_pixels if max_image_pixels is not None else engine.max_image_pixels
        engine.num_workers = num_workers
        engine.calibrate = calibrate
        if roi_model is not None:
            engine.roi = load_roi(roi_model, engine.model.config, engine.device)
    else:
        engine = load_engine(
            model_dir,
            device=device,
            batch_size=batch_size,
            aggregation=aggregation,
            tta=tta,
            max_image_pixels=max_image_pixels,
            calibrate=calibrate,
            roi_model=roi_model,
        )
        engine.num_workers = num_workers
    labels = engine.labels
    names = _sample_names(samples, sample_set.root)
    ids_as_given = sample_set.layout == "challenge"  # the challenge's sample_index cells are the grader's ids

    rows, failed = [], []
    sources = engine.roi is not None  # a mask_source column with an ROI model
    items = ((s.image_path, s.mask_path, s.image_id) for s in samples)
    results = engine.predict_many(items, resize_mask=resize_masks, return_errors=on_error == "skip")
    bar = tqdm(total=len(samples), desc="predict", unit="image", disable=not progress)
    try:
        for name in names:
            try:
                result = next(results)
            except ITEM_ERRORS as e:  # the engine reads ahead: the message names the file, not `sample`
                raise with_skip_hint(e, None, "in the CSV's error column") from e
            bar.update()
            if isinstance(result, DataError):
                failed.append((name, str(result)))
                rows.append(
                    [name, "", *([""] * len(labels) if probs else []), *([""] if sources else []), str(result)]
                )
            else:
                cells = [f"{p:.6f}" for p in result.probs] if probs else []
                rows.append([name, result.label, *cells, *([result.mask_source] if sources else []), ""])
    finally:
        bar.close()

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = [*SUBMISSION_COLUMNS, *(labels if probs else []), *([MASK_SOURCE_COLUMN] if sources else [])]
    header += [ERROR_COLUMN] if failed else []
    writer.writerow([csv_safe(cell) for cell in header])
    for name, *cells in rows:
        cells = cells if failed else cells[:-1]
        writer.writerow([name if ids_as_given else csv_safe(name), *(csv_safe(cell) for cell in cells)])
    path = atomic_write_text(out_csv, buffer.getvalue())
    logger.info(
        "wrote %d rows to %s (%s) from %s (%s layout)", len(rows), path, chosen, sample_set.root, sample_set.layout
    )
    log_failures(failed, len(samples), f"error column of {path}")
    log_failures(sample_set.skipped, len(samples) + len(sample_set.skipped), "data rows left out of the CSV")
    return path
