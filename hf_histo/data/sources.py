"""Read a raw data folder (challenge, table, class-folder or manifest layout) into sample records."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .images import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
LAYOUTS = ("challenge", "table", "class_folders", "manifest")
FILE_COLUMNS = ("filename", "sample_index", "image")
GROUP_COLUMNS = ("patient_id", "group")
MANIFEST_COLUMNS = ("image_id", "image_path", "mask_path", "label", "group_id", "split")
MANIFEST_NAME = "clean_manifest.csv"

OnError = Literal["raise", "skip"]

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
    """

    samples: list[Sample]
    layout: str
    root: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)

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
    """Raise at once, or record and go on, depending on ``on_error``."""

    def __init__(self, on_error: OnError):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[tuple[str, str]] = []

    def problem(self, file: str | Path, message: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{file}: {message}")
        self.skipped.append((str(file), message))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
            columns = [c.strip() for c in reader.fieldnames or []]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable UTF-8 CSV file ({e}); save it as CSV with a header row.") from e
    if not columns:
        raise DataError(f"{path}: the CSV file is empty; it needs a header row.")
    return columns, rows


def _inside(root: Path, relative: str, csv_path: Path) -> Path:
    """Resolve ``relative`` under ``root``, refusing paths that escape it."""
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise DataError(
            f"{csv_path}: the path {relative!r} points outside the data folder {root}; "
            "list file names relative to the folder."
        )
    return candidate


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
    out = []
    for s in samples:
        if s.image_id in seen:
            col.problem(
                s.image_path,
                f"duplicate file name: image id {s.image_id!r} is also {seen[s.image_id].image_path}; "
                "rename one of them (image ids are file names without extension and must be unique).",
            )
            continue
        seen[s.image_id] = s
        out.append(s)
    return out


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


def _read_challenge(root: Path, col: _Collector) -> list[Sample]:
    samples: list[Sample] = []
    label_csv = root / "train_labels.csv"
    train_dir = root / "train_data"
    if train_dir.is_dir():
        if not label_csv.is_file():
            raise DataError(f"{label_csv}: missing; the challenge layout needs 'sample_index,label' for train_data/.")
        columns, rows = _read_csv(label_csv)
        for needed in ("sample_index", "label"):
            if needed not in columns:
                raise DataError(
                    f"{label_csv}: no {needed!r} column (found {columns}); the header is sample_index,label."
                )
        labels: dict[str, str] = {}
        for i, row in enumerate(rows, start=2):
            name = row["sample_index"]
            if not name:
                col.problem(label_csv, f"row {i} has an empty sample_index; fill it or delete the row.")
                continue
            path = _inside(train_dir, name, label_csv)
            if not path.is_file():
                col.problem(
                    label_csv, f"row {i} names {name!r} but {path} does not exist; add the file or drop the row."
                )
                continue
            if not row["label"]:
                col.problem(label_csv, f"row {i} ({name!r}) has an empty label; fill it or delete the row.")
                continue
            labels[path.name] = row["label"]
        for image in _images_in(train_dir):
            if image.name.startswith("mask_"):
                continue
            if image.name not in labels:
                col.problem(image, f"has no row in {label_csv}; add a 'sample_index,label' row for it.")
                continue
            mask = train_dir / image.name.replace("img_", "mask_", 1)
            samples.append(
                Sample(
                    image,
                    mask if mask.is_file() and mask != image else None,
                    labels[image.name],
                    image.stem,
                    image.stem,
                )
            )
    test_dir = root / "test_data"
    if test_dir.is_dir():
        test_images = [p for p in _images_in(test_dir) if not p.name.startswith("mask_")]
        # Test files may be numbered from 0 again; ids must stay unique, so they then get a "test_" prefix
        # (the file name, which a submission uses, is unchanged).
        train_ids = {s.image_id for s in samples}
        prefix = "test_" if any(p.stem in train_ids for p in test_images) else ""
        for image in test_images:
            mask = test_dir / image.name.replace("img_", "mask_", 1)
            image_id = prefix + image.stem
            samples.append(
                Sample(image, mask if mask.is_file() and mask != image else None, None, image_id, image_id, "test")
            )
    return samples


def _read_table(root: Path, col: _Collector) -> list[Sample]:
    image_dir, mask_dir, label_csv = root / "images", root / "masks", root / "labels.csv"
    files = _images_in(image_dir)
    if not label_csv.is_file():
        # Unlabelled folder: every image is a test image.
        return [Sample(p, _mask_for(mask_dir, p), None, p.stem, p.stem, "test") for p in files]
    columns, rows = _read_csv(label_csv)
    file_col = next((c for c in FILE_COLUMNS if c in columns), None)
    if file_col is None:
        raise DataError(f"{label_csv}: no file column; name one of {list(FILE_COLUMNS)} (found {columns}).")
    group_col = next((c for c in GROUP_COLUMNS if c in columns), None)
    has_label = "label" in columns
    samples: list[Sample] = []
    listed: set[Path] = set()
    for i, row in enumerate(rows, start=2):
        name = row[file_col]
        if not name:
            col.problem(label_csv, f"row {i} has an empty {file_col!r}; fill it or delete the row.")
            continue
        path = _inside(image_dir, name, label_csv)
        if path in listed:
            col.problem(label_csv, f"row {i}: {name!r} is listed twice; keep one row per image.")
            continue
        if not path.is_file():
            col.problem(label_csv, f"row {i} names {name!r} but {path} does not exist; add the file or drop the row.")
            continue
        listed.add(path)
        label = (row.get("label") or None) if has_label else None
        split = (row.get("split") or "").lower()
        split = "test" if split == "test" or label is None else "train"
        group = (row.get(group_col) or None) if group_col else None
        samples.append(Sample(path, _mask_for(mask_dir, path), label, path.stem, group or path.stem, split))
    for p in files:
        if p.resolve() not in listed:
            col.problem(p, f"has no row in {label_csv}; add a row for it or move it out of images/.")
    return samples


def _read_class_folders(root: Path, col: _Collector) -> list[Sample]:
    samples = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            samples += [Sample(p, None, d.name, p.stem, p.stem) for p in _images_in(d)]
    return samples


def _read_manifest(csv_path: Path, col: _Collector) -> list[Sample]:
    columns, rows = _read_csv(csv_path)
    missing = [c for c in ("image_id", "image_path") if c not in columns]
    if missing:
        raise DataError(f"{csv_path}: manifest without columns {missing}; expected {list(MANIFEST_COLUMNS)}.")
    base = csv_path.parent
    samples = []
    for i, row in enumerate(rows, start=2):
        image = (base / row["image_path"]).resolve()
        if not image.is_file():
            col.problem(csv_path, f"row {i}: image {image} does not exist; re-run `hf-histo clean` on the data.")
            continue
        mask = (base / row["mask_path"]).resolve() if row.get("mask_path") else None
        if mask is not None and not mask.is_file():
            col.problem(csv_path, f"row {i}: mask {mask} does not exist; re-run `hf-histo clean` on the data.")
            continue
        label = row.get("label") or None
        split = row.get("split") or ("train" if label is not None else "test")
        samples.append(Sample(image, mask, label, row["image_id"], row.get("group_id") or row["image_id"], split))
    return samples


_READERS = {
    "challenge": _read_challenge,
    "table": _read_table,
    "class_folders": _read_class_folders,
    "manifest": _read_manifest,
}


def read_exclusions(path: str | Path) -> set[str]:
    """Read an exclusion list: one ``image_id`` per line, ``#`` starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: exclusion file not found; pass a text file with one image id per line.")
    ids = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        item = line.split("#", 1)[0].strip()
        if item:
            ids.add(Path(item).stem if Path(item).suffix.lower() in IMAGE_EXTENSIONS else item)
    return ids


def read_samples(
    data_dir: str | Path,
    layout: str | None = None,
    on_error: OnError = "raise",
    manifest: str | Path | None = None,
    exclude: str | Path | None = None,
) -> SampleSet:
    """Read a data folder into sample records.

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
    if exclude is not None:
        excluded = read_exclusions(exclude)
        samples = [s for s in samples if s.image_id not in excluded]
    if not samples:
        hint = f" ({len(col.skipped)} skipped: {col.skipped[0][0]}: {col.skipped[0][1]})" if col.skipped else ""
        raise DataError(f"{root}: no usable images found in the {layout} layout{hint}.")
    return SampleSet(samples=samples, layout=layout, root=root, skipped=col.skipped)
