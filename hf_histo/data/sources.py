"""Read a raw data folder (challenge, table, class-folder or manifest layout) into sample records."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .images import DataError
from .listings import (
    FILE_COLUMNS,
    GROUP_COLUMNS,
    IMAGE_EXTENSIONS,
    LABEL_COLUMNS,
    absolute,
    count,
    few,
    find_column,
    is_missing,
    no_label,
    path_inside,
    read_csv,
    read_exclusions,
)

LAYOUTS = ("challenge", "table", "class_folders", "manifest")
MANIFEST_COLUMNS = ("image_id", "image_path", "mask_path", "label", "group_id", "split")
MANIFEST_NAME = "clean_manifest.csv"

OnError = Literal["raise", "skip"]

logger = logging.getLogger(__name__)

__all__ = ["Sample", "SampleSet", "detect_layout", "read_samples"]


@dataclass(frozen=True)
class Sample:
    """One image of the data set.

    Attributes:
        image_path: The RGB image file.
        mask_path: The binary region-of-interest mask, or None (tissue detection is used then).
        label: The class name, or None for unlabelled (test) images.
        image_id: The file name without extension, unique within the data set.
        group_id: The patient/group the image belongs to (``image_id`` when none is given); splits
            never put one group on both sides.
        split: ``"train"`` for labelled development data, ``"test"`` for held-out data.
    """

    image_path: Path
    mask_path: Path | None
    label: str | None
    image_id: str
    group_id: str
    split: str = "train"


@dataclass
class SampleSet:
    """The samples of one data folder and what was skipped while reading it.

    Attributes:
        samples: Every readable sample, sorted by ``image_id``.
        layout: The layout that was read.
        root: The data folder (or the manifest file).
        skipped: ``(file, reason)`` pairs for samples left out with ``on_error="skip"``.
        unmatched_masks: Mask files that belong to no image (misnamed: their images use tissue detection).
    """

    samples: list[Sample]
    layout: str
    root: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unmatched_masks: list[Path] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Sorted class names found among the samples."""
        return sorted({s.label for s in self.samples if s.label is not None})

    @property
    def train(self) -> list[Sample]:
        """Samples of the ``train`` split."""
        return [s for s in self.samples if s.split == "train"]

    @property
    def test(self) -> list[Sample]:
        """Samples of the ``test`` split."""
        return [s for s in self.samples if s.split == "test"]

    def __len__(self) -> int:
        return len(self.samples)


class _Collector:
    """Raise at once, or record and go on, depending on ``on_error``; gather what is only warned about."""

    def __init__(self, on_error: OnError):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[tuple[str, str]] = []
        self.mask_dirs: list[Path] = []  # folders that hold masks
        self.unmatched_masks: list[Path] = []  # mask files that no image claims
        self.without_mask: list[Path] = []  # images of those folders without a mask
        self.n_images = 0  # images of those folders

    def problem(self, file: str | Path, message: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{file}: {message}")
        self.skipped.append((str(file), message))

    def masks(self, folder: Path, masks: list[Path], mask_of: dict[Path, Path | None]) -> None:
        if masks:
            self.mask_dirs.append(folder)
            self.unmatched_masks += sorted(set(masks) - set(mask_of.values()))
            self.without_mask += [image for image, mask in mask_of.items() if mask is None]
            self.n_images += len(mask_of)

    def warn_masks(self) -> None:
        """One warning: misnamed masks and the images that fall back to tissue detection."""
        unmatched, without = self.unmatched_masks, self.without_mask
        parts = [f"{count(len(unmatched), 'mask file', 'matches')} no image ({few(unmatched)})"] if unmatched else []
        if without:
            parts.append(
                f"{len(without)} of {self.n_images} images have no mask and use tissue detection ({few(without)})"
            )
        if parts:
            fix = "give each mask its image's name (table: masks/<image name>; challenge: mask_N beside img_N)"
            logger.warning("%s: %s; %s.", self.mask_dirs[0], "; ".join(parts), fix)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def detect_layout(data_dir: str | Path) -> str:
    """Guess which layout a data folder has.

    Args:
        data_dir: A data folder, or the path of a ``clean_manifest.csv``.

    Returns:
        One of ``"challenge"``, ``"table"``, ``"class_folders"``, ``"manifest"``.

    Raises:
        DataError: The folder is missing, empty or in no known layout.
    """
    path = Path(data_dir)
    if path.is_file() and path.suffix.lower() == ".csv":
        return "manifest"
    if not path.is_dir():
        raise DataError(f"{path}: no such data folder; pass the folder that holds your images.")
    if (path / "train_data").is_dir() or (path / "test_data").is_dir():
        return "challenge"
    if (path / "images").is_dir():
        return "table"
    if (path / MANIFEST_NAME).is_file():
        return "manifest"
    subdirs = [d for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if subdirs and any(_images_in(d) for d in subdirs):
        return "class_folders"
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DataError(f"{path}: the data folder is empty; put your images in it (see README: 'Your own data').")
    raise DataError(
        f"{path}: unknown data layout. Expected one of: 'train_data/' + 'train_labels.csv' (challenge), "
        "'images/' [+ 'masks/'] + 'labels.csv' (table), one sub-folder per class (class_folders), "
        "or a clean_manifest.csv; pass --layout to force one."
    )


def _check_unique(samples: list[Sample], col: _Collector) -> list[Sample]:
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


def _mask_for(mask_dir: Path, image: Path) -> Path | None:
    if not mask_dir.is_dir():
        return None
    same = mask_dir / image.name
    if same.is_file():
        return same
    for ext in IMAGE_EXTENSIONS:
        candidate = mask_dir / f"{image.stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _listed_rows(
    csv_path: Path, folder: Path, rows: list[dict[str, str]], file_col: str, col: _Collector, listed: set[Path]
) -> Iterator[tuple[int, dict[str, str], Path]]:
    """``(line number, row, path)`` of each row that names an existing file inside ``folder``, once each."""
    for i, row in enumerate(rows, start=2):
        name = row[file_col]
        if not name:
            col.problem(csv_path, f"row {i} has an empty {file_col!r}; fill it or delete the row.")
        elif (path := path_inside(folder, name, csv_path, i)) in listed:
            col.problem(csv_path, f"row {i}: {name!r} is listed twice; keep one row per image.")
        elif not path.is_file():
            col.problem(csv_path, f"row {i} names {name!r} but {path} does not exist; add the file or drop the row.")
        else:
            listed.add(path)
            yield i, row, path


def _challenge_masks(folder: Path, col: _Collector) -> tuple[list[Path], dict[Path, Path | None]]:
    """The images of a challenge folder and the ``mask_`` file beside each (None when absent)."""
    files = _images_in(folder)
    images = [p for p in files if not p.name.startswith("mask_")]
    beside = {p: folder / p.name.replace("img_", "mask_", 1) for p in images}
    mask_of = {p: m if m != p and m.is_file() else None for p, m in beside.items()}
    col.masks(folder, [p for p in files if p.name.startswith("mask_")], mask_of)
    return images, mask_of


def _read_challenge(root: Path, col: _Collector) -> list[Sample]:
    samples: list[Sample] = []
    label_csv = root / "train_labels.csv"
    train_dir = root / "train_data"
    if train_dir.is_dir():
        if not label_csv.is_file():
            raise DataError(f"{label_csv}: missing; the challenge layout needs 'sample_index,label' for train_data/.")
        columns, rows = read_csv(label_csv)
        file_col, label_col = find_column(columns, ("sample_index",)), find_column(columns, LABEL_COLUMNS)
        for needed, found in (("sample_index", file_col), ("label", label_col)):
            if found is None:
                raise DataError(
                    f"{label_csv}: no {needed!r} column (found {columns}); the header is sample_index,label."
                )
        labels: dict[str, str] = {}
        for i, row, path in _listed_rows(label_csv, train_dir, rows, file_col, col, set()):
            if is_missing(raw := row[label_col]):
                col.problem(
                    label_csv,
                    f"{no_label(i, row[file_col], raw)}; fill it, or move an unlabelled image to test_data/.",
                )
            else:
                labels[path.name] = raw
        images, mask_of = _challenge_masks(train_dir, col)
        for image in images:
            if image.name not in labels:
                col.problem(image, f"has no row in {label_csv}; add a 'sample_index,label' row for it.")
                continue
            samples.append(Sample(image, mask_of[image], labels[image.name], image.stem, image.stem))
    test_dir = root / "test_data"
    if test_dir.is_dir():
        test_images, mask_of = _challenge_masks(test_dir, col)
        # Test files may be numbered from 0 again; ids must stay unique, so they then get a "test_" prefix
        # (the file name, which a submission uses, is unchanged).
        train_ids = {s.image_id for s in samples}
        prefix = "test_" if any(p.stem in train_ids for p in test_images) else ""
        for image in test_images:
            image_id = prefix + image.stem
            samples.append(Sample(image, mask_of[image], None, image_id, image_id, "test"))
    return samples


def _read_table(root: Path, col: _Collector) -> list[Sample]:
    image_dir, mask_dir, label_csv = root / "images", root / "masks", root / "labels.csv"
    files = _images_in(image_dir)
    if mask_dir.is_dir():
        col.masks(mask_dir, _images_in(mask_dir), {p: _mask_for(mask_dir, p) for p in files})
    if not label_csv.is_file():
        # Unlabelled folder: every image is a test image.
        return [Sample(p, _mask_for(mask_dir, p), None, p.stem, p.stem, "test") for p in files]
    columns, rows = read_csv(label_csv)
    file_col, label_col = find_column(columns, FILE_COLUMNS), find_column(columns, LABEL_COLUMNS)
    group_col, split_col = find_column(columns, GROUP_COLUMNS), find_column(columns, ("split",))
    if file_col is None:
        raise DataError(f"{label_csv}: no file column; name one of {list(FILE_COLUMNS)} (found {columns}).")
    if label_col is None:
        raise DataError(
            f"{label_csv}: no label column (found {columns}); name it one of {list(LABEL_COLUMNS)}, "
            f"or remove {label_csv.name} if the images are unlabelled."
        )
    unused = [c for c in columns if c not in (file_col, label_col, split_col)]
    if group_col is None and unused:
        logger.warning(
            "%s: no group column, so one patient's images may land in both train and validation; unused columns "
            "%s: name the patient column one of %s.",
            label_csv,
            unused,
            list(GROUP_COLUMNS),
        )
    samples: list[Sample] = []
    listed: set[Path] = set()
    unlabelled: list[str] = []
    for i, row, path in _listed_rows(label_csv, image_dir, rows, file_col, col, listed):
        name, raw, split = row[file_col], row[label_col], (row[split_col] if split_col else "").lower()
        label = None if is_missing(raw) else raw
        if label is None and split == "train":
            col.problem(
                label_csv, f"{no_label(i, name, raw)} but split 'train'; fill the label, or set split to test."
            )
            continue
        if label is None and split != "test":
            unlabelled.append(f"row {i} {name!r}" + (f": {raw!r}" if raw else ""))
        group = row[group_col] if group_col and not is_missing(row[group_col]) else path.stem
        split = "test" if label is None or split == "test" else "train"
        samples.append(Sample(path, _mask_for(mask_dir, path), label, path.stem, group, split))
    if unlabelled:
        logger.warning(
            "%s: %s no label (%s): read as unlabelled test images; fill the label, or write 'test' in a "
            "'split' column to say so.",
            label_csv,
            count(len(unlabelled), "row", "has"),
            few(unlabelled),
        )
    for p in files:
        if absolute(p) not in listed:
            col.problem(p, f"has no row in {label_csv}; add a row for it or move it out of images/.")
    return samples


def _read_class_folders(root: Path, col: _Collector) -> list[Sample]:
    samples = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            samples += [Sample(p, None, d.name, p.stem, p.stem) for p in _images_in(d)]
    return samples


def _manifest_path(csv_path: Path, written: str, row: int) -> Path:
    """Absolute paths as written (``hf-histo clean`` points so at data elsewhere), else inside the manifest's folder."""
    if os.path.isabs(written):
        return absolute(Path(written))
    return path_inside(csv_path.parent, written, csv_path, row, "the manifest's folder")


def _read_manifest(csv_path: Path, col: _Collector) -> list[Sample]:
    columns, rows = read_csv(csv_path)
    missing = [c for c in ("image_id", "image_path") if c not in columns]
    if missing:
        raise DataError(f"{csv_path}: manifest without columns {missing}; expected {list(MANIFEST_COLUMNS)}.")
    samples = []
    for i, row in enumerate(rows, start=2):
        image = _manifest_path(csv_path, row["image_path"], i)
        mask = _manifest_path(csv_path, row["mask_path"], i) if row.get("mask_path") else None
        absent = next((p for p in (image, mask) if p is not None and not p.is_file()), None)
        if absent is not None:
            col.problem(csv_path, f"row {i}: {absent} does not exist; re-run `hf-histo clean` on the data.")
            continue
        raw, split = row.get("label") or "", (row.get("split") or "").lower()
        label = None if is_missing(raw) else raw
        if label is None and split != "test":  # clean writes split=test for unlabelled images
            col.problem(
                csv_path,
                f"{no_label(i, row['image_id'], raw)} but split is not 'test'; fill the label, or set split to test.",
            )
            continue
        group = row.get("group_id") or row["image_id"]
        samples.append(Sample(image, mask, label, row["image_id"], group, "test" if split == "test" else "train"))
    return samples


_READERS = {
    "challenge": _read_challenge,
    "table": _read_table,
    "class_folders": _read_class_folders,
    "manifest": _read_manifest,
}


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
) -> SampleSet:
    """Read a data folder into sample records.

    Misnamed masks, images that fall back to tissue detection, labels that differ only in case,
    unlabelled rows and unknown excluded ids are logged as warnings (one each).

    Args:
        data_dir: The data folder, or a ``clean_manifest.csv`` written by ``hf-histo clean``.
        layout: Force a layout (``"challenge"``, ``"table"``, ``"class_folders"``, ``"manifest"``);
            detected when None.
        on_error: ``"raise"`` stops at the first problem; ``"skip"`` leaves bad samples out and lists
            them in ``SampleSet.skipped``.
        manifest: A clean manifest to read instead of ``data_dir``'s own files.
        exclude: An exclusion list (one image id per line) whose samples are left out.

    Returns:
        The samples, sorted by ``image_id``.

    Raises:
        DataError: A problem with the data, naming the file and the fix.
    """
    col = _Collector(on_error)
    root = Path(manifest if manifest is not None else data_dir)
    if manifest is not None:
        layout = "manifest"
    layout = layout or detect_layout(root)
    if layout not in _READERS:
        raise DataError(f"{root}: unknown layout {layout!r}; choose one of {list(LAYOUTS)}.")
    if layout == "manifest" and root.is_dir():
        root = root / MANIFEST_NAME
    if not root.exists():
        raise DataError(f"{root}: not found; pass an existing data folder.")
    samples = _READERS[layout](root, col)
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
