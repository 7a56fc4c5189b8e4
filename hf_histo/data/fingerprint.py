"""The patch dataset's cache key: package and patching versions, data-module code, options and source file contents."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import xxhash  # a requirement of `datasets` (its own fingerprints): ~2.5 GB/s here, 4x sha1

from .patching import PATCHING_VERSION
from .sources import SampleSet

__all__ = ["dataset_fingerprint", "package_version"]

# The modules whose code decides a dataset's content: their source is part of the cache key.
CODE_FILES = (
    "sources.py",
    "layouts.py",
    "samples.py",
    "listings.py",
    "images.py",
    "masks.py",
    "patching.py",
    "stain.py",
    "cutting.py",
    "splits.py",
    "builder.py",
    "patch_storage.py",  # raw vs PNG patches: a cache written in one format is never read as the other
)


def package_version() -> str:
    """The installed hf-histo version, or ``"0+unknown"`` for a source tree that is not installed."""
    try:
        return version("hf-histo")
    except PackageNotFoundError:
        return "0+unknown"


def file_digest(path: Path) -> str:
    """A fast hash of a file's bytes (xxh3-128), read in 1 MiB blocks so that large slides stay out of memory."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _content(path: Path | None) -> list[Any] | None:
    # The bytes, not size + mtime: tools that rewrite pixels may keep both (same-size formats, restored mtimes).
    if path is None:
        return None
    return [str(path), os.path.getsize(path), file_digest(path)]


def _code_digest() -> str:
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in CODE_FILES:
        digest.update(name.encode())
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def dataset_fingerprint(sample_set: SampleSet, options: Mapping[str, Any]) -> str:
    """The cache key of a patch dataset: versions, code, options, and a hash of every source file's bytes.

    Changing, adding or removing an image, a mask or a label (or editing the data modules) changes it; touching a
    file (new mtime, same bytes) does not. Hashing costs ~30 ms per 65 MB of images and masks (GlaS train: 85 images).

    Args:
        sample_set: The samples read from the data folder.
        options: Every option that changes the content, as JSON values (``HistoPatchesConfig.options()``);
            its ``exclude`` file, when set, is fingerprinted too.
    """
    tables = [p for p in (sample_set.root / "labels.csv", sample_set.root / "train_labels.csv") if p.is_file()]
    if sample_set.root.is_file():
        tables.append(sample_set.root)
    if options.get("exclude"):
        tables.append(Path(options["exclude"]))
    payload = {
        "hf_histo": package_version(),
        "patching_version": PATCHING_VERSION,
        "code": _code_digest(),
        "options": dict(options),
        "layout": sample_set.layout,
        "tables": [_content(p) for p in tables],
        "samples": [
            [s.image_id, _content(s.image_path), _content(s.mask_path), s.label, s.group_id, s.split]
            for s in sample_set.samples
        ],
        "skipped": sample_set.skipped,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]
