"""Small shared helpers: atomic file writes and CSV cells that spreadsheets cannot run."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from PIL import Image


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` that replaces ``path`` when the block succeeds.

    The temporary file lives in the same folder so that the final ``os.replace`` is atomic; on an
    exception it is removed and ``path`` is left as it was. The result gets the permissions of a file
    opened normally (0o666 minus the umask); ``tempfile.mkstemp`` would leave it owner-only (0o600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{path.suffix}")
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (temp file + rename)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_image(path: str | Path, image: Image.Image, **save_kw) -> Path:
    """Save a PIL image atomically; the format comes from the suffix of ``path``."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **save_kw)
    return path


def atomic_savefig(path: str | Path, figure, **save_kw) -> Path:
    """Save a matplotlib figure atomically; the format comes from the suffix of ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", **save_kw)
    return path


# A cell starting with one of these is run as a formula by spreadsheet programs (OWASP CSV injection).
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: object) -> object:
    """A CSV cell that spreadsheets show as text: strings starting like a formula get a leading ``'`` (OWASP)."""
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
        return "'" + value
    return value
