"""Reading data folders: the three layouts, image conversions, and a table of broken inputs with their messages."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_histo.data.builder import build_patch_dataset
from hf_histo.data.images import DataError, load_image
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.sources import detect_layout, read_samples

TOP1 = PatchingConfig(strategy="topk", patch_size=32, top_k=1)

SIZE = (96, 80)  # width, height of the generated images


def tissue_image(seed: int, size=SIZE) -> Image.Image:
    """A small H&E-like image: pink noise with a darker disc on white."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.full((h, w, 3), 245, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    disc = (xx - w * rng.uniform(0.3, 0.7)) ** 2 + (yy - h * rng.uniform(0.3, 0.7)) ** 2 < (min(w, h) * 0.35) ** 2
    arr[disc] = np.clip(np.array([215, 120, 180]) + rng.integers(-25, 25, (int(disc.sum()), 3)), 0, 255)
    return Image.fromarray(arr)


def mask_image(seed: int, size=SIZE) -> Image.Image:
    """A 0/255 mask with one random rectangle of at least 30x30 pixels."""
    rng = np.random.default_rng(seed + 1000)
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    x, y = int(rng.integers(0, w - 30)), int(rng.integers(0, h - 30))
    arr[y : y + int(rng.integers(30, h - y + 1)), x : x + int(rng.integers(30, w - x + 1))] = 255
    return Image.fromarray(arr)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def make_challenge(root: Path, labels: list[str], n_test: int = 0, masks: bool = True, size=SIZE) -> Path:
    """Challenge layout: train_data/img_NNNN.png + mask_NNNN.png, train_labels.csv, optional test_data/."""
    train = root / "train_data"
    train.mkdir(parents=True)
    for i, _ in enumerate(labels):
        tissue_image(i, size).save(train / f"img_{i:04d}.png")
        if masks:
            mask_image(i, size).save(train / f"mask_{i:04d}.png")
    write_csv(
        root / "train_labels.csv",
        ["sample_index", "label"],
        [[f"img_{i:04d}.png", lab] for i, lab in enumerate(labels)],
    )
    if n_test:
        test = root / "test_data"
        test.mkdir()
        for i in range(len(labels), len(labels) + n_test):  # numbered after the training images
            tissue_image(100 + i, size).save(test / f"img_{i:04d}.png")
            mask_image(100 + i, size).save(test / f"mask_{i:04d}.png")
    return root


def make_table(root: Path, rows: list[tuple[str, str, str]], masks: bool = True, extra: dict | None = None) -> Path:
    """Table layout: images/, masks/ (same names), labels.csv with filename,label,patient_id[,extra columns]."""
    (root / "images").mkdir(parents=True)
    if masks:
        (root / "masks").mkdir()
    for i, (name, _, _) in enumerate(rows):
        tissue_image(i).save(root / "images" / name)
        if masks:
            mask_image(i).save(root / "masks" / name)
    extra = extra or {}
    header = ["filename", "label", "patient_id", *extra]
    write_csv(root / "labels.csv", header, [[*row, *(v[i] for v in extra.values())] for i, row in enumerate(rows)])
    return root


def make_class_folders(root: Path, counts: dict[str, int]) -> Path:
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            tissue_image(hash((c, i)) % 1000).save(root / c / f"{c}_{i}.png")
    return root


# ---------------------------------------------------------------------------------------------- layouts


def test_challenge_layout(tmp_path):
    root = make_challenge(tmp_path / "data", ["b", "a", "b"], n_test=2)
    assert detect_layout(root) == "challenge"
    s = read_samples(root)
    assert s.layout == "challenge" and len(s) == 5 and s.labels == ["a", "b"]
    first = s.train[0]
    assert (first.image_path.name, first.mask_path.name, first.label) == ("img_0000.png", "mask_0000.png", "b")
    assert first.image_id == first.group_id == "img_0000"
    assert [x.label for x in s.test] == [None, None] and {x.split for x in s.test} == {"test"}
    assert [x.image_id for x in s.test] == ["img_0003", "img_0004"]


def test_challenge_test_files_numbered_from_zero_get_unique_ids(tmp_path):
    root = make_challenge(tmp_path / "data", ["a", "b"], n_test=1)
    (root / "test_data" / "img_0002.png").rename(root / "test_data" / "img_0000.png")
    test = read_samples(root).test
    assert [(x.image_id, x.image_path.name) for x in test] == [("test_img_0000", "img_0000.png")]


def test_table_layout_groups_split_column_and_missing_masks(tmp_path):
    rows = [("a.png", "x", "p1"), ("b.png", "y", "p1"), ("c.png", "x", "")]
    root = make_table(tmp_path / "data", rows, extra={"split": ["train", "train", "test"]})
    (root / "masks" / "b.png").unlink()
    s = read_samples(root)
    assert s.layout == "table"
    by_id = {x.image_id: x for x in s.samples}
    assert by_id["a"].group_id == "p1" and by_id["b"].group_id == "p1"
    assert by_id["c"].group_id == "c" and by_id["c"].split == "test" and by_id["c"].label == "x"
    assert by_id["b"].mask_path is None and by_id["a"].mask_path.name == "a.png"


def test_class_folders_and_forced_layout(tmp_path):
    root = make_class_folders(tmp_path / "data", {"tumor": 2, "normal": 1})
    s = read_samples(root)
    assert s.layout == "class_folders" and s.labels == ["normal", "tumor"]
    assert all(x.mask_path is None for x in s.samples)
    assert read_samples(root, layout="class_folders").samples == s.samples


def test_manifest_and_exclude(tmp_path):
    root = make_challenge(tmp_path / "data", ["a", "b", "a"])
    manifest = tmp_path / "clean_manifest.csv"
    write_csv(
        manifest,
        ["image_id", "image_path", "mask_path", "label", "group_id", "split"],
        [["img_0000", "data/train_data/img_0000.png", "data/train_data/mask_0000.png", "a", "g1", "train"]],
    )
    s = read_samples(manifest)
    assert s.layout == "manifest" and s.samples[0].group_id == "g1"
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("img_0001.png  # a cartoon\n")
    assert [x.image_id for x in read_samples(root, exclude=exclude).samples] == ["img_0000", "img_0002"]


# ------------------------------------------------------------------------------------------ conversions


def _save_16bit(path):
    arr = np.linspace(0, 65535, 96 * 80).reshape(80, 96).astype(np.uint16)
    Image.fromarray(arr).save(path)
    gray = round(arr[40, 50] / 65535 * 255)
    return {(40, 50): (gray, gray, gray)}


def _save_rgba(path):
    arr = np.zeros((80, 96, 4), np.uint8)
    arr[..., 0] = 200
    arr[:40, :, 3] = 255  # top half opaque red, bottom half transparent: composited over white
    Image.fromarray(arr).save(path)
    return {(10, 50): (200, 0, 0), (70, 50): (255, 255, 255)}


def _save_gray(path):
    Image.fromarray(np.full((80, 96), 77, np.uint8)).save(path)
    return {(40, 50): (77, 77, 77)}


def _save_palette(path):
    Image.new("RGB", SIZE, (30, 160, 90)).convert("P", palette=Image.ADAPTIVE).save(path)
    return {(40, 50): (30, 160, 90)}


SAVERS = {"16bit": _save_16bit, "rgba": _save_rgba, "gray": _save_gray, "palette": _save_palette}


@pytest.mark.parametrize("save", list(SAVERS.values()), ids=list(SAVERS))
def test_image_modes_are_converted_not_rejected(tmp_path, save):
    path = tmp_path / "img.png"
    expected = save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == SIZE
    arr = np.asarray(image).astype(int)
    for (row, col), rgb in expected.items():
        assert np.abs(arr[row, col] - rgb).max() <= 1, (row, col, arr[row, col], rgb)


def test_mixed_image_modes_build(tmp_path):
    root = make_challenge(tmp_path / "data", ["a", "b", "a", "b"])
    for i, save in enumerate(SAVERS.values()):
        save(root / "train_data" / f"img_{i:04d}.png")
    top2 = PatchingConfig(strategy="topk", patch_size=32, top_k=2)
    dataset, report = build_patch_dataset(root, top2, val_fraction=0, cache_dir=tmp_path / "cache")
    assert report.n_images == 4 and report.skipped == []
    assert {dataset["train"][i]["image"].mode for i in range(len(dataset["train"]))} == {"RGB"}


# ------------------------------------------------------------------------------------- broken inputs


def _truncated(root):
    make_challenge(root, ["a", "b"])
    path = root / "train_data" / "img_0001.png"
    path.write_bytes(path.read_bytes()[:200])


def _not_an_image(root):
    make_challenge(root, ["a", "b"])
    (root / "train_data" / "img_0001.png").write_text("this is not a picture")


def _mask_size_mismatch(root):
    make_challenge(root, ["a", "b"])
    mask_image(1, (50, 40)).save(root / "train_data" / "mask_0001.png")


def _row_without_file(root):
    make_challenge(root, ["a", "b"])
    with open(root / "train_labels.csv", "a") as f:
        f.write("img_0009.png,a\n")


def _file_without_row(root):
    make_challenge(root, ["a", "b"])
    tissue_image(5).save(root / "train_data" / "img_0005.png")


def _unknown_layout(root):
    root.mkdir()
    (root / "notes.txt").write_text("hello")


def _empty_folder(root):
    root.mkdir()


def _duplicate_names(root):
    make_class_folders(root, {"benign": 1, "malignant": 1})
    tissue_image(1).save(root / "malignant" / "benign_0.png")


def _duplicate_table_rows(root):
    make_table(root, [("a.png", "x", "p1"), ("b.png", "y", "p2")])
    with open(root / "labels.csv", "a") as f:
        f.write("a.png,y,p3\n")


def _path_escape(root):
    make_table(root, [("a.png", "x", "p1")])
    with open(root / "labels.csv", "a") as f:
        f.write("../../etc/passwd,x,p2\n")


def _bomb(root):
    make_challenge(root, ["a", "b"])


def _empty_label(root):
    make_challenge(root, ["a", ""])


def _no_label_csv(root):
    make_challenge(root, ["a"])
    (root / "train_labels.csv").unlink()


def _no_file_column(root):
    make_table(root, [("a.png", "x", "p1")])
    write_csv(root / "labels.csv", ["name", "label"], [["a.png", "x"]])


def _missing_folder(root):
    pass


# id, make(root), extra kwargs, the message it must produce (a regex; every one names the file)
BROKEN = [
    ("truncated", _truncated, {}, r"img_0001\.png: truncated or corrupt image"),
    ("not_an_image", _not_an_image, {}, r"img_0001\.png: not an image file PIL can read"),
    (
        "mask_size_mismatch",
        _mask_size_mismatch,
        {},
        r"mask_0001\.png: mask size 50x40 differs from image \S*img_0001\.png",
    ),
    (
        "csv_row_without_file",
        _row_without_file,
        {},
        r"train_labels\.csv: row 4 names 'img_0009\.png' but .* does not exist",
    ),
    ("file_without_row", _file_without_row, {}, r"img_0005\.png: has no row in \S*train_labels\.csv"),
    ("unknown_layout", _unknown_layout, {}, r"data: unknown data layout"),
    ("forced_unknown_layout", _empty_folder, {"layout": "zip"}, r"data: unknown layout 'zip'"),
    ("empty_folder", _empty_folder, {}, r"data: the data folder is empty"),
    ("missing_folder", _missing_folder, {}, r"data: no such data folder"),
    (
        "duplicate_file_names",
        _duplicate_names,
        {},
        r"malignant/benign_0\.png: duplicate file name: image id 'benign_0'",
    ),
    ("duplicate_csv_rows", _duplicate_table_rows, {}, r"labels\.csv: row 4: 'a\.png' is listed twice"),
    (
        "csv_path_escape",
        _path_escape,
        {},
        r"labels\.csv: the path '\.\./\.\./etc/passwd' points outside the data folder",
    ),
    ("decompression_bomb", _bomb, {}, r"img_0000\.png: the image is larger than the decompression-bomb limit of 1000"),
    ("empty_label", _empty_label, {}, r"train_labels\.csv: row 3 \('img_0001\.png'\) has an empty label"),
    ("no_label_csv", _no_label_csv, {}, r"train_labels\.csv: missing"),
    ("no_file_column", _no_file_column, {}, r"labels\.csv: no file column"),
]


@pytest.mark.parametrize("make,kwargs,message", [row[1:] for row in BROKEN], ids=[row[0] for row in BROKEN])
def test_broken_input_gives_a_clear_error(tmp_path, monkeypatch, make, kwargs, message):
    root = tmp_path / "data"
    make(root)
    if make is _bomb:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's guard stays on, just lower
    with pytest.raises(DataError, match=message):
        build_patch_dataset(root, TOP1, val_fraction=0, cache_dir=tmp_path / "cache", **kwargs)


def test_decompression_bomb_knob_raises_the_limit(tmp_path, monkeypatch):
    root = make_challenge(tmp_path / "data", ["a"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="--max_image_pixels"):
        load_image(root / "train_data" / "img_0000.png")
    assert load_image(root / "train_data" / "img_0000.png", max_pixels=10**6).size == SIZE
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after the call
    whole = PatchingConfig(strategy="whole")
    _, report = build_patch_dataset(root, whole, val_fraction=0, max_image_pixels=10**6, cache_dir=tmp_path / "c")
    assert report.n_images == 1


def test_on_error_skip_lists_every_bad_sample(tmp_path):
    root = make_challenge(tmp_path / "data", ["a", "b", "a", "b", "a", "b"])
    train = root / "train_data"
    (train / "img_0001.png").write_bytes((train / "img_0001.png").read_bytes()[:200])
    (train / "img_0002.png").write_text("not an image")
    mask_image(3, (50, 40)).save(train / "mask_0003.png")
    tissue_image(9).save(train / "img_0009.png")  # no CSV row
    dataset, report = build_patch_dataset(root, TOP1, val_fraction=0, on_error="skip", cache_dir=tmp_path / "cache")
    skipped = {Path(file).name: reason for file, reason in report.skipped}
    assert set(skipped) == {"img_0001.png", "img_0002.png", "img_0003.png", "img_0009.png"}
    assert "truncated" in skipped["img_0001.png"] and "mask size" in skipped["img_0003.png"]
    assert sorted(set(dataset["train"]["image_id"])) == ["img_0000", "img_0004", "img_0005"]
    assert "skipped 4" in report.summary()
    # The report survives the cache: a second call lists the same skipped files.
    _, again = build_patch_dataset(root, TOP1, val_fraction=0, on_error="skip", cache_dir=tmp_path / "cache")
    assert again.cached and again.skipped == report.skipped
