"""Read a data folder, a manifest or one image file into sample records: the one entry point of every command."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from .images import DataError
from .layouts import LAYOUTS, MANIFEST_NAME, READERS, detect_layout, images_in, is_image, mask_for
from .listings import IMAGE_EXTENSIONS, read_exclusions
from .samples import SPLIT_CHOICES, Collector, OnError, Sample, SampleSet

logger = logging.getLogger(__name__)

# Re-exported for the callers of read_samples (their homes: images.py, layouts.py, listings.py, samples.py).
__all__ = [
    "LAYOUTS",
    "SPLIT_CHOICES",
    "DataError",
    "OnError",
    "Sample",
    "SampleSet",
    "detect_layout",
    "read_exclusions",
    "read_samples",
]


def _check_unique(samples: list[Sample], col: Collector) -> list[Sample]:
    seen: dict[str, Sample] = {}
    for s in samples:
        if s.image_id not in seen:
            seen[s.image_id] = s
            continue
        col.problem(
            s.image_path,
            f"duplicate file name: image id {s.image_id!r} is also {seen[s.image_id].image_path}; "
            "rename one of them (image ids are file names without extension and must be unique).",
        )
    return list(seen.values())


def _given_masks(samples: list[Sample], masks: Path, root: Path, col: Collector) -> list[Sample]:
    """The samples with the masks given explicitly: a mask file for one image, or a folder (same names as images)."""
    if masks.is_file():
        if not root.is_file():
            raise DataError(
                f"{masks}: a mask file fits one image, but {root} is a folder of {len(samples)} images; pass a folder "
                "of masks named like the images (e.g. masks/<image name>)."
            )
        if not is_image(masks):
            raise DataError(f"{masks}: not a mask image; pass a mask image file ({', '.join(IMAGE_EXTENSIONS)}).")
        return [replace(s, mask_path=masks) for s in samples]
    if not masks.is_dir():
        raise DataError(
            f"{masks}: no such mask folder or file; pass the folder that holds one mask per image, named like its "
            "image (or, for one image file, its mask file)."
        )
    files = images_in(masks)
    if not files:
        raise DataError(f"{masks}: no mask images in this folder; put one mask per image in it, named like the image.")
    given = {s.image_path: mask_for(masks, s.image_path) for s in samples}
    final = [replace(s, mask_path=given[s.image_path] or s.mask_path) for s in samples]
    col.given_masks(masks, files, given, final)
    return final


def _warn_labels(root: Path, samples: list[Sample]) -> None:
    """Warn about labels that differ only in case: they stay different classes."""
    spellings: dict[str, set[str]] = {}
    for s in samples:
        if s.label is not None:
            spellings.setdefault(s.label.casefold(), set()).add(s.label)
    clashes = "; ".join(" / ".join(repr(x) for x in sorted(v)) for v in spellings.values() if len(v) > 1)
    if clashes:
        logger.warning(
            "%s: labels that differ only in case are different classes: %s; if they are one class, spell it one way.",
            root,
            clashes,
        )


def read_samples(
    data_dir: str | Path,
    layout: str | None = None,
    on_error: OnError = "raise",
    manifest: str | Path | None = None,
    exclude: str | Path | None = None,
    masks: str | Path | None = None,
) -> SampleSet:
    """Read a data folder (or a clean manifest, or one image file) into sample records.

    Layouts (``LAYOUTS``): ``challenge``, ``table`` (``images/`` [+ ``masks/``] [+ ``labels.csv``]: without
    ``labels.csv`` every image is an unlabelled test image), ``class_folders``, ``manifest``, and ``images``: a plain
    folder of image files, or one image file, read as unlabelled test images whose ids are the file names without
    extension (sub-folders are not read; ``mask_*`` files are the masks of the ``img_*`` images beside them).

    Misnamed masks, images that fall back to tissue detection, labels that differ only in case,
    unlabelled rows and unknown excluded ids are logged as warnings (one each).

    Args:
        data_dir: The data folder, a ``clean_manifest.csv`` written by ``hf-histo clean``, or one image file.
        layout: Force a layout (one of ``LAYOUTS``); detected when None.
        on_error: ``"raise"`` stops at the first problem; ``"skip"`` leaves bad samples out and lists
            them in ``SampleSet.skipped``.
        manifest: A clean manifest to read instead of ``data_dir``'s own files.
        exclude: An exclusion list (one image id per line) whose samples are left out.
        masks: Masks given explicitly: a folder with one mask per image, named like the image (as the table
            layout's ``masks/``: same file name, or same name with another image extension), or, when ``data_dir``
            is one image file, its mask file. In any layout, an image with a mask here uses it instead of the
            layout's own (given masks override per image); the others keep theirs, or tissue detection.

    Returns:
        The samples, sorted by ``image_id``.

    Raises:
        DataError: A problem with the data, naming the file and the fix.
    """
    col = Collector(on_error)
    root = Path(manifest if manifest is not None else data_dir)
    if manifest is not None:
        layout = "manifest"
    layout = layout or detect_layout(root)
    if layout not in READERS:
        raise DataError(f"{root}: unknown layout {layout!r}; choose one of {list(LAYOUTS)}.")
    if layout == "manifest" and root.is_dir():
        root = root / MANIFEST_NAME
    if not root.exists():
        raise DataError(f"{root}: not found; pass an existing data folder.")
    if root.is_file() and layout not in ("manifest", "images"):
        raise DataError(f"{root}: is a file, but the {layout} layout is a folder; pass the data folder.")
    samples = READERS[layout](root, col)
    if masks is not None:
        samples = _given_masks(samples, Path(masks), root, col)
    samples = _check_unique(sorted(samples, key=lambda s: (s.image_id, str(s.image_path))), col)
    col.warn_masks()
    _warn_labels(root, samples)
    if exclude is not None:
        excluded = read_exclusions(exclude, [s.image_id for s in samples])
        samples = [s for s in samples if s.image_id not in excluded]
    if not samples:
        hint = f" ({len(col.skipped)} skipped: {col.skipped[0][0]}: {col.skipped[0][1]})" if col.skipped else ""
        raise DataError(f"{root}: no usable images found in the {layout} layout{hint}.")
    return SampleSet(
        samples=samples, layout=layout, root=root, skipped=col.skipped, unmatched_masks=col.unmatched_masks
    )
