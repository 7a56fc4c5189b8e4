"""Tests for the synthetic H&E-like data generator that feeds the demo and other tests."""

import csv
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hf_histo.data.sources import read_samples
from hf_histo.data.synthetic import (
    CLASS_NAMES,
    make_synthetic_dataset,
    make_synthetic_image,
    scaled_counts,
)

SMALL = {"n_train": 8, "n_test": 4, "size_range": (96, 160)}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_layout_files_present(tmp_path):
    root = make_synthetic_dataset(tmp_path / "syn", seed=1, **SMALL)
    assert root == tmp_path / "syn"
    train = _rows(root / "train_labels.csv")
    test = _rows(root / "test_labels.csv")
    assert list(train[0]) == ["sample_index", "label"]
    assert [r["sample_index"] for r in train] == [f"img_{i:04d}.png" for i in range(8)]
    assert [r["sample_index"] for r in test] == [f"img_{i:04d}.png" for i in range(8, 12)]
    for split, rows in (("train_data", train), ("test_data", test)):
        for row in rows:
            image = Image.open(root / split / row["sample_index"])
            mask = Image.open(root / split / row["sample_index"].replace("img_", "mask_"))
            assert image.mode == "RGB" and image.size == mask.size
            assert 96 <= min(image.size) and max(image.size) <= 160
            assert set(np.unique(np.asarray(mask))) == {0, 255}
            assert row["label"] in CLASS_NAMES
    assert sorted(p.name for p in (root / "train_data").iterdir()) == sorted(
        [f"img_{i:04d}.png" for i in range(8)] + [f"mask_{i:04d}.png" for i in range(8)]
    )
    assert "SYNTHETIC" in (root / "README.txt").read_text()
    # the package's own reader takes it as the challenge layout; test labels stay hidden from it
    samples = read_samples(root)
    assert samples.layout == "challenge"
    assert len(samples.train) == 8 and len(samples.test) == 4
    assert all(s.label is None and s.mask_path is not None for s in samples.test)


def test_deterministic_per_seed(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", seed=3, **SMALL)
    b = make_synthetic_dataset(tmp_path / "b", seed=3, **SMALL)
    c = make_synthetic_dataset(tmp_path / "c", seed=4, **SMALL)
    for name in ("train_labels.csv", "test_labels.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    for path in sorted((a / "train_data").iterdir()) + sorted((a / "test_data").iterdir()):
        other = b / path.parent.name / path.name
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(other)))
    first = np.asarray(Image.open(a / "train_data" / "img_0000.png"))
    assert not np.array_equal(first, np.asarray(Image.open(c / "train_data" / "img_0000.png")))


def test_make_synthetic_image_contract():
    image, mask = make_synthetic_image(np.random.default_rng(0), 2, (200, 150))
    assert image.size == (200, 150) and image.mode == "RGB"
    assert mask.shape == (150, 200) and mask.dtype == bool
    image2, mask2 = make_synthetic_image(np.random.default_rng(0), 2, (200, 150))
    assert np.array_equal(np.asarray(image), np.asarray(image2)) and np.array_equal(mask, mask2)
    with pytest.raises(ValueError, match="label_index"):
        make_synthetic_image(np.random.default_rng(0), 4, (200, 150))
    with pytest.raises(ValueError, match="at least 64x64"):
        make_synthetic_image(np.random.default_rng(0), 0, (32, 200))


@pytest.mark.parametrize("label_index", range(4))
def test_mask_has_several_components_inside_tissue(label_index):
    for k in range(5):
        rng = np.random.default_rng([label_index, k])
        image, mask = make_synthetic_image(rng, label_index, (int(rng.integers(64, 400)), int(rng.integers(64, 400))))
        _, n_components = ndimage.label(mask)
        assert n_components >= 2
        assert 0.04 < mask.mean() < 0.5
        rgb = np.asarray(image, dtype=np.float32)
        # masked tissue is stained (darker than the white background)
        assert rgb[mask].mean() < 200


def test_class_counts_follow_challenge_imbalance(tmp_path):
    assert scaled_counts(691) == {"HER2(+)": 189, "Luminal A": 205, "Luminal B": 220, "Triple negative": 77}
    counts = scaled_counts(100)
    assert sum(counts.values()) == 100
    assert counts == {"HER2(+)": 27, "Luminal A": 30, "Luminal B": 32, "Triple negative": 11}
    assert min(scaled_counts(5).values()) == 1  # every class present when n >= 4
    assert scaled_counts(10, {"Luminal A": 1, "Luminal B": 1}) == {"Luminal A": 5, "Luminal B": 5}
    with pytest.raises(ValueError, match="unknown classes"):
        scaled_counts(10, {"Basal": 1})
    root = make_synthetic_dataset(tmp_path, n_train=20, n_test=8, size_range=(64, 80))
    train = Counter(r["label"] for r in _rows(root / "train_labels.csv"))
    assert train == scaled_counts(20)
    assert train["Luminal B"] > train["Triple negative"]


def test_refuses_to_mix_with_an_earlier_run(tmp_path):
    make_synthetic_dataset(tmp_path, n_train=6, n_test=2, size_range=(64, 80))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic_dataset(tmp_path, n_train=4, n_test=2, size_range=(64, 80))
    make_synthetic_dataset(tmp_path, n_train=4, n_test=2, size_range=(64, 80), overwrite=True)
    assert len(list((tmp_path / "train_data").glob("img_*.png"))) == 4


def _features(image_path):
    """Mean HSV, brightness spread and dark-nuclei fraction over the masked tissue."""
    hsv = np.asarray(Image.open(image_path).convert("HSV"), dtype=np.float32) / 255
    mask = np.asarray(Image.open(image_path.parent / image_path.name.replace("img_", "mask_"))) > 0
    tissue = hsv[mask]
    return [*tissue.mean(axis=0), tissue[:, 2].std(), (tissue[:, 2] < 0.6).mean()]


def test_classes_are_learnable_from_simple_features(tmp_path):
    """Guards the demo: colour/texture statistics separate the classes well above chance (0.25)."""
    root = make_synthetic_dataset(tmp_path, n_train=60, n_test=40, seed=0, size_range=(192, 256))
    data = {}
    for split in ("train", "test"):
        rows = _rows(root / f"{split}_labels.csv")
        x = np.array([_features(root / f"{split}_data" / r["sample_index"]) for r in rows])
        data[split] = (x, np.array([r["label"] for r in rows]))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    clf.fit(*data["train"])
    x_test, y_test = data["test"]
    assert f1_score(y_test, clf.predict(x_test), average="macro") > 0.6
