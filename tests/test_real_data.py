"""Real data from ../shared/data (skipped when absent): every image yields patches, splits keep patients whole."""

import csv
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from hf_histo.data.builder import build_patch_dataset
from hf_histo.data.inspect import inspect_dataset
from hf_histo.data.masks import load_mask
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.sources import read_samples
from hf_histo.data.splits import split_samples

STRATEGIES = ("grid", "components", "topk", "whole")


@pytest.mark.parametrize("name,n_images,n_groups", [("glas_train", 85, 15), ("monuseg", 44, 44)])
def test_every_image_yields_patches_with_each_strategy(shared_data, name, n_images, n_groups):
    sample_set = read_samples(shared_data(name))
    assert sample_set.layout == "table" and len(sample_set) == n_images
    assert len({s.group_id for s in sample_set.samples}) == n_groups
    configs = [PatchingConfig(strategy=s) for s in STRATEGIES]
    for sample in sample_set.samples:
        assert sample.mask_path is not None, sample.image_path
        with Image.open(sample.image_path) as im:  # the header is enough for the size check
            size = im.size
        mask = load_mask(sample.mask_path, size, image_path=sample.image_path)
        assert mask.any(), sample.mask_path
        for config in configs:
            boxes = config.select(mask)  # the strategy itself, without the fallback tile
            assert boxes, (sample.image_id, config.strategy)
            assert all(b.foreground > 0 for b in boxes)


def test_glas_patients_span_images_and_splits_keep_them_whole(shared_data):
    samples = read_samples(shared_data("glas_train")).train
    per_patient = Counter(s.group_id for s in samples)
    assert max(per_patient.values()) > 1  # the point of grouping
    for seed in range(5):
        train, val = split_samples(samples, val_fraction=0.2, seed=seed)
        assert val and not {s.group_id for s in train} & {s.group_id for s in val}
        assert {s.image_id for s in train} | {s.image_id for s in val} == {s.image_id for s in samples}


@pytest.mark.slow
def test_glas_patch_dataset_validation_holds_whole_patients(shared_data, tmp_path):
    root = shared_data("glas_train")
    splits, report = build_patch_dataset(
        root, PatchingConfig(strategy="topk", patch_size=64, top_k=2), val_fraction=0.2, seed=0, cache_dir=tmp_path
    )
    train_patients, val_patients = set(splits["train"]["group_id"]), set(splits["validation"]["group_id"])
    assert val_patients and not train_patients & val_patients
    ids = set(splits["train"]["image_id"]) | set(splits["validation"]["image_id"])
    assert len(ids) == 85 and report.n_images == 85 and report.patches_per_image["all"] == [2, 2.0, 2]
    assert splits["train"].features["label"].names == ["benign", "malignant"]
    # Every validation patient brings all of its images.
    labels = {s.image_id: s.group_id for s in read_samples(root).samples}
    for patient in val_patients:
        assert {i for i, g in labels.items() if g == patient} <= set(splits["validation"]["image_id"])
    _, cached = build_patch_dataset(
        root, PatchingConfig(strategy="topk", patch_size=64, top_k=2), val_fraction=0.2, seed=0, cache_dir=tmp_path
    )
    assert cached.cached and cached.seconds < report.seconds


@pytest.mark.slow
def test_monuseg_test_split_and_labels(shared_data, tmp_path):
    splits, report = build_patch_dataset(
        shared_data("monuseg"),
        PatchingConfig(strategy="topk", patch_size=64, top_k=1),
        val_fraction=0.2,
        cache_dir=tmp_path,
    )
    assert set(splits) == {"train", "validation", "test"}
    assert report.splits["test"]["images"] == 14 and report.n_images == 44
    names = splits["test"].features["label"].names
    assert "brain" in names and -1 not in splits["test"]["label"]  # test rows of the CSV carry labels
    assert not set(splits["train"]["group_id"]) & set(splits["validation"]["group_id"])


def test_an2dl_label_file_in_challenge_layout(shared_data, tmp_path):
    """The real challenge label file read in a challenge folder of tiny stand-in images."""
    labels_csv = shared_data("an2dl_format") / "train_labels.csv"
    with open(labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    root = tmp_path / "challenge"
    (root / "train_data").mkdir(parents=True)
    (root / "train_labels.csv").write_bytes(labels_csv.read_bytes())
    pixel = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    for row in rows:
        pixel.save(root / "train_data" / row["sample_index"], compress_level=0)
    sample_set = read_samples(root)
    counts = Counter(s.label for s in sample_set.samples)
    assert counts == {"Luminal B": 220, "Luminal A": 205, "HER2(+)": 189, "Triple negative": 77}
    train, val = split_samples(sample_set.train, val_fraction=0.2, seed=0)
    val_share = {k: v / counts[k] for k, v in Counter(s.label for s in val).items()}
    assert all(0.15 < share < 0.25 for share in val_share.values())  # stratified


@pytest.mark.slow
def test_inspect_glas(shared_data, tmp_path):
    report = inspect_dataset(shared_data("glas_train"), tmp_path, strategies=("grid", "topk"), n_contact=3)
    assert report.n_images == 85 and report.class_counts == {"benign": 37, "malignant": 48}
    assert report.patches["grid"]["min"] >= 1 and report.patches["topk"]["max"] == 12
    assert not any(report.flags.values())
    table = report.table()
    assert "benign" in table and "topk" in table
    for png in ("class_distribution.png", "patches_per_image.png", "contact_sheet.png"):
        with Image.open(tmp_path / png) as im:
            assert im.size[0] > 300
