"""How the patch dataset stores its rows: the features, and each patch as raw (uncompressed) or PNG bytes."""

from __future__ import annotations

import io
from typing import BinaryIO

import datasets
from PIL import Image

__all__ = ["PATCH_FORMATS", "check_patch_format", "encode_patch", "patch_features", "write_patch"]

# How patches are stored in the Arrow cache (both decode through `datasets.Image`): "raw" is uncompressed RGB
# (PPM), "png" PNG at zlib level 1. On GlaS (benchmarks/bench_data.py) raw takes ~2x the disk of PNG but
# encodes ~40x and decodes ~6x faster, which is what limits the build and the training loader per core.
PATCH_FORMATS = {"raw": ("PPM", {}), "png": ("PNG", {"compress_level": 1})}


def patch_features(label_names: list[str]) -> datasets.Features:
    """Features of the patch dataset (``label`` -1 means "no label")."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(label_names)),
            "image_id": datasets.Value("string"),
            "group_id": datasets.Value("string"),
            "bbox": datasets.List(datasets.Value("int32"), length=4),
            "foreground": datasets.Value("float32"),
            "patch_index": datasets.Value("int32"),
        }
    )


def check_patch_format(patch_format: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``patch_format`` is one of ``PATCH_FORMATS``."""
    if patch_format not in PATCH_FORMATS:
        raise ValueError(f"patch_format={patch_format!r} is not supported; choose one of {list(PATCH_FORMATS)}")


def write_patch(image: Image.Image, stream: BinaryIO, patch_format: str = "raw") -> int:
    """Append a patch, encoded the way the builder stores it (one of ``PATCH_FORMATS``), to ``stream``.

    Returns:
        The number of bytes written.
    """
    check_patch_format(patch_format)
    fmt, options = PATCH_FORMATS[patch_format]
    start = stream.tell()
    image.save(stream, format=fmt, **options)
    return stream.tell() - start


def encode_patch(image: Image.Image, patch_format: str = "raw") -> bytes:
    """Encode a patch the way the builder stores it (one of ``PATCH_FORMATS``)."""
    buffer = io.BytesIO()
    write_patch(image, buffer, patch_format)
    return buffer.getvalue()
