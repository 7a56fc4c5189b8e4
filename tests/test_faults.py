"""Faults: stale cache, killed builds and runs, skipped validation groups, output folders of another run."""

import hashlib
import json
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_hub import tiny_model
from test_sources import make_table, mask_image, tissue_image

from hf_histo.data.builder import build_patch_dataset
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.sources import read_samples
from hf_histo.data.splits import split_samples
from hf_histo.data.synthetic import make_synthetic_dataset
from hf_histo.hub import REQUIRED_FILES, hub_upload_files, save_for_hub
from hf_histo.hub import folder as hub_folder
from hf_histo.training.arguments import parse_args
from hf_histo.training.finalize import last_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = PatchingConfig(strategy="topk", patch_size=32, top_k=2)
ROWS = [(f"im{i}.png", "ab"[i % 2], f"p{i}") for i in range(6)]
FINAL_FILES = ("config.json", "model.safetensors", "metrics.json", "splits.json", "README.md", "plots")

# The wrapper run in a subprocess: it patches one library function so that its Nth call SIGKILLs the process (a
# deterministic kill point, with no test hook in the library), then runs CODE.
WRAPPER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import conftest  # offline Hugging Face libraries

calls = [0]


def hit(n):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)


{patch}
{code}
"""

KILL_IN_SPLIT = """
from hf_histo.data.builder import HistoPatches
original = HistoPatches._generate_tables


def generate(self, samples, split):
    for item in original(self, samples, split):
        if split == {split!r}:
            hit({n})
        yield item


HistoPatches._generate_tables = generate
"""
KILL_IN_CHECKPOINT_SAVE = """
import transformers
original = transformers.Trainer._save_optimizer_and_scheduler


def save(self, output_dir):
    hit({n})  # the checkpoint's weights are written, its optimizer and trainer state are not
    return original(self, output_dir)


transformers.Trainer._save_optimizer_and_scheduler = save
"""
KILL_IN_FINAL_SAVE = """
import hf_histo.hub.folder as folder
original = folder.write_model_card


def write(*args, **kwargs):
    hit({n})  # the final weights, processor, code and plots are written, the card is not
    return original(*args, **kwargs)


folder.write_model_card = write
"""
BUILD = """
from hf_histo.data.builder import build_patch_dataset
from hf_histo.data.patching import PatchingConfig

build_patch_dataset({root!r}, PatchingConfig(**{patching!r}), val_fraction={val!r}, cache_dir={cache!r})
"""
RECIPE = """
import runpy

sys.argv = [{script!r}, *{argv!r}]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_killed(tmp_path: Path, patch: str, code: str, killed: bool = True) -> subprocess.CompletedProcess:
    """Run CODE in a fresh interpreter with PATCH applied; assert it died of SIGKILL (or, ``killed=False``, ended)."""
    script = tmp_path / f"wrapper_{len(list(tmp_path.glob('wrapper_*')))}.py"
    script.write_text(WRAPPER.format(tests=str(ROOT / "tests"), patch=patch, code=code))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    expected = -signal.SIGKILL if killed else 0
    assert result.returncode == expected, result.stderr[-3000:]
    return result


def rows(data) -> list[tuple]:
    """Every patch of a DatasetDict: split, image id, index, box, pixel digest."""
    out = []
    for name, split in data.items():
        for r in split:
            digest = hashlib.sha1(np.asarray(r["image"]).tobytes()).hexdigest()
            out.append((name, r["image_id"], r["patch_index"], tuple(r["bbox"]), r["label"], digest))
    return sorted(out)


def counts(report) -> tuple:
    return report.splits, report.mask_sources, report.patches_per_image, report.images, report.skipped


class Killed(Exception):
    """Stands for a kill in an in-process scenario."""


def save_uncompressed(image: Image.Image, path: Path) -> None:
    """PNG without compression: the file size depends on the image size only, never on the pixels."""
    image.save(path, compress_level=0)


def set_mtime(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


# ---- the cases, one row each --------------------------------------------------------------------------------
def stale_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2: new pixels in an image or a mask with the same size and mtime rebuild (the key is the content)."""
    root = make_table(tmp_path / "data", ROWS)
    for i in range(len(ROWS)):  # same sizes whatever the pixels
        save_uncompressed(tissue_image(i), root / "images" / f"im{i}.png")
        save_uncompressed(mask_image(i), root / "masks" / f"im{i}.png")
    kwargs = dict(val_fraction=0, cache_dir=tmp_path / "cache")
    first, report = build_patch_dataset(root, SMALL, **kwargs)
    for path, new in ((root / "masks" / "im0.png", mask_image(50)), (root / "images" / "im1.png", tissue_image(51))):
        stat = path.stat()
        save_uncompressed(new, path)
        set_mtime(path, stat.st_mtime_ns)
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
        data, again = build_patch_dataset(root, SMALL, **kwargs)
        assert not again.cached, f"{path.name}: new pixels, same size and mtime reused the old patches"
        fresh, _ = build_patch_dataset(root, SMALL, val_fraction=0, cache_dir=tmp_path / f"fresh-{path.parent.name}")
        assert rows(data) == rows(fresh) != rows(first)
    assert build_patch_dataset(root, SMALL, **kwargs)[1].cached  # unchanged content: the cache again


def killed_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """3: a build killed after its train split rebuilds with an exact report (no records of the killed run)."""
    root = make_table(tmp_path / "data", ROWS)
    expected, report = build_patch_dataset(root, SMALL, val_fraction=0.34, cache_dir=tmp_path / "reference")
    code = BUILD.format(root=str(root), patching=SMALL.to_dict(), val=0.34, cache=str(tmp_path / "cache"))
    run_killed(tmp_path, KILL_IN_SPLIT.format(split="validation", n=1), code)
    assert list((tmp_path / "cache").rglob("*.incomplete/hf_histo_records/*.json")), "the kill left records behind"
    data, rerun = build_patch_dataset(root, SMALL, val_fraction=0.34, cache_dir=tmp_path / "cache")
    assert counts(rerun) == counts(report) and rows(data) == rows(expected)


def skipped_validation_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """13: ``on_error="skip"`` of the one validation image: the first build and its reruns agree."""
    root = make_table(tmp_path / "data", ROWS)
    _, validation = split_samples(read_samples(root).train, 0.17, 0)
    assert len(validation) == 1
    bad = root / "images" / f"{validation[0].image_id}.png"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    good = [s for s in read_samples(root).train if s.image_id != validation[0].image_id]
    builds = [
        build_patch_dataset(root, SMALL, val_fraction=0.17, on_error="skip", cache_dir=tmp_path / "c")
        for _ in range(2)
    ]
    (first, report), (second, cached) = builds
    assert cached.cached and rows(first) == rows(second) and counts(report) == counts(cached)
    assert [Path(file).name for file, _ in report.skipped] == [bad.name]
    # The bad file is known before splitting: validation is drawn from the readable images.
    assert set(first["validation"]["image_id"]) == {s.image_id for s in split_samples(good, 0.17, 0)[1]}


def output_dir_of_another_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """11: a folder holding another run is refused, unless resumed from its checkpoint or overwritten."""
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    for name in ("config.json", "metrics.json", "README.md"):
        (out / name).write_text("{}")
    (out / "notes.txt").write_text("mine")
    argv = ["--data_dir", "D", "--output_dir", str(out)]
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(out))}.*another run.*--overwrite_output_dir.*--resume_from_checkpoint"
    ):
        parse_args({}, argv)
    resumed = parse_args({}, [*argv, "--resume_from_checkpoint", str(out / "checkpoint-2")])[2]
    assert resumed.resume_from_checkpoint == str(out / "checkpoint-2") and (out / "config.json").is_file()
    with pytest.raises(ValueError, match="another run"):  # a checkpoint of another folder does not resume this one
        parse_args({}, [*argv, "--resume_from_checkpoint", str(tmp_path / "elsewhere" / "checkpoint-2")])
    assert parse_args({}, [*argv, "--overwrite_output_dir"])[2].overwrite_output_dir
    # Checkpoints go; files of unknown origin (a README.md may be the user's) stay, to be replaced by the final save.
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "metrics.json", "notes.txt"]
    (out / "checkpoint-4").mkdir()
    (out / ".final_files.json").write_text('["README.md", "config.json", "metrics.json"]')  # a save listed them
    parse_args({}, [*argv, "--overwrite_output_dir"])
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the old run is gone, other files stay
    assert parse_args({}, argv)[2].output_dir == str(out)  # nothing of a run left: accepted


def final_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """11: a final save that dies half-way leaves the previous complete final files, never a mix."""
    out = tmp_path / "model"
    save_for_hub(tiny_model(), out, image_processor=32)

    def files() -> dict:  # the folder's files, outside the staging folder
        return {
            p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and ".final-tmp" not in p.parts
        }

    before = files()

    def die(*args, **kwargs):
        raise Killed  # as a kill would, after the weights were written

    monkeypatch.setattr(hub_folder, "write_model_card", die)
    other = tiny_model()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(1.0)
    with pytest.raises(Killed):
        save_for_hub(other, out, image_processor=64)
    assert files() == before, "a failed final save changed the previous final files"
    monkeypatch.undo()
    save_for_hub(other, out, image_processor=64)  # the next save completes (and clears the abandoned one)
    other.save_pretrained(tmp_path / "direct")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "direct" / "model.safetensors").read_bytes()
    assert not (out / ".final-tmp").exists()


CASES = {
    "2-stale-cache": stale_cache,
    "3-killed-build-report": killed_build,
    "13-skip-the-validation-group": skipped_validation_group,
    "11-output-dir-of-another-run": output_dir_of_another_run,
    "11-final-save-atomic": final_save_is_atomic,
}


@pytest.mark.filterwarnings("ignore:cannot stratify")  # 6 one-image groups: split by group only
@pytest.mark.parametrize("case", CASES)
def test_fault_case(case, tmp_path, monkeypatch):
    CASES[case](tmp_path, monkeypatch)


# ---- SIGKILL at deterministic points, then rerun --------------------------------------------------------------------
KILL_IN_REPORT = """
from hf_histo.data.build_report import BuildReport
original = BuildReport.from_records.__func__


def from_records(cls, *args, **kwargs):
    hit({n})  # every patch is written, the report is not
    return original(cls, *args, **kwargs)


BuildReport.from_records = classmethod(from_records)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "patch", [KILL_IN_SPLIT.format(split="train", n=3), KILL_IN_REPORT.format(n=1)], ids=["mid-split", "report"]
)
def test_sigkill_during_build_then_rerun_equals_an_uninterrupted_build(tmp_path, patch):
    root = make_table(tmp_path / "data", ROWS)
    expected, report = build_patch_dataset(root, SMALL, val_fraction=0.34, cache_dir=tmp_path / "reference")
    code = BUILD.format(root=str(root), patching=SMALL.to_dict(), val=0.34, cache=str(tmp_path / "cache"))
    run_killed(tmp_path, patch, code)
    assert list((tmp_path / "cache").rglob("*.incomplete")), "the kill left the build folder behind"
    data, rerun = build_patch_dataset(root, SMALL, val_fraction=0.34, cache_dir=tmp_path / "cache")
    assert not rerun.cached and counts(rerun) == counts(report) and rows(data) == rows(expected)
    assert not list((tmp_path / "cache").rglob("*.incomplete"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_synthetic_dataset(root / "data", n_train=8, n_test=0, size_range=(128, 160), seed=0)
    return root


def recipe_argv(demo: Path, out: Path, *extra: str) -> list[str]:
    """resnet_scratch on the demo data: 2 epochs, a checkpoint (and evaluation) after each."""
    return [
        "--demo", "--data_dir", str(demo / "data"), "--cache_dir", str(demo / "cache"), "--output_dir", str(out),
        "--num_train_epochs", "2", "--use_cpu", "--image_size", "32", "--patch_size", "64", "--stride", "64",
        "--val_fraction", "0.25", "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0",
        "--n_bootstrap", "20", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def recipe(demo: Path, out: Path, *extra: str) -> str:
    return RECIPE.format(script=str(ROOT / "recipes" / "resnet_scratch.py"), argv=recipe_argv(demo, out, *extra))


def run_recipe(demo: Path, out: Path, *extra: str) -> None:
    """An uninterrupted run, in this process (as tests/test_recipes.py runs them)."""
    old = sys.argv
    sys.argv = [str(ROOT / "recipes" / "resnet_scratch.py"), *recipe_argv(demo, out, *extra)]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = old


def final_state(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    keep = ("metrics", "image_ids", "y_true", "probs", "global_step", "patch_metrics")
    return {k: metrics[k] for k in keep} | {"splits": json.loads((out / "splits.json").read_text())}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:cannot stratify")  # 8 demo images of 4 classes
def test_sigkill_during_checkpoint_and_final_save_then_resume_equals_an_uninterrupted_run(demo, tmp_path):
    reference = tmp_path / "reference"
    run_recipe(demo, reference)

    out = tmp_path / "run"
    run_killed(tmp_path, KILL_IN_CHECKPOINT_SAVE.format(n=2), recipe(demo, out))  # dies saving the epoch-2 checkpoint
    first, partial = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert last_complete_checkpoint(out) == first
    with pytest.raises(ValueError, match="another run"):  # a fresh run does not take the folder over
        parse_args({}, recipe_argv(demo, out))
    run_killed(tmp_path, KILL_IN_FINAL_SAVE.format(n=1), recipe(demo, out, "--resume_from_checkpoint", str(first)))
    assert (partial / "trainer_state.json").is_file(), "the resumed run saved the epoch-2 checkpoint again"
    assert not [name for name in FINAL_FILES if (out / name).exists()], "a killed final save left final files"

    run_recipe(demo, out, "--resume_from_checkpoint", str(last_complete_checkpoint(out)))
    assert final_state(out) == final_state(reference)
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert set(REQUIRED_FILES) <= set(hub_upload_files(out)) and (out / "plots" / "training_curves.png").is_file()
    assert not (out / ".final-tmp").exists()
