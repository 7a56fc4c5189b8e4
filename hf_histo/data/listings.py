"""Rules for the files that list a data folder's images (label CSVs, manifests, exclusion lists)."""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .images import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

logger = logging.getLogger(__name__)

# Column names are matched case-insensitively, the first accepted name first.
FILE_COLUMNS = ("filename", "sample_index", "image")
LABEL_COLUMNS = ("label", "class")
GROUP_COLUMNS = ("patient_id", "patient", "group_id", "group", "case_id")
# Cells that mean "no value" (the spellings of pandas and spreadsheets), compared case-insensitively.
MISSING_VALUES = frozenset({"", "nan", "none", "null", "na", "n/a", "<na>", "#n/a"})


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV file with a header row: its column names and its rows, every cell stripped.

    Raises:
        DataError: The file is not UTF-8 CSV or has no header row.
    """
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


def find_column(columns: list[str], accepted: Iterable[str]) -> str | None:
    """The column, as spelled in the file, named like the first accepted name that is there (ignoring case)."""
    by_name = {c.lower(): c for c in reversed(columns)}
    return next((by_name[a] for a in accepted if a in by_name), None)


def is_missing(value: str) -> bool:
    """Whether a cell means "no value": empty, or a spelling in ``MISSING_VALUES`` (NaN, None, NA, ...)."""
    return value.strip().lower() in MISSING_VALUES


def no_label(row: int, name: str, raw: str) -> str:
    """The start of the message about a row whose label cell ``raw`` is missing."""
    return f"row {row} ({name!r}) has " + (f"no label ({raw!r} marks a missing value)" if raw else "an empty label")


def absolute(path: Path) -> Path:
    """The absolute path, normalised without following symlinks: the identity of a listed file."""
    return Path(os.path.abspath(path))


def path_inside(folder: Path, written: str, csv_path: Path, row: int, what: str = "the data folder") -> Path:
    """The file a CSV cell names relative to ``folder``, refused when it leaves the folder.

    The check is lexical: symlinks are not resolved, so a link inside the folder (a Hub snapshot's
    link into ``blobs/``, or one the user made) is followed when the file is read.

    Args:
        folder: The folder the names are relative to.
        written: The cell; an absolute path is accepted when it lies inside ``folder``.
        csv_path: The CSV file, named in the error.
        row: The row's line number, named in the error.
        what: How the error calls ``folder``.

    Raises:
        DataError: The path leaves the folder (``..``, or an absolute path elsewhere).
    """
    base = absolute(folder)
    path = absolute(base / written)
    if not path.is_relative_to(base):
        raise DataError(
            f"{csv_path}: the path {written!r} points outside {what} {base} (row {row}); list files by their "
            "path inside it (a symlink inside it may point anywhere)."
        )
    return path


def count(n: int, noun: str, verb: str = "") -> str:
    """``"1 row has"`` / ``"2 rows have"``: a count with its noun (and verb) agreeing."""
    plural = {"has": "have", "matches": "match"}.get(verb, verb)
    return f"{n} {noun}{'' if n == 1 else 's'}" + (f" {verb if n == 1 else plural}" if verb else "")


def few(items: list, k: int = 3) -> str:
    """The first ``k`` items (file names of paths), then how many more."""
    names = [x.name if isinstance(x, Path) else str(x) for x in items]
    return ", ".join(names[:k]) + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def read_exclusions(path: str | Path, known_ids: Iterable[str] | None = None) -> set[str]:
    """Read an exclusion list: one image id (or file name) per line.

    A line starting with ``#`` is a comment, and so is the rest of a line from a ``#`` that follows
    whitespace (``img_7  # blurry``); a ``#`` inside an id (``slide#7``) is part of it. A line that is
    exactly one of ``known_ids`` is that id, whatever it holds (``#3``, ``case #2``), so every id that
    ``hf-histo clean`` writes reads back.

    Args:
        path: The text file.
        known_ids: The data's image ids; ids of the file that are not among them are logged as a warning.

    Returns:
        The image ids to leave out (file names lose their image extension).

    Raises:
        DataError: The file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: exclusion file not found; pass a text file with one image id per line.")
    known, ids = set(known_ids or ()), set()
    for line in path.read_text(encoding="utf-8").splitlines():
        item = line.strip()
        if item not in known:
            item = re.split(r"(?:^|\s)#", item, maxsplit=1)[0].strip()
        if item:
            ids.add(Path(item).stem if Path(item).suffix.lower() in IMAGE_EXTENSIONS else item)
    unknown = sorted(ids - known)
    if known_ids is not None and unknown:
        logger.warning(
            "%s: %s no image (%s); check the spelling: one image id or file name per line, '#' comments.",
            path,
            count(len(unknown), "id", "matches"),
            few([repr(u) for u in unknown]),
        )
    return ids
