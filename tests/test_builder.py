"""The patch dataset builder: features, grouped splits, determinism, the Arrow cache and its invalidation."""

import dataclasses
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from test_sources import make_challenge, make_table, mask_image, tissue_image

from hf_histo.data import cutting
from hf_histo.data.builder import REPORT_NAME, HistoPatches, build_patch_dataset, load_patch_dataset
from hf_histo.data.images import DataError
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.sources import Sample, read_samples
from hf_histo.data.splits import fold_assignments, split_samples

SMALL = PatchingConfig(strategy="topk", patch_size=32, top_k=2)

# 24 images of 8 patients; patients p0-p2 have images of both classes (as in GlaS).
GROUPED_ROWS = [(f"im{i:02d}.png", "tumor" if (i % 3 == 0) ^ (i < 6) else "normal", f"p{i % 8}") for i in range(24)]


@pytest.fixture
def grouped(tmp_path):
    return make_table(tmp_path / "grouped", GROUPED_ROWS)


def test_features_labels_and_patch_columns(tmp_path):
    root = make_challenge(tmp_path / "data", ["Luminal B", "HER2(+)", "Luminal A", "HER2(+)", "Luminal B"], n_test=2)
    splits = load_patch_dataset(root, SMALL, val_fraction=0, cache_dir=tmp_path / "cache")
    assert list(splits) == ["train", "test"]
    features = splits["train"].features
    assert set(features) == {"image", "label", "image_id", "group_id", "bbox", "foreground", "patch_index"}
    assert isinstance(features["image"], datasets.Image)
    assert features["label"].names == ["HER2(+)", "Luminal A", "Luminal B"]  # sorted names from the data
    assert features["bbox"] == datasets.List(datasets.Value("int32"), length=4)
    train = splits["train"]
    assert len(train) == 10  # top 2 tiles of each of the 5 images
    row = train[0]
    assert row["image"].size == (32, 32) and row["image"].mode == "RGB"
    assert row["label"] == features["label"].str2int("Luminal B") and row["image_id"] == "img_0000"
    assert 0.0 < row["foreground"] <= 1.0 and len(row["bbox"]) == 4
    assert Counter(train["image_id"]) == {f"img_{i:04d}": 2 for i in range(5)}
    assert sorted(p for i, p in zip(train["image_id"], train["patch_index"]) if i == "img_0001") == [0, 1]
    # The crop is the source pixels at bbox.
    x, y, w, h = row["bbox"]
    source = np.asarray(Image.open(root / "train_data" / "img_0000.png").convert("RGB"))
    assert np.array_equal(np.asarray(row["image"]), source[y : y + h, x : x + w])
    assert set(splits["test"]["label"]) == {-1}  # unlabelled images: ClassLabel's "no label"


def test_no_image_or_group_in_two_splits_and_deterministic(grouped, tmp_path):
    seen_validation = []
    for seed in range(3):
        splits, report = build_patch_dataset(grouped, SMALL, val_fraction=0.25, seed=seed, cache_dir=tmp_path / "c")
        train_groups, val_groups = set(splits["train"]["group_id"]), set(splits["validation"]["group_id"])
        assert train_groups and val_groups and not train_groups & val_groups
        assert not set(splits["train"]["image_id"]) & set(splits["validation"]["image_id"])
        assert report.splits["train"]["images"] + report.splits["validation"]["images"] == 24
        seen_validation.append(sorted(set(splits["validation"]["image_id"])))
        again, _ = build_patch_dataset(
            grouped, SMALL, val_fraction=0.25, seed=seed, cache_dir=tmp_path / f"other{seed}"
        )
        assert sorted(set(again["validation"]["image_id"])) == seen_validation[-1]  # same seed, fresh build
    assert len({tuple(v) for v in seen_validation}) > 1  # the seed matters


def test_second_call_loads_the_cache_and_changes_rebuild(tmp_path, monkeypatch):
    root = make_table(tmp_path / "data", [(f"im{i}.png", "ab"[i % 2], f"p{i}") for i in range(6)])
    kwargs = dict(val_fraction=0.34, cache_dir=tmp_path / "cache")
    first, report = build_patch_dataset(root, SMALL, **kwargs)
    assert not report.cached

    calls = []
    original = cutting.cut_sample
    monkeypatch.setattr(cutting, "cut_sample", lambda s, **kw: calls.append(s.image_id) or original(s, **kw))
    second, report2 = build_patch_dataset(root, SMALL, **kwargs)
    assert report2.cached and calls == []
    assert second["train"].cache_files == first["train"].cache_files
    assert report2.splits == report.splits

    # A changed label rebuilds, and the new label is in the data.
    text = (root / "labels.csv").read_text().replace("im0.png,a,", "im0.png,b,")
    (root / "labels.csv").write_text(text)
    third, report3 = build_patch_dataset(root, SMALL, **kwargs)
    assert not report3.cached and len(calls) == 6
    labels = {
        i: third[s].features["label"].int2str(lab)
        for s in third
        for i, lab in zip(third[s]["image_id"], third[s]["label"])
    }
    assert labels["im0"] == "b"

    # The key is the content: touching a mask (new mtime, same bytes) keeps the cache, new mask bytes rebuild.
    calls.clear()
    mask = root / "masks" / "im3.png"
    stat = mask.stat()
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert build_patch_dataset(root, SMALL, **kwargs)[1].cached and calls == []
    mask_image(30).save(mask)
    assert not build_patch_dataset(root, SMALL, **kwargs)[1].cached and len(calls) == 6
    assert build_patch_dataset(root, SMALL, **kwargs)[1].cached

    # So does another patching parameter.
    top3 = dataclasses.replace(SMALL, top_k=3)
    _, report5 = build_patch_dataset(root, top3, **kwargs)
    assert not report5.cached and report5.patches_per_image["all"] == [3, 3.0, 3]

    # A cache without its build report (prepared by another version) still loads, with counts from the data.
    (Path(report5.cache_dir) / REPORT_NAME).unlink()
    _, counted = build_patch_dataset(root, top3, **kwargs)
    assert counted.cached and counted.splits == report5.splits and counted.mask_sources == {"unknown": 6}


def test_the_patching_config_object_is_part_of_the_cache_key(tmp_path):
    """An equal PatchingConfig reloads the cache (in another process too); any other value builds anew."""
    root = make_challenge(tmp_path / "data", ["a", "b", "a"])
    kwargs = dict(val_fraction=0, cache_dir=tmp_path / "cache")
    _, first = build_patch_dataset(root, SMALL, **kwargs)
    _, same = build_patch_dataset(root, PatchingConfig.from_dict(SMALL.to_dict()), **kwargs)  # equal, not identical
    assert same.cached and same.cache_dir == first.cache_dir
    # paint_background is not in the readable config name: only the object's hash tells the two caches apart.
    painted = dataclasses.replace(SMALL, paint_background=True)
    _, other = build_patch_dataset(root, painted, **kwargs)
    assert not other.cached and other.config_name == first.config_name and other.cache_dir != first.cache_dir
    assert build_patch_dataset(root, painted, **kwargs)[1].cache_dir == other.cache_dir
    code = (
        "from hf_histo.data.builder import build_patch_dataset\n"
        "from hf_histo.data.patching import PatchingConfig\n"
        f"report = build_patch_dataset({str(root)!r}, PatchingConfig(**{SMALL.to_dict()!r}), val_fraction=0, "
        f"cache_dir={str(tmp_path / 'cache')!r})[1]\n"
        "print(report.cached, report.cache_dir)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", first.cache_dir]
    with pytest.raises(TypeError, match="patching must be a PatchingConfig, got dict"):
        load_patch_dataset(root, SMALL.to_dict(), **kwargs)


def test_k_folds_put_each_image_in_exactly_one_validation_fold(grouped, tmp_path):
    samples = read_samples(grouped).train
    folds = fold_assignments(samples, n_folds=4, seed=1)
    assert set(folds) == {s.image_id for s in samples} and set(folds.values()) == {0, 1, 2, 3}
    group_folds = {}
    for s in samples:
        assert group_folds.setdefault(s.group_id, folds[s.image_id]) == folds[s.image_id]  # groups stay whole
    validation = Counter()
    for fold in range(4):
        splits = load_patch_dataset(grouped, SMALL, n_folds=4, fold=fold, seed=1, cache_dir=tmp_path / "c")
        val_ids = set(splits["validation"]["image_id"])
        assert val_ids == {i for i, f in folds.items() if f == fold}
        assert not val_ids & set(splits["train"]["image_id"])
        validation.update(val_ids)
    assert validation == {s.image_id: 1 for s in samples}


def _samples(labels, groups):
    return [Sample(None, None, lab, f"im{i:02d}", g) for i, (lab, g) in enumerate(zip(labels, groups))]


def test_split_samples_rules():
    samples = _samples(["a", "b"] * 10, [f"g{i // 2}" for i in range(20)])
    train, val = split_samples(samples, val_fraction=0.2, seed=0)
    assert len(train) + len(val) == 20 and val and not {s.group_id for s in train} & {s.group_id for s in val}
    assert split_samples(list(reversed(samples)), val_fraction=0.2, seed=0) == (train, val)  # order-independent
    assert split_samples(samples, val_fraction=0) == (sorted(samples, key=lambda s: s.image_id), [])
    with pytest.raises(DataError, match="at least 2 groups"):
        split_samples(_samples(["a", "b", "a"], ["g", "g", "g"]), val_fraction=0.2)
    with pytest.raises(DataError, match="5 folds need at least 5 groups"):
        fold_assignments(_samples(["a", "b"] * 2, ["g1", "g1", "g2", "g3"]), n_folds=5)
    with pytest.raises(ValueError, match="fold must be in"):
        split_samples(samples, n_folds=3, fold=3)
    # Stratification impossible (each class in one group): a plain split falls back to a group split, silently
    # (nobody asked for folds; tests/test_quiet_output.py checks the info line naming the class left out).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, val = split_samples(_samples(["a"] * 3 + ["b"] * 3, ["g1"] * 3 + ["g2"] * 3), val_fraction=0.5)
    assert len({s.group_id for s in val}) == 1 and not {s.group_id for s in train} & {s.group_id for s in val}


def test_stratified_split_keeps_both_classes_in_validation():
    samples = _samples(["a"] * 30 + ["b"] * 10, [f"g{i}" for i in range(40)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, val = split_samples(samples, val_fraction=0.25, seed=3)
    counts = Counter(s.label for s in val)
    assert sum(counts.values()) == 10 and counts["b"] in (2, 3)  # a quarter of each class


def test_strategies_whole_grid_components_and_report(tmp_path):
    root = make_challenge(tmp_path / "data", ["a", "b", "a"], masks=True)
    train = root / "train_data"
    Image.fromarray(np.zeros((80, 96), np.uint8)).save(train / "mask_0001.png")  # empty mask
    (train / "mask_0002.png").unlink()  # no mask: tissue detection
    cache = tmp_path / "cache"
    whole, report = build_patch_dataset(root, PatchingConfig(strategy="whole"), val_fraction=0, cache_dir=cache)
    assert len(whole["train"]) == 3 and {tuple(b) for b in whole["train"]["bbox"]} == {(0, 0, 96, 80)}
    assert report.mask_sources == {"empty_mask_tissue": 1, "mask": 1, "tissue": 1}
    assert report.empty_mask_fallbacks == 1 and report.tissue_detected == 2
    whole_fallback = PatchingConfig(strategy="whole", empty_fallback="whole")
    _, report = build_patch_dataset(root, whole_fallback, val_fraction=0, cache_dir=cache)
    assert report.mask_sources["empty_mask_whole"] == 1
    grid_config = PatchingConfig(strategy="grid", patch_size=40, min_foreground=1500)
    grid, report = build_patch_dataset(root, grid_config, val_fraction=0, cache_dir=cache)
    assert report.n_images == 3 and set(grid["train"]["image_id"]) == {"img_0000", "img_0001", "img_0002"}
    assert all(n >= 1 for n in Counter(grid["train"]["image_id"]).values())
    huge_components = PatchingConfig(strategy="components", min_area=10**6)
    comps, report = build_patch_dataset(root, huge_components, val_fraction=0, cache_dir=cache)
    assert report.zero_patch_fallbacks == 3 and report.patches_per_image["all"] == [1, 1.0, 1]  # fallback tile
    assert {tuple(b)[2:] for b in comps["train"]["bbox"]} == {(224, 224)}


def test_paint_background_reaches_the_patches(tmp_path):
    root = make_challenge(tmp_path / "data", ["a"])
    mask = np.zeros((80, 96), np.uint8)
    mask[:, :48] = 255
    Image.fromarray(mask).save(root / "train_data" / "mask_0000.png")
    kwargs = dict(val_fraction=0, cache_dir=tmp_path / "c")
    painted_config = PatchingConfig(strategy="whole", paint_background=True)
    painted = np.asarray(load_patch_dataset(root, painted_config, **kwargs)["train"][0]["image"])
    plain = np.asarray(load_patch_dataset(root, PatchingConfig(strategy="whole"), **kwargs)["train"][0]["image"])
    assert (painted[:, 48:] == 255).all() and not (plain[:, 48:] == 255).all()
    assert np.array_equal(painted[:, :48], plain[:, :48])


def test_num_proc_builds_the_same_patches(tmp_path):
    rows = [(f"im{i:02d}.png", "ab"[i % 2], f"p{i}") for i in range(8)]
    root = make_table(tmp_path / "data", rows)
    one = load_patch_dataset(root, SMALL, val_fraction=0, cache_dir=tmp_path / "c1")["train"]
    two = load_patch_dataset(root, SMALL, val_fraction=0, cache_dir=tmp_path / "c2", num_proc=2)["train"]
    key = lambda d: sorted(zip(d["image_id"], d["patch_index"], map(tuple, d["bbox"])))  # noqa: E731
    assert key(one) == key(two)


def test_builder_used_by_hand(tmp_path):
    root = make_challenge(tmp_path / "data", ["a", "b"])
    tissue_image(7).save(root / "train_data" / "img_0002.png")
    mask_image(7).save(root / "train_data" / "mask_0002.png")
    with open(root / "train_labels.csv", "a") as f:
        f.write("img_0002.png,a\n")
    patching = PatchingConfig(strategy="topk", top_k=1, patch_size=32)
    builder = HistoPatches(
        config_name="topk", data_dir=str(root), patching=patching, val_fraction=0, cache_dir=str(tmp_path / "c")
    )
    assert builder.hash and builder.config.patching == patching
    builder.download_and_prepare()
    assert len(builder.as_dataset(split="train")) == 3


def test_inspect_flags_and_figures(tmp_path):
    from hf_histo.data.inspect import inspect_dataset

    root = make_challenge(tmp_path / "data", ["a", "b", "a", "b", "a"], n_test=1)
    train = root / "train_data"
    (train / "mask_0000.png").unlink()
    Image.fromarray(np.zeros((80, 96), np.uint8)).save(train / "mask_0001.png")
    mask_image(2, (48, 40)).save(train / "mask_0002.png")
    (train / "img_0003.png").write_bytes((train / "img_0003.png").read_bytes()[:100])
    with pytest.raises(DataError, match=r"img_0003\.png: truncated"):
        inspect_dataset(root, tmp_path / "out")
    report = inspect_dataset(root, tmp_path / "out", PatchingConfig(patch_size=32), on_error="skip", n_contact=3)
    assert report.n_images == 5 and report.split_counts == {"train": 4, "test": 1}
    assert report.class_counts == {"(no label)": 1, "a": 3, "b": 1}
    assert report.flags["missing_mask"] == ["img_0000"] and report.flags["empty_mask"] == ["img_0001"]
    assert report.flags["size_mismatch"] == ["img_0002"]
    assert [s[0].endswith("img_0003.png") for s in report.skipped] == [True]
    assert set(report.patches) == {"grid", "components", "topk"} and report.patches["topk"]["min"] >= 1
    table = report.table()
    for text in ("empty mask: 1", "mask size differs from image: 1", "skipped (unreadable): 1", "components"):
        assert text in table
    for png in ("class_distribution.png", "patches_per_image.png", "contact_sheet.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    assert (tmp_path / "out" / "inspection.json").is_file()
