"""Tests of data cleaning: each detector on small generated images, the written files, and real contaminated data."""

from __future__ import annotations

import csv
import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hf_histo.data.cleaning import (
    REASONS,
    CleaningConfig,
    aligned_similarity,
    artifact_regions,
    clean_dataset,
    image_features,
    outlier_scores,
    robust_z,
    stain_fraction,
)
from hf_histo.data.sources import DataError, read_samples

try:
    from contamination import (
        DEV_PARAMS,
        HELDOUT_PARAMS,
        build_contaminated_copy,
        make_cartoon,
        paste_blobs,
        score_flags,
        synthetic_tissue,
    )
except ImportError:  # tests/ imported as a package
    from tests.contamination import (
        DEV_PARAMS,
        HELDOUT_PARAMS,
        build_contaminated_copy,
        make_cartoon,
        paste_blobs,
        score_flags,
        synthetic_tissue,
    )

SIZE = (320, 240)
COLOURS = {"green": (40, 190, 50), "yellow": (235, 215, 30), "cyan": (40, 200, 215), "blue": (40, 90, 235)}


def _tissue(seed: int, size: tuple[int, int] = SIZE) -> Image.Image:
    return synthetic_tissue(size, np.random.default_rng(seed))


def _paste(image: Image.Image, colour, shape: str, area: float, alpha: float, seed: int = 0) -> Image.Image:
    """Paste one shape of ``area`` (fraction of the image) in ``colour`` at opacity ``alpha``."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    r = math.sqrt(area * w * h / math.pi)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    layer = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(layer)
    if shape == "ellipse":
        draw.ellipse([cx - 1.3 * r, cy - r / 1.3, cx + 1.3 * r, cy + r / 1.3], fill=int(255 * alpha))
    else:  # polygon
        angles = np.sort(rng.uniform(0, 2 * math.pi, 7))
        draw.polygon([(cx + r * 1.1 * math.cos(t), cy + r * 1.1 * math.sin(t)) for t in angles], fill=int(255 * alpha))
    return Image.composite(Image.new("RGB", image.size, colour), image, layer)


# ----------------------------------------------------------------------------------------- detectors


def test_stain_fraction_separates_he_from_foreign_colour():
    assert stain_fraction(_tissue(0)) > 0.99
    assert stain_fraction(Image.new("RGB", SIZE, (60, 180, 60))) == 0.0
    assert stain_fraction(Image.new("RGB", SIZE, (255, 255, 255))) == 1.0  # nothing coloured: no evidence


@pytest.mark.parametrize("colour", sorted(COLOURS))
@pytest.mark.parametrize("shape", ["ellipse", "polygon"])
@pytest.mark.parametrize("alpha", [0.75, 1.0])
def test_artifact_regions_find_pasted_blob(colour, shape, alpha):
    image = _paste(_tissue(1), COLOURS[colour], shape, area=0.05, alpha=alpha, seed=3)
    regions, fraction, box = artifact_regions(image)
    assert 0.03 < fraction < 0.09, fraction
    assert box is not None and regions.any()
    assert artifact_regions(_tissue(1))[1] == 0.0


def test_artifact_regions_ignore_scattered_foreign_pixels():
    arr = np.asarray(_tissue(2)).copy()
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, SIZE[1], 300), rng.integers(0, SIZE[0], 300)
    arr[ys, xs] = (40, 190, 50)  # 0.4% green pixels, none of them a region
    assert artifact_regions(arr)[1] == 0.0


def test_image_features_hash_decoded_pixels_and_masks(tmp_path):
    image = _tissue(3)
    for name, kw in {"a.png": {"compress_level": 0}, "b.png": {"compress_level": 9}}.items():
        image.save(tmp_path / name, **kw)
    image.convert("RGBA").save(tmp_path / "c.png")
    assert len({(tmp_path / n).read_bytes() for n in ("a.png", "b.png", "c.png")}) == 3
    from hf_histo.data.images import load_image

    hashes = {image_features(load_image(tmp_path / n)).pixel_hash for n in ("a.png", "b.png", "c.png")}
    assert len(hashes) == 1
    assert image_features(_tissue(4)).pixel_hash not in hashes
    mask = np.zeros(SIZE[::-1], bool)
    assert image_features(image, mask).mask_hash is None  # empty masks say nothing
    assert image_features(image, ~mask).mask_hash is None  # nor do full ones
    mask[10:50, 20:90] = True
    assert image_features(image, mask).mask_hash == image_features(_tissue(5), mask.copy()).mask_hash


def test_outlier_scores_are_robust_z_scores():
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, (200, 8))
    odd = clean[:6] + np.array([8.0, -8.0, 0, 0, 0, 0, 0, 0])
    z = outlier_scores(np.vstack([clean, odd]))
    assert z[:200].max() < 5
    assert z[200:].min() > 8
    assert abs(np.median(z[:200])) < 0.5


def test_outlier_scores_survive_a_reference_of_mostly_identical_rows():
    """No spread for the robust covariance to estimate: the scaled RMS distance is used, nothing raises."""
    x = np.random.default_rng(0).normal(0, 1, (100, 16))
    x[:70] = 0.0
    z = outlier_scores(x)
    assert np.all(z[:70] == 0) and z[70:].min() > 10


def test_robust_z_is_median_and_normal_consistent_mad():
    values = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0], [100.0, 5.0]])
    z = robust_z(values)
    np.testing.assert_allclose(z[:, 0], (values[:, 0] - 3.0) / (1.4826 * 1.0), rtol=1e-5)
    np.testing.assert_array_equal(z[:, 1], 0.0)  # a constant column: the floored scale, no division by zero


def test_aligned_similarity_sees_through_crops_and_reencoding():
    image = _tissue(6, (400, 300))
    crop = image.crop((12, 9, 388, 282))  # 3% off each side
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=80)
    copy = Image.open(buf).convert("RGB")
    thumbs = [np.asarray(x.resize((64, 64), Image.BOX)) for x in (image, copy, _tissue(7, (400, 300)))]
    assert aligned_similarity(thumbs[0], thumbs[1]) > 0.8
    assert aligned_similarity(thumbs[0], thumbs[2]) < 0.5


def _samples_and_features(images: dict[str, Image.Image], masks: dict[str, np.ndarray | None]):
    from hf_histo.data.sources import Sample

    ids = sorted(images)
    samples = [Sample(Path(f"{i}.png"), None, "a", i, i) for i in ids]
    return samples, [image_features(images[i], masks.get(i), image_id=i) for i in ids]


def test_edited_twin_sharing_the_mask_is_flagged_even_when_it_sorts_first():
    """A pale green paste (below the artifact detector's saturation) on a copy named to sort first."""
    from hf_histo.data.cleaning import find_flags

    images = {f"t{i}": _tissue(20 + i) for i in range(8)}
    mask = np.zeros(SIZE[::-1], bool)
    mask[40:120, 60:200] = True
    images["a_pasted"] = _paste(images["t0"], (150, 185, 150), "ellipse", 0.08, 1.0)
    assert artifact_regions(images["a_pasted"])[1] == 0.0
    samples, feats = _samples_and_features(images, {"t0": mask, "a_pasted": mask})
    flags = find_flags(samples, feats)
    assert [(f.image_id, f.related_to) for f in flags] == [("a_pasted", "t0")]
    assert flags[0].reason in ("artifact", "non_tissue", "shared_mask")


def test_exact_duplicates_keep_the_first_in_image_id_order():
    from hf_histo.data.cleaning import find_flags

    images = {f"t{i}": _tissue(40 + i) for i in range(8)}
    images["t3_copy"], images["a_copy"] = images["t3"], images["t5"]
    samples, feats = _samples_and_features(images, {})
    flags = {f.image_id: (f.reason, f.related_to) for f in find_flags(samples, feats, manual=["t7", "unknown"])}
    assert flags == {"t3_copy": ("duplicate", "t3"), "t5": ("duplicate", "a_copy"), "t7": ("manual", "")}


# ----------------------------------------------------------------------------------------- clean_dataset


def _write_sample(root: Path, name: str, image: Image.Image, mask: Image.Image | None, rows, label, group):
    image.save(root / "images" / f"{name}.png")
    if mask is not None:
        mask.save(root / "masks" / f"{name}.png")
    rows.append((f"{name}.png", label, group))


@pytest.fixture
def small_dataset(tmp_path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A table-layout folder with 10 originals and one contaminated sample of each kind.

    Returns the folder and the expected report: ``{image_id: (reason, related_to)}``.
    """
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows: list[tuple[str, str, str]] = []
    originals, masks = {}, {}
    for i in range(10):
        name = f"img_{i:02d}"
        mask = Image.new("L", SIZE, 0)
        x, y = rng.integers(20, 200), rng.integers(20, 140)
        ImageDraw.Draw(mask).ellipse([x, y, x + rng.integers(40, 100), y + rng.integers(30, 80)], fill=255)
        originals[name], masks[name] = _tissue(100 + i), mask
        _write_sample(root, name, originals[name], mask, rows, "ab"[i % 2], f"p{i // 3}")
    buf = io.BytesIO()
    originals["img_04"].save(buf, format="JPEG", quality=85)
    contaminated = {
        "img_03_copy": (originals["img_03"].convert("RGBA"), masks["img_03"], "b"),
        "img_04_jpeg": (Image.open(buf).convert("RGB"), masks["img_04"], "a"),
        "img_05_toon": (make_cartoon(SIZE, rng, DEV_PARAMS), masks["img_05"], "a"),
        "img_06_blob": (_paste(originals["img_06"], COLOURS["green"], "ellipse", 0.06, 0.9), masks["img_06"], "a"),
        "img_07_relabel": (originals["img_07"], None, "a"),
    }
    for name, (image, mask, label) in contaminated.items():
        _write_sample(root, name, image, mask, rows, label, "px")
    # Test split: never excluded, but reported as a copy of a training image (leakage into the test score).
    _write_sample(root, "zz_unlabelled", originals["img_00"], None, rows, "", "pz")
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filename", "label", "patient_id"), *rows])
    (tmp_path / "manual.txt").write_text("# checked by hand\nimg_08  # out of focus\n\n")
    expected = {
        "img_03_copy": ("duplicate", "img_03"),
        "img_04_jpeg": ("near_duplicate", "img_04"),
        "img_05_toon": ("shared_mask", "img_05"),
        "img_06_blob": ("artifact", "img_06"),
        "img_07_relabel": ("label_conflict", "img_07"),
        "img_08": ("manual", ""),
    }
    return root, expected


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_clean_dataset_reports_each_kind_and_writes_a_usable_manifest(small_dataset, tmp_path):
    root, expected = small_dataset
    before = _tree_digest(root)
    out = tmp_path / "out"
    result = clean_dataset(root, out, manual_exclusions=tmp_path / "manual.txt", progress=False)

    report = _read_csv(out / "cleaning_report.csv")
    assert list(report[0]) == ["image_id", "reason", "score", "related_to"]
    leak = {"zz_unlabelled": ("test_duplicate_of_train", "img_00")}
    assert {r["image_id"]: (r["reason"], r["related_to"]) for r in report} == {**expected, **leak}
    assert [r["image_id"] for r in report] == sorted({**expected, **leak})
    assert all(r["reason"] in REASONS and 0.0 <= float(r["score"]) <= 1.0 for r in report)
    assert result.flagged_ids == set(expected) | set(leak) and result.excluded_ids == set(expected)

    manifest = _read_csv(out / "clean_manifest.csv")
    assert list(manifest[0]) == ["image_id", "image_path", "mask_path", "label", "group_id", "split"]
    kept = [r["image_id"] for r in manifest]
    assert kept == sorted({f"img_{i:02d}" for i in range(10)} - {"img_08"} | {"zz_unlabelled"})
    row = next(r for r in manifest if r["image_id"] == "img_01")
    assert (row["label"], row["group_id"], row["split"]) == ("b", "p0", "train")
    assert Path(row["image_path"]).is_absolute() and Path(row["mask_path"]).name == "img_01.png"
    assert next(r for r in manifest if r["image_id"] == "zz_unlabelled")["split"] == "test"

    # The two ways back into training: the manifest, or the source with the exclusion list.
    assert [s.image_id for s in read_samples(out / "clean_manifest.csv").samples] == kept
    assert (out / "exclusions.txt").read_text().split() == sorted(expected)
    assert [s.image_id for s in read_samples(root, exclude=out / "exclusions.txt").samples] == kept

    summary = (out / "summary.txt").read_text()
    assert "images flagged: 6" in summary and "img_07" in summary  # the kept image whose copy has another label
    assert "test images that duplicate a training image: 1" in summary and "zz_unlabelled = img_00" in summary
    for reason in {r for r, _ in expected.values()}:
        sheet = Image.open(out / f"contact_sheet_{reason}.png")
        assert sheet.width > 200 and sheet.height > 100
    assert not (out / "contact_sheet_non_tissue.png").exists()
    assert _tree_digest(root) == before, "source files must never change"


def test_clean_dataset_is_idempotent(small_dataset, tmp_path):
    root, _ = small_dataset
    cfg = CleaningConfig(num_workers=0)
    clean_dataset(root, tmp_path / "out", manual_exclusions=["img_08"], config=cfg, progress=False)
    first = {k: v[0] for k, v in _tree_digest(tmp_path / "out").items()}
    clean_dataset(root, tmp_path / "out", manual_exclusions=["img_08"], config=cfg, progress=False)
    assert {k: v[0] for k, v in _tree_digest(tmp_path / "out").items()} == first
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_clean_dataset_with_worker_processes_matches_in_process(small_dataset, tmp_path):
    root, _ = small_dataset
    for workers, out in ((0, "a"), (2, "b")):
        clean_dataset(root, tmp_path / out, config=CleaningConfig(num_workers=workers), progress=False)
    assert (tmp_path / "a" / "cleaning_report.csv").read_bytes() == (
        tmp_path / "b" / "cleaning_report.csv"
    ).read_bytes()


def test_embedding_model_callable_is_used(small_dataset, tmp_path):
    root, _ = small_dataset
    seen = []

    def embed(image: Image.Image) -> np.ndarray:
        seen.append(image.size)
        return np.asarray(image.resize((8, 8))).astype(np.float32).ravel() / 255.0

    result = clean_dataset(root, tmp_path / "out", embedding_model=embed, progress=False)
    assert len(seen) == 15  # every train image, not the test one
    assert {f.image_id for f in result.flags} >= {"img_03_copy", "img_04_jpeg", "img_05_toon", "img_07_relabel"}


def test_bad_inputs_raise_data_error(small_dataset, tmp_path):
    root, _ = small_dataset
    with pytest.raises(DataError, match="embedding model folder not found"):
        clean_dataset(root, tmp_path / "out", embedding_model=tmp_path / "no_model", progress=False)
    with pytest.raises(DataError, match="exclusion file not found"):
        clean_dataset(root, tmp_path / "out", manual_exclusions=tmp_path / "missing.txt", progress=False)
    (root / "images" / "img_02.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="img_02.png"):
        clean_dataset(root, tmp_path / "out", progress=False)


@pytest.mark.slow
def test_local_backbone_folder_is_loaded_offline(small_dataset, tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    model_dir = tmp_path / "tiny_vit"
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8
    )
    ViTModel(config).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    root, _ = small_dataset
    result = clean_dataset(root, tmp_path / "out", embedding_model=model_dir, progress=False)
    assert {"img_03_copy", "img_05_toon"} <= result.flagged_ids


# ----------------------------------------------------------------------------------------- real data


@pytest.fixture
def glas(shared_data) -> Path:
    """The GlaS train folder from ../shared/data (the test is skipped when it is absent)."""
    return shared_data("glas_train")


def test_glas_originals_flag_nothing(glas, tmp_path):
    result = clean_dataset(glas, tmp_path / "out", progress=False)
    assert result.flags == []
    assert len(_read_csv(tmp_path / "out" / "clean_manifest.csv")) == 85


def test_blob_pasting_helper_changes_only_a_region(glas):
    image = Image.open(glas / "images" / "train_1.png").convert("RGB")
    out, area = paste_blobs(image, np.random.default_rng(0), DEV_PARAMS)
    changed = (np.abs(np.asarray(out, int) - np.asarray(image, int)).max(-1) > 10).mean()
    assert 0.01 < area < 0.2 and changed < 0.25


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "seed", "params", "names_first"),
    [("dev", 0, DEV_PARAMS, False), ("held-out", 1, HELDOUT_PARAMS, True)],
)
def test_contaminated_glas_precision_recall(glas, tmp_path, name, seed, params, names_first):
    """Held-out: other seed and ranges, and contaminated files named to sort before the originals."""
    truth = build_contaminated_copy(glas, tmp_path / "data", seed=seed, params=params, names_first=names_first)
    result = clean_dataset(tmp_path / "data", tmp_path / "out", progress=False)
    scores = score_flags({f.image_id: f.reason for f in result.flags}, truth)
    print(f"\n{name} contamination (seed {seed}):")
    print(f"  {'kind':15s} {'n':>3s} {'recall':>7s} {'precision':>9s}")
    for kind, s in scores.items():
        if kind != "originals":
            print(f"  {kind:15s} {s['n']:3d} {s['recall']:7.3f} {s['precision']:9.3f}")
    print(f"  originals flagged: {scores['originals']['flagged']} of 85")
    assert scores["originals"]["flagged"] == 0
    for kind, s in scores.items():
        if kind != "originals":
            assert s["recall"] >= 0.95 and s["precision"] >= 0.95, (kind, s)
