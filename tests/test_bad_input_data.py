"""Bad inputs of the reliability issue: each row writes a broken folder and names the error, warning or value it gives."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import shared_dataset
from PIL import Image

from hf_histo.data.builder import build_patch_dataset
from hf_histo.data.cleaning import CleaningConfig, clean_dataset
from hf_histo.data.images import DataError
from hf_histo.data.masks import load_mask, resolve_mask
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.sources import read_samples

TOP1 = PatchingConfig(strategy="topk", patch_size=32, top_k=1)
SIZE = (64, 48)  # width, height of the generated images

Action = Callable[[], Any]


@dataclass(frozen=True)
class Expect:
    """What a row must produce: a DataError, a logged warning (the call still succeeds), and/or a value.

    Attributes:
        error: Regex of the DataError message (it names the file and the fix).
        warning: Regex that one logged warning must match.
        value: What the action returns (checked when not None).
    """

    error: str | None = None
    warning: str | None = None
    value: Any = None


# ------------------------------------------------------------------------------------------------ writers


def tissue(seed: int) -> Image.Image:
    """A small H&E-like image: a noisy pink disc on white."""
    rng = np.random.default_rng(seed)
    w, h = SIZE
    arr = np.full((h, w, 3), 245, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    disc = (xx - w * rng.uniform(0.35, 0.65)) ** 2 + (yy - h * rng.uniform(0.35, 0.65)) ** 2 < (h * 0.4) ** 2
    arr[disc] = np.clip(np.array([215, 120, 180]) + rng.integers(-25, 25, (int(disc.sum()), 3)), 0, 255)
    return Image.fromarray(arr)


def box_mask() -> Image.Image:
    arr = np.zeros(SIZE[::-1], np.uint8)
    arr[8:40, 10:50] = 255
    return Image.fromarray(arr)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def table(root: Path, rows: list[list[str]], header: list[str] | None = None, mask_name: str | None = "{}") -> Path:
    """Table layout: images/<name>, masks/<mask_name of the stem> (None: no masks/), labels.csv."""
    (root / "images").mkdir(parents=True)
    if mask_name is not None:
        (root / "masks").mkdir()
    for i, row in enumerate(rows):
        name = row[0]
        if "/" not in name:
            tissue(i).save(root / "images" / name)
            if mask_name is not None:
                box_mask().save(root / "masks" / mask_name.format(name))
    write_csv(root / "labels.csv", header or ["filename", "label", "patient_id"], rows)
    return root


def challenge(root: Path, labels: list[str]) -> Path:
    """Challenge layout: train_data/img_NNNN.png + mask_NNNN.png and train_labels.csv."""
    (root / "train_data").mkdir(parents=True)
    for i in range(len(labels)):
        tissue(i).save(root / "train_data" / f"img_{i:04d}.png")
        box_mask().save(root / "train_data" / f"mask_{i:04d}.png")
    write_csv(
        root / "train_labels.csv", ["sample_index", "label"], [[f"img_{i:04d}.png", x] for i, x in enumerate(labels)]
    )
    return root


def snapshot(src: Path, dst: Path) -> Path:
    """Lay ``src`` out as ``huggingface_hub.snapshot_download`` does: every file a symlink into a sibling blobs/."""
    blobs = dst.parent / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()  # identical files share one blob
        blob.write_bytes(data)
        link = dst / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return dst


def read(root: Path, what: str = "ids", **kwargs: Any) -> Action:
    """An action reading ``root``: its image ids, labels, (id, label, group, split) rows or the SampleSet."""

    def action() -> Any:
        s = read_samples(root, **kwargs)
        if what == "ids":
            return [x.image_id for x in s.samples]
        if what == "labels":
            return s.labels
        if what == "rows":
            return [(x.image_id, x.label, x.group_id, x.split) for x in s.samples]
        return s

    return action


def save_instance_mask(path: Path, labels: np.ndarray) -> Path:
    """Save an instance-id mask (0 background, 1..N objects) losslessly, 8- or 16-bit."""
    Image.fromarray(labels.astype(np.uint8 if labels.max() < 256 else np.uint16)).save(path)
    return path


# ------------------------------------------------------------------------- case 1: mask values and encodings


def glands_numbered(tmp: Path) -> Action:
    arr = np.zeros((80, 80), np.uint8)
    for k in range(16):  # 16 glands numbered 1..16, 10x10 each: a quarter of the image
        r, c = divmod(k, 4)
        arr[r * 20 + 5 : r * 20 + 15, c * 20 + 5 : c * 20 + 15] = k + 1
    path = save_instance_mask(tmp / "glands.png", arr)
    return lambda: float(load_mask(path).mean())


def nuclei_numbered_16bit(tmp: Path) -> Action:
    arr = np.zeros((90, 120), np.uint16)
    for k in range(300):  # 300 nuclei numbered 1..300 (a 16-bit PNG), 3x3 each in 6x6 cells
        r, c = divmod(k, 20)
        arr[r * 6 : r * 6 + 3, c * 6 : c * 6 + 3] = k + 1
    path = save_instance_mask(tmp / "nuclei.png", arr)
    return lambda: float(load_mask(path).mean())


def glas_numbered(tmp: Path) -> Action:
    from scipy import ndimage

    binary = shared_dataset("glas_train") / "masks" / "train_12.png"
    labels, n = ndimage.label(np.asarray(Image.open(binary)) > 0)
    assert n == 16  # train_12 has 16 glands; the figure (0.596, was 0.28)
    path = save_instance_mask(tmp / "train_12.png", labels)
    return lambda: (round(float(load_mask(path).mean()), 3), round(float(load_mask(binary).mean()), 3))


def _jpeg_truth() -> tuple[np.ndarray, np.ndarray]:
    """A 0/255 box and a 0/90 box (e.g. tumour and stroma), and which pixels are region of interest."""
    arr = np.zeros((96, 128), np.uint8)
    arr[13:81, 5:59] = 255  # edges off the 8x8 JPEG blocks: ringing around them
    arr[13:81, 69:123] = 90
    return arr, arr > 0


def jpeg_two_levels(tmp: Path) -> Action:
    arr, truth = _jpeg_truth()
    Image.fromarray(arr).save(tmp / "mask.jpg", quality=85)
    return lambda: bool(np.mean(load_mask(tmp / "mask.jpg") != truth) < 0.01)


def jpeg_noise_is_background(tmp: Path) -> Action:
    arr, truth = _jpeg_truth()
    arr[arr > 0] = 255
    Image.fromarray(arr).save(tmp / "mask.jpg", quality=60)
    assert (np.asarray(Image.open(tmp / "mask.jpg"))[~truth] > 0).any(), "the JPEG must have noise around 0"
    image = Image.new("RGB", (128, 96), (230, 150, 200))
    # A mask file, and a PIL image opened from JPEG (as a pipeline caller passes it).
    return lambda: (
        bool(np.mean(load_mask(tmp / "mask.jpg") != truth) < 0.01),
        bool(np.mean(resolve_mask(image, Image.open(tmp / "mask.jpg"))[0] != truth) < 0.01),
    )


# ------------------------------------------------------------------------------------ case 4: exclusion lists


def hash_in_id(tmp: Path) -> Action:
    root = table(tmp / "data", [["a.png", "x", "p1"], ["slide#7.png", "y", "p2"]])
    (tmp / "exclusions.txt").write_text("slide#7\n")
    return read(root, exclude=tmp / "exclusions.txt")


def clean_then_build_exclude(tmp: Path) -> Action:
    names = ["a", "b", "c", "slide#7", "#3", "case #2"]
    root = table(tmp / "data", [[f"{n}.png", "xy"[i % 2], f"p{i}"] for i, n in enumerate(names)])
    manual = {"slide#7", "#3", "case #2"}
    clean_dataset(root, tmp / "out", manual_exclusions=manual, config=CleaningConfig(num_workers=0), progress=False)

    def action() -> tuple[bool, bool]:
        written = set((tmp / "out" / "exclusions.txt").read_text(encoding="utf-8").splitlines())
        excluded = set(names) - set(read(root, exclude=tmp / "out" / "exclusions.txt")())
        return excluded == written, manual <= excluded

    return action


def inline_comment(tmp: Path) -> Action:
    root = table(tmp / "data", [["a.png", "x", "p1"], ["b.png", "y", "p2"]])
    (tmp / "exclusions.txt").write_text("# checked by hand\n\na.png   # out of focus\n")
    return read(root, exclude=tmp / "exclusions.txt")


def unknown_exclusion(tmp: Path) -> Action:
    root = table(tmp / "data", [["a.png", "x", "p1"], ["b.png", "y", "p2"]])
    (tmp / "exclusions.txt").write_text("a\nzz_typo\n")
    return read(root, exclude=tmp / "exclusions.txt")


# ---------------------------------------------------------------------------------------------- case 5: labels


def nan_label(tmp: Path) -> Action:
    return read(table(tmp / "data", [["a.png", "x", "p1"], ["b.png", "NaN", "p2"], ["c.png", "y", "p3"]]), "rows")


def empty_label_no_split(tmp: Path) -> Action:
    return read(table(tmp / "data", [["a.png", "x", "p1"], ["b.png", "", "p2"], ["c.png", "y", "p3"]]), "rows")


def empty_label_split_train(tmp: Path) -> Action:
    rows = [["a.png", "x", "p1", "train"], ["b.png", "", "p2", "train"]]
    return read(table(tmp / "data", rows, ["filename", "label", "patient_id", "split"]))


def unlabelled_test_row(tmp: Path) -> Action:
    rows = [["a.png", "x", "p1", ""], ["b.png", "", "p2", "test"]]
    return read(table(tmp / "data", rows, ["filename", "label", "patient_id", "split"]), "rows")


def case_variants(tmp: Path) -> Action:
    rows = [["a.png", "Benign", "p1"], ["b.png", "benign", "p2"], ["c.png", "malignant", "p3"]]
    return read(table(tmp / "data", rows), "labels")


def class_column(tmp: Path) -> Action:
    root = table(tmp / "data", [["a.png", "x", "p1"], ["b.png", "y", "p2"]], ["filename", "class", "patient_id"])
    return lambda: sorted(build_patch_dataset(root, TOP1, val_fraction=0, cache_dir=tmp / "cache")[0])


def unknown_label_column(tmp: Path) -> Action:
    return read(table(tmp / "data", [["a.png", "x", "p1"]], ["filename", "diagnosis", "patient_id"]))


def header_case(tmp: Path) -> Action:
    return read(table(tmp / "data", [["a.png", "x", "p1"]], ["Filename", "Label", "Patient"]), "rows")


def patient_column(tmp: Path) -> Action:
    rows = [["a.png", "x", "p1"], ["b.png", "y", "p1"]]
    return read(table(tmp / "data", rows, ["filename", "label", "patient"]), "rows")


def unknown_group_column(tmp: Path) -> Action:
    rows = [["a.png", "x", "p1"], ["b.png", "y", "p1"]]
    return read(table(tmp / "data", rows, ["filename", "label", "pid"]), "rows")


def challenge_nan_label(tmp: Path) -> Action:
    return read(challenge(tmp / "data", ["a", "nan"]))


def manifest_none_label(tmp: Path) -> Action:
    root = challenge(tmp / "data", ["a"])
    header = ["image_id", "image_path", "mask_path", "label", "group_id", "split"]
    rows = [["img_0000", "train_data/img_0000.png", "train_data/mask_0000.png", "None", "g1", "train"]]
    return read(write_csv(root / "clean_manifest.csv", header, rows))


# ------------------------------------------------------------------------------ case 6: masks that match no image


def anno_masks(tmp: Path) -> Action:
    rows = [[f"train_{i}.bmp", "xy"[i % 2], f"p{i}"] for i in range(1, 4)]
    root = table(tmp / "data", rows, mask_name="{}")
    for i in range(1, 4):  # GlaS names its masks train_<n>_anno.bmp
        (root / "masks" / f"train_{i}.bmp").rename(root / "masks" / f"train_{i}_anno.bmp")

    def action() -> tuple[list[str], list[Path | None]]:
        s = read_samples(root)
        return [p.name for p in s.unmatched_masks], [x.mask_path for x in s.samples]

    return action


def image_without_mask(tmp: Path) -> Action:
    root = table(tmp / "data", [["a.png", "x", "p1"], ["b.png", "y", "p2"], ["c.png", "x", "p3"]])
    (root / "masks" / "c.png").unlink()
    return read(root)


def anno_masks_in_build(tmp: Path) -> Action:
    root = table(tmp / "data", [["a.png", "x", "p1"], ["b.png", "y", "p2"]], mask_name="{}")
    for name in ("a", "b"):
        (root / "masks" / f"{name}.png").rename(root / "masks" / f"{name}_anno.png")
    return lambda: build_patch_dataset(root, TOP1, val_fraction=0, cache_dir=tmp / "cache")[1].n_images


def challenge_orphan_mask(tmp: Path) -> Action:
    root = challenge(tmp / "data", ["a", "b"])
    box_mask().save(root / "train_data" / "mask_0007.png")
    return read(root)


# ------------------------------------------------------------------------- case 20: paths, symlinks, snapshots


def snapshot_table(tmp: Path) -> Action:
    src = table(tmp / "src", [["a.png", "x", "p1"], ["b.png", "y", "p2"], ["c.png", "x", "p3"]])
    tissue(0).save(src / "images" / "c.png")  # same bytes as a.png: one blob for both, as the Hub stores it
    return read(snapshot(src, tmp / "snapshots" / "rev"), "rows")


def snapshot_challenge(tmp: Path) -> Action:
    return read(snapshot(challenge(tmp / "src", ["a", "b"]), tmp / "snapshots" / "rev"), "rows")


def snapshot_manifest(tmp: Path) -> Action:
    src = challenge(tmp / "src", ["a", "b"])
    header = ["image_id", "image_path", "mask_path", "label", "group_id", "split"]
    rows = [
        [f"img_{i:04d}", f"train_data/img_{i:04d}.png", f"train_data/mask_{i:04d}.png", "ab"[i], "g", "train"]
        for i in (0, 1)
    ]
    write_csv(src / "clean_manifest.csv", header, rows)
    return read(snapshot(src, tmp / "snapshots" / "rev") / "clean_manifest.csv", "rows")


def snapshot_class_folders(tmp: Path) -> Action:
    for label in ("benign", "malignant"):
        (tmp / "src" / label).mkdir(parents=True)
        tissue(len(label)).save(tmp / "src" / label / f"{label}_0.png")
    return read(snapshot(tmp / "src", tmp / "snapshots" / "rev"), "rows")


def _outside(tmp: Path) -> Path:
    tissue(9).save(tmp / "outside.png")
    return tmp / "outside.png"


def table_dotdot(tmp: Path) -> Action:
    _outside(tmp)
    return read(table(tmp / "data", [["a.png", "x", "p1"], ["../../outside.png", "y", "p2"]]))


def table_absolute(tmp: Path) -> Action:
    return read(table(tmp / "data", [["a.png", "x", "p1"], [str(_outside(tmp)), "y", "p2"]]))


def challenge_dotdot(tmp: Path) -> Action:
    _outside(tmp)
    root = challenge(tmp / "data", ["a"])
    with open(root / "train_labels.csv", "a") as f:
        f.write("../../outside.png,b\n")
    return read(root)


def manifest_dotdot(tmp: Path) -> Action:
    _outside(tmp)
    (tmp / "clean").mkdir()
    header = ["image_id", "image_path", "mask_path", "label", "group_id", "split"]
    return read(
        write_csv(tmp / "clean" / "clean_manifest.csv", header, [["o", "../outside.png", "", "y", "o", "train"]])
    )


def clean_then_build_manifest(tmp: Path) -> Action:
    # The data and the clean output are apart: clean writes absolute paths into the data folder.
    root = table(tmp / "data", [[f"{n}.png", "xy"[i % 2], f"p{i}"] for i, n in enumerate("abcd")])
    result = clean_dataset(root, tmp / "out", config=CleaningConfig(num_workers=0), progress=False)
    kept = sorted(s.image_id for s in result.kept)

    def action() -> bool:
        dataset, report = build_patch_dataset(
            tmp / "out" / "clean_manifest.csv", TOP1, val_fraction=0, cache_dir=tmp / "c"
        )
        return sorted(set(dataset["train"]["image_id"])) == kept and report.n_images == len(kept) > 0

    return action


# ------------------------------------------------------------------------------------------------- the table

ROWS = [
    # case 1: any non-zero mask value is region of interest; JPEG masks get a noise floor
    (1, "instance_ids_8bit", glands_numbered, Expect(value=0.25)),
    (1, "instance_ids_16bit", nuclei_numbered_16bit, Expect(value=0.25)),
    (1, "glas_instance_ids", glas_numbered, Expect(value=(0.596, 0.596))),
    (1, "jpeg_two_levels", jpeg_two_levels, Expect(value=True)),
    (1, "jpeg_noise_is_background", jpeg_noise_is_background, Expect(value=(True, True))),
    # case 4: '#' starts a comment only at the start of a line or after a space
    (4, "hash_inside_an_id", hash_in_id, Expect(value=["a"])),
    (4, "clean_exclusions_read_back", clean_then_build_exclude, Expect(value=(True, True))),
    (4, "comment_after_space", inline_comment, Expect(value=["b"])),
    (
        4,
        "unknown_exclusion_warns",
        unknown_exclusion,
        Expect(warning=r"exclusions\.txt: 1 id matches no image \('zz_typo'\)"),
    ),
    # case 5: labels
    (
        5,
        "nan_label_is_missing",
        nan_label,
        Expect(
            warning=r"labels\.csv: 1 row has no label \(row 3 'b\.png': 'NaN'\).*unlabelled test image.*split",
            value=[("a", "x", "p1", "train"), ("b", None, "p2", "test"), ("c", "y", "p3", "train")],
        ),
    ),
    (
        5,
        "empty_label_warns",
        empty_label_no_split,
        Expect(warning=r"labels\.csv: 1 row has no label \(row 3 'b\.png'\)"),
    ),
    (
        5,
        "empty_label_in_train_split",
        empty_label_split_train,
        Expect(error=r"labels\.csv: row 3 \('b\.png'\) has an empty label but split 'train'; fill the label"),
    ),
    (
        5,
        "explicit_test_row",
        unlabelled_test_row,
        Expect(value=[("a", "x", "p1", "train"), ("b", None, "p2", "test")]),
    ),
    (
        5,
        "labels_differ_in_case",
        case_variants,
        Expect(
            warning=r"data: labels that differ only in case.*'Benign' / 'benign'",
            value=["Benign", "benign", "malignant"],
        ),
    ),
    (5, "class_column", class_column, Expect(value=["train"])),
    (
        5,
        "unknown_label_column",
        unknown_label_column,
        Expect(
            error=r"labels\.csv: no label column \(found \['filename', 'diagnosis', 'patient_id'\]\); "
            r"name it one of \['label', 'class'\]"
        ),
    ),
    (5, "header_case", header_case, Expect(value=[("a", "x", "p1", "train")])),
    (5, "patient_column", patient_column, Expect(value=[("a", "x", "p1", "train"), ("b", "y", "p1", "train")])),
    (
        5,
        "unknown_group_column",
        unknown_group_column,
        Expect(
            warning=r"labels\.csv: no group column.*unused columns \['pid'\].*'patient_id'",
            value=[("a", "x", "a", "train"), ("b", "y", "b", "train")],
        ),
    ),
    (
        5,
        "challenge_nan_label",
        challenge_nan_label,
        Expect(error=r"train_labels\.csv: row 3 \('img_0001\.png'\) has no label \('nan'"),
    ),
    (
        5,
        "manifest_none_label",
        manifest_none_label,
        Expect(
            error=r"clean_manifest\.csv: row 2 \('img_0000'\) has no label \('None' .*but split is not 'test'; fill the label"
        ),
    ),
    # case 6: masks that match no image, images without a mask
    (
        6,
        "anno_masks",
        anno_masks,
        Expect(
            warning=r"masks: 3 mask files match no image \(train_1_anno\.bmp, train_2_anno\.bmp, train_3_anno\.bmp\).*"
            r"3 of 3 images have no mask and use tissue detection",
            value=(["train_1_anno.bmp", "train_2_anno.bmp", "train_3_anno.bmp"], [None, None, None]),
        ),
    ),
    (
        6,
        "image_without_mask",
        image_without_mask,
        Expect(warning=r"masks: 1 of 3 images have no mask and use tissue detection \(c\.png\)"),
    ),
    (6, "anno_masks_in_build", anno_masks_in_build, Expect(warning=r"2 mask files match no image", value=2)),
    (
        6,
        "challenge_orphan_mask",
        challenge_orphan_mask,
        Expect(warning=r"train_data: 1 mask file matches no image \(mask_0007\.png\)"),
    ),
    # case 20: CSV paths may not leave their folder (lexically); symlinks are followed
    (
        20,
        "snapshot_table",
        snapshot_table,
        Expect(value=[("a", "x", "p1", "train"), ("b", "y", "p2", "train"), ("c", "x", "p3", "train")]),
    ),
    (
        20,
        "snapshot_challenge",
        snapshot_challenge,
        Expect(value=[("img_0000", "a", "img_0000", "train"), ("img_0001", "b", "img_0001", "train")]),
    ),
    (
        20,
        "snapshot_manifest",
        snapshot_manifest,
        Expect(value=[("img_0000", "a", "g", "train"), ("img_0001", "b", "g", "train")]),
    ),
    (
        20,
        "snapshot_class_folders",
        snapshot_class_folders,
        Expect(
            value=[("benign_0", "benign", "benign_0", "train"), ("malignant_0", "malignant", "malignant_0", "train")]
        ),
    ),
    (
        20,
        "table_dotdot",
        table_dotdot,
        Expect(error=r"labels\.csv: the path '\.\./\.\./outside\.png' points outside the data folder \S+ \(row 3\)"),
    ),
    (
        20,
        "table_absolute",
        table_absolute,
        Expect(error=r"labels\.csv: the path '/\S+/outside\.png' points outside the data folder \S+ \(row 3\)"),
    ),
    (
        20,
        "challenge_dotdot",
        challenge_dotdot,
        Expect(
            error=r"train_labels\.csv: the path '\.\./\.\./outside\.png' points outside the data folder \S+ \(row 3\)"
        ),
    ),
    (
        20,
        "manifest_dotdot",
        manifest_dotdot,
        Expect(
            error=r"clean_manifest\.csv: the path '\.\./outside\.png' points outside the manifest's folder \S+ \(row 2\)"
        ),
    ),
    (20, "clean_then_build_manifest", clean_then_build_manifest, Expect(value=True)),
]


@pytest.mark.parametrize("case,build,expect", [(r[0], r[2], r[3]) for r in ROWS], ids=[f"{r[0]}-{r[1]}" for r in ROWS])
def test_bad_input(tmp_path, caplog, case, build, expect):
    action = build(tmp_path)
    caplog.set_level(logging.WARNING)
    caplog.clear()  # only what the action logs counts
    if expect.error is not None:
        with pytest.raises(DataError, match=expect.error):
            action()
        return
    result = action()
    if expect.warning is not None:
        messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(re.search(expect.warning, m, re.S) for m in messages), messages
    if expect.value is not None:
        assert result == expect.value
