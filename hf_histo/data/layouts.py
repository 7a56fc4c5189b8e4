"""The data layouts: how each is detected and read into samples (challenge, table, class folders, manifest, images)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

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
)
from .samples import Collector, Sample

# The order detection tries them in ("images": a plain folder of images, or one image file, without labels).
LAYOUTS = ("challenge", "table", "class_folders", "manifest", "images")
MANIFEST_COLUMNS = ("image_id", "image_path", "mask_path", "label", "group_id", "split")
MANIFEST_NAME = "clean_manifest.csv"
EXPECTED = (
    "'train_data/' + 'train_labels.csv' (challenge), 'images/' [+ 'masks/'] [+ 'labels.csv'] (table), one "
    "sub-folder per class (class_folders), a clean_manifest.csv, or image files (images)"
)

logger = logging.getLogger(__name__)


def is_image(path: Path) -> bool:
    """Whether ``path`` is an image file by its extension (hidden files are not)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def images_in(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted (sub-folders are not searched)."""
    return sorted(p for p in folder.iterdir() if is_image(p))


def mask_for(mask_dir: Path, image: Path) -> Path | None:
    """The mask of ``image`` in ``mask_dir``: the same file name, or the same stem with any image extension."""
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


def detect_layout(data_dir: str | Path) -> str:
    """Guess which layout a data folder (or file) has.

    A folder with ``train_data/`` or ``test_data/`` is ``challenge``, one with ``images/`` is ``table``, one with a
    ``clean_manifest.csv`` is ``manifest``; otherwise image files directly inside it make it ``images`` (a plain
    folder: its sub-folders are not read), and sub-folders of images without them ``class_folders``. A CSV file is a
    manifest, an image file is ``images`` (one image).

    Args:
        data_dir: A data folder, the path of a ``clean_manifest.csv``, or one image file.

    Returns:
        One of ``LAYOUTS``.

    Raises:
        DataError: The path is missing, an empty folder, a file that is no image or CSV, or in no known layout.
    """
    path = Path(data_dir)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return "manifest"
        if suffix in IMAGE_EXTENSIONS:
            return "images"
        raise DataError(
            f"{path}: not an image file or a clean_manifest.csv ({suffix or 'no extension'}); pass one image "
            f"({', '.join(IMAGE_EXTENSIONS)}), a folder of images, or a data folder (see README: 'Your own data')."
        )
    if not path.is_dir():
        raise DataError(
            f"{path}: no such data folder or image file; pass the folder that holds your images, or one image file."
        )
    if (path / "train_data").is_dir() or (path / "test_data").is_dir():
        return "challenge"
    if (path / "images").is_dir():
        return "table"
    if (path / MANIFEST_NAME).is_file():
        return "manifest"
    if images_in(path):
        return "images"
    subdirs = [d for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if subdirs and any(images_in(d) for d in subdirs):
        return "class_folders"
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DataError(f"{path}: the data folder is empty; put your images in it (see README: 'Your own data').")
    raise DataError(
        f"{path}: unknown data layout: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or in its sub-folders "
        f"(found {few(sorted(entries))}). Expected one of: {EXPECTED}; pass --layout to force one."
    )


def _listed_rows(
    csv_path: Path, folder: Path, rows: list[dict[str, str]], file_col: str, col: Collector, listed: set[Path]
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


def _mask_beside(image: Path) -> Path | None:
    """The challenge's ``mask_N`` file beside an ``img_N`` image, when it exists."""
    mask = image.with_name(image.name.replace("img_", "mask_", 1))
    return mask if mask != image and mask.is_file() else None


def _challenge_masks(folder: Path, col: Collector) -> tuple[list[Path], dict[Path, Path | None]]:
    """The images of a challenge folder and the ``mask_`` file beside each (None when absent)."""
    files = images_in(folder)
    images = [p for p in files if not p.name.startswith("mask_")]
    mask_of = {p: _mask_beside(p) for p in images}
    col.masks(folder, [p for p in files if p.name.startswith("mask_")], mask_of)
    return images, mask_of


def _read_challenge(root: Path, col: Collector) -> list[Sample]:
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


def _read_table(root: Path, col: Collector) -> list[Sample]:
    image_dir, mask_dir, label_csv = root / "images", root / "masks", root / "labels.csv"
    files = images_in(image_dir)
    if mask_dir.is_dir():
        col.masks(mask_dir, images_in(mask_dir), {p: mask_for(mask_dir, p) for p in files})
    if not label_csv.is_file():
        # Unlabelled folder: every image is a test image.
        return [Sample(p, mask_for(mask_dir, p), None, p.stem, p.stem, "test") for p in files]
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
        samples.append(Sample(path, mask_for(mask_dir, path), label, path.stem, group, split))
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


def _read_class_folders(root: Path, col: Collector) -> list[Sample]:
    samples = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            samples += [Sample(p, None, d.name, p.stem, p.stem) for p in images_in(d)]
    return samples


def _manifest_path(csv_path: Path, written: str, row: int) -> Path:
    """Absolute paths as written (``hf-histo clean`` points so at data elsewhere), else inside the manifest's folder."""
    if os.path.isabs(written):
        return absolute(Path(written))
    return path_inside(csv_path.parent, written, csv_path, row, "the manifest's folder")


def _read_manifest(csv_path: Path, col: Collector) -> list[Sample]:
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


def _read_images(root: Path, col: Collector) -> list[Sample]:
    """Unlabelled images: one image file, or the image files of a plain folder (its sub-folders are not read).

    Files named ``mask_*`` are masks, of the ``img_*`` image beside them (a challenge ``train_data/`` or
    ``test_data/`` folder given directly); other images use tissue detection unless masks are given.
    """
    if root.is_file():
        if not is_image(root):
            raise DataError(f"{root}: not an image file; pass an image ({', '.join(IMAGE_EXTENSIONS)}).")
        return [Sample(root, _mask_beside(root), None, root.stem, root.stem, "test")]
    images, mask_of = _challenge_masks(root, col)
    ignored = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".") and images_in(d)]
    if ignored:
        logger.warning(
            "%s: the images layout reads the image files of this folder only, not its sub-folders with images (%s); "
            "pass --masks DIR (masks=DIR) if one holds the masks, or --layout class_folders if they are classes.",
            root,
            few(ignored),
        )
    return [Sample(p, mask_of[p], None, p.stem, p.stem, "test") for p in images]


READERS: dict[str, Callable[[Path, Collector], list[Sample]]] = {
    "challenge": _read_challenge,
    "table": _read_table,
    "class_folders": _read_class_folders,
    "manifest": _read_manifest,
    "images": _read_images,
}
