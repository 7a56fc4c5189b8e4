"""Cut one sample's patches in any process, and hand them to the writing process through shared memory."""

from __future__ import annotations

import functools
import io
import mmap
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np
import pyarrow as pa

from .images import DataError, load_image
from .masks import resolve_mask
from .patch_storage import write_patch
from .patching import PatchBox, PatchingConfig, crop_patch
from .sources import Sample
from .stain import normalize_stain
from .workers import ordered_map

__all__ = ["CutImage", "SplitCutter", "cut_sample", "decode_sample", "prepare_sharing"]

_MAX_CHUNK_BYTES = 2**30  # Arrow `binary` offsets are int32: one image's patches go in chunks below 2 GiB


@dataclass
class CutImage:
    """One image's encoded patches, concatenated in one buffer, with their boxes and how its mask was resolved.

    A worker process moves the buffer into shared memory (`share`) so that only its name and the sizes travel
    through the pool's pipe; the writing process reads it in place (`take`). Pickling the patches through the
    pipe cost ~0.3 s per 130 MB of raw patches on GlaS, a fifth of a 2-process build.

    Attributes:
        boxes: The patch boxes, in order.
        sizes: The byte size of each encoded patch.
        source: Where the mask came from (``resolve_mask``).
        fell_back: Whether the patching fell back to the whole image.
        data: The concatenated patches (None while they are in shared memory).
        shared: The name of the shared-memory block holding them, or None.
    """

    boxes: list[PatchBox]
    sizes: list[int]
    source: str
    fell_back: bool
    data: bytes | memoryview | None = None
    shared: str | None = None

    def share(self) -> CutImage:
        """Move the patches into a new shared-memory block (in place); keep them here if the OS has no room."""
        if self.data is not None and len(self.data) and self._to_shared_memory():
            return self
        if self.data is not None:
            self.data = bytes(self.data)  # what the pipe can carry (a memoryview does not pickle)
        return self

    def _to_shared_memory(self) -> bool:
        try:
            block = shared_memory.SharedMemory(create=True, size=len(self.data))
        except OSError:
            return False
        try:
            # Written with pwrite, not through the mapping: no page fault per 4 KiB, and a full tmpfs fails the
            # write with ENOSPC (a store through a mapping would kill this process with SIGBUS).
            view, done = memoryview(self.data), 0
            while done < len(view):
                done += os.pwrite(block._fd, view[done:], done)
        except (OSError, AttributeError):  # full /dev/shm, or no file descriptor (Windows): use the pipe
            block.close()
            block.unlink()
            return False
        self.shared, self.data = block.name, None
        block.close()
        return True

    def take(self) -> pa.Buffer:
        """The concatenated patches as an Arrow buffer (call once, in the writing process).

        A shared block is unlinked at once (nothing is left behind if this process dies) and read in place: the
        buffer keeps the mapping alive until Arrow lets go of it, so the writer copies the patches only into the file.
        """
        if self.shared is None:
            return pa.py_buffer(self.data or b"")
        block = shared_memory.SharedMemory(name=self.shared)
        block.unlink()
        self.shared = None
        size = sum(self.sizes)
        # Mapped again, read-only and populated in one call (Linux): the writer then copies the patches into the
        # file without a page fault per few pages. The mapping outlives the block's descriptor, closed here.
        populate = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(block._fd, size, flags=populate, prot=mmap.PROT_READ)
        block.close()
        view = np.frombuffer(mapping, dtype=np.uint8, count=size)
        address = view.ctypes.data
        del view  # no buffer export may outlive this call: the mapping closes when Arrow lets go of it
        return pa.foreign_buffer(address, size, base=mapping)

    def release(self) -> None:
        """Free the shared memory of a result that will not be written (a stopped build)."""
        if self.shared is not None:
            try:
                shared_memory.SharedMemory(name=self.shared).unlink()
            except FileNotFoundError:
                pass
            self.shared = None

    def image_column(self, image_type: pa.DataType) -> pa.ChunkedArray:
        """The patches as the ``image`` column (``{"bytes", "path": None}`` structs) without a copy per patch."""
        data, n = self.take(), len(self.sizes)
        bytes_type, path_type = image_type.field("bytes").type, image_type.field("path").type
        ends = np.cumsum(self.sizes, dtype=np.int64)
        bounds = [0]  # patch index ranges whose bytes fit one chunk (at least one patch each)
        while bounds[-1] < n:
            base = int(ends[bounds[-1] - 1]) if bounds[-1] else 0
            last = int(np.searchsorted(ends, base + _MAX_CHUNK_BYTES, side="right"))
            bounds.append(min(max(last, bounds[-1] + 1), n))
        chunks = []
        for first, last in zip(bounds, bounds[1:]):
            start = int(ends[first - 1]) if first else 0
            offsets = pa.py_buffer(np.concatenate([[0], ends[first:last] - start]).astype(np.int32))
            values = data.slice(start, int(ends[last - 1]) - start)
            binary = pa.Array.from_buffers(bytes_type, last - first, [None, offsets, values])
            paths = pa.nulls(last - first, path_type)
            chunks.append(pa.StructArray.from_arrays([binary, paths], fields=list(image_type)))
        return pa.chunked_array(chunks, type=image_type)


def prepare_sharing() -> None:
    """Start the resource tracker in this process before worker processes fork, so that they share it.

    A block a worker creates and the writer frees is then registered and unregistered with one tracker (no
    "leaked shared_memory" warning), and a block left by a killed build is freed when the tracker exits.
    """
    resource_tracker.ensure_running()


def decode_sample(
    sample: Sample, patching: PatchingConfig, resize_masks: bool = False, max_image_pixels: int | None = None
) -> tuple[Any, Any, str]:
    """The sample's RGB image, its mask (an array) and where the mask came from; raises ``DataError``."""
    image = load_image(sample.image_path, max_image_pixels)
    mask, source = resolve_mask(
        image, sample.mask_path, patching.empty_fallback, resize_masks, sample.image_path, max_image_pixels
    )
    return image, mask, source


def cut_sample(
    sample: Sample,
    patching: PatchingConfig,
    patch_format: str,
    resize_masks: bool = False,
    max_image_pixels: int | None = None,
    share: bool = False,
) -> CutImage | DataError:
    """A sample's encoded patches (``CutImage``), moved to shared memory with ``share``; or its ``DataError``.

    The error is returned, not raised: the caller decides (``on_error``) in whichever process this ran.
    """
    try:
        image, mask, source = decode_sample(sample, patching, resize_masks, max_image_pixels)
    except DataError as e:
        return e
    image = normalize_stain(image, patching.stain_norm, str(sample.image_path))  # the mask is the original image's
    boxes, fell_back = patching.boxes_with_fallback(mask)
    stream, paint = io.BytesIO(), patching.paint_background
    # one growing buffer, read without a copy: no bytes object per patch and no join (130 MB of copies on GlaS)
    sizes = [write_patch(crop_patch(image, box, mask, paint), stream, patch_format) for box in boxes]
    cut = CutImage(boxes, sizes, source, fell_back, stream.getbuffer())
    return cut.share() if share else cut


class SplitCutter:
    """Cuts the samples of every split in one ordered map, in the order the splits are written.

    A map per split drained at each split's end (the writer waited for the last image while the other processes
    idled through the split's finalisation); one map keeps every process cutting the next split meanwhile.

    Args:
        splits: The samples of each split, in the order they are written.
        options: `cut_sample`'s options (``patching``, ``patch_format``, ...).
        pool: Worker processes (from `workers.process_pool`), or None to cut in this process.
    """

    def __init__(self, splits: Sequence[Sequence[Sample]], options: dict[str, Any], pool: Executor | None = None):
        self._order = [sample for split in splits for sample in split]
        self._taken = 0
        here = functools.partial(cut_sample, **options)  # in this process: nothing to share
        fn = functools.partial(cut_sample, **options, share=True) if pool is not None else here
        self._results = ordered_map(fn, self._order, pool, release, here)

    def expects(self, samples: Sequence[Sample]) -> bool:
        """Whether `samples` are the next samples of the order given (a split this cutter can hand out)."""
        coming = self._order[self._taken : self._taken + len(samples)]
        return len(coming) == len(samples) and all(a is b for a, b in zip(coming, samples))

    def cut(self, samples: Sequence[Sample]) -> Iterator[CutImage | DataError]:
        """The results of `samples` (which `expects`), in order."""
        if not self.expects(samples):
            raise ValueError("SplitCutter.cut: the samples are not the next split of the order it was given")
        for _ in samples:
            self._taken += 1
            yield next(self._results)

    def close(self) -> None:
        """Stop cutting; results computed and not handed out are released (their shared memory freed)."""
        self._results.close()


def release(result: CutImage | DataError) -> None:
    """Free what a result not written holds outside this process (a no-op for errors and unshared results)."""
    if isinstance(result, CutImage):
        result.release()
