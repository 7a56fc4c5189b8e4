"""Patches cut in worker processes reach the writer through shared memory, intact, and leave nothing behind."""

import errno
import os
import pickle
import time
from pathlib import Path

import pytest
from test_sources import make_table

from hf_histo.data import cutting, workers
from hf_histo.data.builder import build_patch_dataset
from hf_histo.data.cutting import CutImage
from hf_histo.data.patch_storage import patch_features
from hf_histo.data.patching import PatchBox, PatchingConfig
from hf_histo.data.sources import read_samples

IMAGE_TYPE = patch_features(["a", "b"]).arrow_schema.field("image").type
PATCHES = [b"abc", b"", b"defgh", b"i" * 40, b"j"]
SHM = Path("/dev/shm")


def _cut(patches: list[bytes]) -> CutImage:
    boxes = [PatchBox(i, 0, 1, 1, 1.0) for i in range(len(patches))]
    return CutImage(boxes, [len(p) for p in patches], "file", False, b"".join(patches))


def _blocks() -> set[str]:
    return {p.name for p in SHM.glob("psm_*")} if SHM.is_dir() else set()


def _column_bytes(cut: CutImage) -> list[bytes]:
    column = cut.image_column(IMAGE_TYPE)
    assert column.type == IMAGE_TYPE
    rows = column.to_pylist()
    assert all(row["path"] is None for row in rows)
    return [row["bytes"] for row in rows]


def test_shared_patches_come_back_as_the_same_column_and_leave_no_block():
    before = _blocks()
    cut = _cut(PATCHES).share()
    assert cut.data is None and cut.shared is not None
    if SHM.is_dir():
        assert cut.shared.lstrip("/") in _blocks() - before
    assert _column_bytes(cut) == PATCHES
    assert cut.shared is None and _blocks() == before  # unlinked when taken
    assert _column_bytes(_cut(PATCHES)) == PATCHES  # kept in this process: the same column
    assert _cut([]).share().image_column(IMAGE_TYPE).to_pylist() == []


def test_patches_beyond_one_arrow_chunk_are_split_between_patches(monkeypatch):
    monkeypatch.setattr(cutting, "_MAX_CHUNK_BYTES", 10)
    column = _cut(PATCHES).image_column(IMAGE_TYPE)
    assert [row["bytes"] for row in column.to_pylist()] == PATCHES
    assert column.num_chunks == 3  # abc+''+defgh, the 40-byte patch alone (over the limit), j
    assert [len(chunk) for chunk in column.chunks] == [3, 1, 1]


def test_a_full_shared_memory_sends_the_bytes_through_the_pipe(monkeypatch):
    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    before = _blocks()
    cut = _cut(PATCHES).share()
    assert cut.shared is None and cut.data == b"".join(PATCHES) and _blocks() == before
    assert _column_bytes(cut) == PATCHES


def test_a_result_not_written_is_released():
    before = _blocks()
    cut = _cut(PATCHES).share()
    cut.release()
    assert cut.shared is None and _blocks() == before
    cut.release()  # twice is harmless


def _shared_after(item: int) -> CutImage:
    time.sleep(0.01)
    return _cut([bytes([item]) * 8]).share()


def test_a_stopped_map_hands_what_it_computed_but_did_not_yield_to_discard():
    before, discarded = _blocks(), []
    pool = workers.process_pool(2)
    try:
        cutting.prepare_sharing()
        stopped = workers.ordered_map(_shared_after, range(30), pool, discarded.append)
        first = next(stopped)
        time.sleep(0.3)  # the worker finishes what it had started
        stopped.close()
    finally:
        pool.shutdown()
    assert _column_bytes(first) == [bytes([0]) * 8]
    assert discarded and all(isinstance(cut, CutImage) for cut in discarded)
    for cut in discarded:
        cut.release()
    assert _blocks() == before


def test_a_two_process_build_leaves_no_shared_memory(tmp_path):
    root = make_table(tmp_path / "data", [(f"im{i:02d}.png", "ab"[i % 2], f"p{i}") for i in range(8)])
    patching = PatchingConfig(strategy="grid", patch_size=24, stride=16, min_foreground=10)
    before = _blocks()
    data, report = build_patch_dataset(root, patching, val_fraction=0, cache_dir=tmp_path / "c", num_proc=2)
    assert len(data["train"]) == sum(report.n_patches.values()) > 8
    if not SHM.is_dir():
        pytest.skip("no /dev/shm to inspect on this OS")
    assert _blocks() == before


def test_a_cut_held_in_a_buffer_view_pickles_through_the_pipe(monkeypatch):
    monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    cut = _cut(PATCHES)
    cut.data = memoryview(bytearray(cut.data))  # what cut_sample hands over: its encoding buffer, not a copy
    cut.share()
    assert isinstance(cut.data, bytes)
    assert _column_bytes(pickle.loads(pickle.dumps(cut))) == PATCHES


def test_one_cutter_cuts_every_split_in_order_and_frees_what_a_stop_leaves(tmp_path):
    root = make_table(tmp_path / "data", [(f"im{i:02d}.png", "ab"[i % 2], f"p{i}") for i in range(9)])
    samples = read_samples(root).samples
    splits = [samples[:5], samples[5:7], samples[7:]]
    options = {"patching": PatchingConfig(strategy="grid", patch_size=24, stride=16), "patch_format": "raw"}
    expected = [_column_bytes(cutting.cut_sample(s, **options)) for s in samples]
    before, pool = _blocks(), workers.process_pool(2)
    try:
        cutting.prepare_sharing()
        cutter = cutting.SplitCutter(splits, options, pool)
        assert not cutter.expects(splits[1])
        got = [_column_bytes(cut) for split in splits[:2] for cut in cutter.cut(split)]
        with pytest.raises(ValueError, match="not the next split"):
            next(cutter.cut(splits[0]))
        cutter.close()  # the third split, cut ahead, is never written
    finally:
        pool.shutdown()
    assert got == expected[:7]
    assert _blocks() == before
