"""Predict the region-of-interest mask of every image into a table-layout data folder (`hf-histo segment`)."""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.images import DataError, load_rgb
from ..data.sources import Sample, read_samples
from ..utils import atomic_path, atomic_save_image, atomic_write_text
from .engine import ITEM_ERRORS, item_error
from .loading import check_model_source, check_output_folder
from .predict import check_on_error, log_failures, with_skip_hint
from .roi import RoiSegmenter, mask_png

logger = logging.getLogger("hf_histo.inference")

OUTPUTS = ("images", "masks", "labels.csv")  # what `segment_folder` writes in its folder: the table layout
LABEL_HEADER = ("filename", "label", "patient_id", "split")  # columns the table layout reads (data/layouts.py)


@dataclass
class SegmentResult:
    """What `segment_folder` wrote.

    Attributes:
        out_dir: The table-layout folder (``images/``, ``masks/`` and, for labelled data, ``labels.csv``).
        written: Ids of the images written, with their masks.
        skipped: ``(file, reason)`` of each image (or data row) left out.
        labelled: Whether ``labels.csv`` was written.
    """

    out_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    labelled: bool = False

    def summary(self) -> str:
        """One line: images written, where, and how many were skipped."""
        files = "images/, masks/" + (" and labels.csv" if self.labelled else "")
        line = f"wrote {len(self.written)} images with their predicted masks to {self.out_dir} ({files})"
        return line + (f"; {len(self.skipped)} skipped (listed above)" if self.skipped else "")


def copy_file(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` atomically. A copy, not a hard link: editing the output must never edit the data."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def _check_out_dir(out_dir: Path, samples: list[Sample], overwrite: bool) -> None:
    """Refuse an output folder that holds an earlier output (unless ``overwrite``) or any file of the data."""
    existing = [name for name in OUTPUTS if (out_dir / name).exists()]
    if existing and not overwrite:
        raise DataError(
            f"{out_dir}: already holds {', '.join(existing)}; choose a new folder, or pass --overwrite_output_dir "
            "(overwrite=True) to replace them."
        )
    outputs = [(out_dir / name).resolve() for name in OUTPUTS]
    for sample in samples:
        for path in (sample.image_path, sample.mask_path):
            resolved = Path(path).resolve() if path is not None else None
            if resolved is not None and any(p == resolved or p in resolved.parents for p in outputs):
                raise DataError(f"{out_dir}: holds the data's file {path}; choose an output folder outside the data.")


def _labels_csv(rows: list[tuple[str, Sample]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LABEL_HEADER)
    for name, s in rows:
        # An unlabelled image of labelled data is a test image: said in its split, so reading it back warns of nothing.
        writer.writerow([name, s.label or "", s.group_id, "test" if s.label is None else s.split])
    return buffer.getvalue()


def _move_into(staging: Path, out_dir: Path) -> None:
    """Move the finished outputs from ``staging`` into ``out_dir``, replacing earlier ones; remove ``staging``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        new, old = staging / name, out_dir / name
        if not new.exists():
            continue
        if old.exists():
            old.rename(staging / f"old_{name}")  # removed with the staging folder
        new.rename(old)


def segment_folder(
    model: str | os.PathLike | RoiSegmenter,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    layout: str | None = None,
    split: str | None = None,
    window_size: int | None = None,
    window_overlap: float | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_error: str = "raise",
    max_image_pixels: int | None = None,
    overwrite: bool = False,
) -> SegmentResult:
    """Predict the ROI mask of every image with a segmentation model and write a data folder of images + masks.

    ``out_dir`` gets the table layout every command reads as data: ``images/`` (each image under its id, a copy of
    the source file, never a link: the data is never modified), ``masks/<id>.png`` (the
    predicted mask: 0/255 for a binary model, the class index per pixel otherwise) and, when the data has labels,
    ``labels.csv`` (``filename,label,patient_id,split``). Everything is written in a staging folder next to
    ``out_dir`` and moved in at the end, so an interrupted run leaves no half-written data behind.

    Args:
        model: A segmentation folder or Hub id (``recipes/roi_segmentation.py``'s output), or a `RoiSegmenter`.
        data: A data folder in any layout `read_samples` knows, a clean manifest CSV, or one image file.
        out_dir: The folder to write; one that already holds ``images/``, ``masks/`` or ``labels.csv`` is refused
            unless ``overwrite``.
        layout: Force the data layout; detected when None.
        split: ``"all"``, ``"train"`` or ``"test"`` (`Sample.split`); None: every image.
        window_size: Sliding-window side (default: the model's ``window_size``).
        window_overlap: Window overlap share in [0, 1) (default: the model's).
        batch_size: Windows per forward pass.
        device: Torch device (default: CUDA when available). A loaded `RoiSegmenter` keeps its own window, overlap,
            batch size and device.
        progress: Show a progress bar.
        on_error: ``"raise"`` stops at the first bad image (nothing is written); ``"skip"`` leaves it out, goes on
            with the others and logs every failure in one warning.
        max_image_pixels: Raise PIL's decompression-bomb limit for trusted large images.
        overwrite: Replace the ``images/``, ``masks/`` and ``labels.csv`` of an earlier run in ``out_dir``.

    Returns:
        A `SegmentResult` (``summary()`` is the one-line report).

    Raises:
        DataError: A data problem naming the file and the fix, every image failing, or an output folder that cannot
            be used (it holds an earlier output, or the data's own files).
    """
    from tqdm.auto import tqdm

    check_on_error(on_error)
    out_dir = check_output_folder(out_dir)
    sample_set = read_samples(data, layout=layout, on_error=on_error)
    samples = sample_set.select(split) if split is not None else sample_set.samples
    _check_out_dir(out_dir, samples, overwrite)
    if isinstance(model, (str, os.PathLike)):
        check_model_source(model)
        options = {"window_size": window_size, "window_overlap": window_overlap, "batch_size": batch_size}
        model = RoiSegmenter.from_pretrained(model, device=device, **options)
    labelled = any(s.label is not None for s in samples)
    base = out_dir.absolute()
    staging = base.parent / f".{base.name}.{uuid.uuid4().hex[:8]}.tmp"  # same file system: the moves are renames
    result = SegmentResult(out_dir, labelled=labelled)
    rows: list[tuple[str, Sample]] = []
    try:
        for sample in tqdm(samples, desc="segment", unit="image", disable=not progress):
            name = str(sample.image_path)
            try:
                classes = model.predict(load_rgb(sample.image_path, max_image_pixels, name=name))
            except ITEM_ERRORS as e:
                if on_error == "raise":
                    raise with_skip_hint(e, name, "in a warning") from e
                result.skipped.append((name, str(item_error(e, name))))
                continue
            atomic_save_image(staging / "masks" / f"{sample.image_id}.png", mask_png(classes, model.binary))
            image_name = f"{sample.image_id}{sample.image_path.suffix}"
            copy_file(sample.image_path, staging / "images" / image_name)
            rows.append((image_name, sample))
            result.written.append(sample.image_id)
        if not rows:
            raise DataError(f"{data}: every image failed, e.g. {result.skipped[0][1]}")
        if labelled:
            atomic_write_text(staging / "labels.csv", _labels_csv(rows))
        _move_into(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log_failures(result.skipped, len(samples), f"left out of {out_dir}")
    log_failures(sample_set.skipped, len(sample_set.samples) + len(sample_set.skipped), "data rows left out")
    result.skipped += sample_set.skipped
    return result
