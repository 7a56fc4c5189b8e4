"""Stain normalisation: Macenko to a pinned reference, its fallback, and the same pixels in the dataset and the engine."""

import csv
import dataclasses
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tiny_models import tiny_model

from hf_histo.data import stain
from hf_histo.data.builder import config_name, load_patch_dataset
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.stain import normalize_stain
from hf_histo.data.transforms import make_image_processor
from hf_histo.inference.engine import InferenceEngine

# Hematoxylin and eosin optical-density vectors (columns) of two "labs": Ruifrok's, and a bluer, paler staining.
LAB_A = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
LAB_B = np.array([[0.45, 0.20], [0.75, 0.85], [0.48, 0.49]])


def he_image(stains: np.ndarray, seed: int = 0, size: int = 96, strength: float = 1.0) -> np.ndarray:
    """An H&E-like uint8 image by Beer-Lambert: random H and E concentrations on a white background."""
    rng = np.random.default_rng(seed)
    concentrations = rng.gamma(2.0, 0.35, size=(2, size * size)) * strength
    concentrations[:, rng.random(size * size) < 0.2] = 0.0  # background
    od = (stains / np.linalg.norm(stains, axis=0)) @ concentrations
    rgb = 240.0 * np.exp(-od)
    return np.clip(rgb, 0, 255).astype(np.uint8).T.reshape(size, size, 3)


def test_macenko_brings_two_stainings_of_the_same_tissue_together():
    a = Image.fromarray(he_image(LAB_A))
    b = Image.fromarray(he_image(LAB_B, strength=0.7))
    before = np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
    na, nb = normalize_stain(a, "macenko", "a.png"), normalize_stain(b, "macenko", "b.png")
    assert na.size == a.size and na.mode == "RGB"
    after = np.abs(np.asarray(na, float) - np.asarray(nb, float)).mean()
    assert after < 0.35 * before, (before, after)
    assert not np.array_equal(np.asarray(na), np.asarray(a))
    assert np.array_equal(np.asarray(normalize_stain(a, "macenko")), np.asarray(na))  # a function of the image


def test_none_is_the_image_itself_and_unknown_methods_are_refused():
    image = Image.fromarray(he_image(LAB_A))
    assert normalize_stain(image, "none") is image
    with pytest.raises(ValueError, match="unknown stain normalisation 'reinhard'.*macenko"):
        normalize_stain(image, "reinhard")
    with pytest.raises(ValueError, match="unknown stain normalisation 'vahadane'"):
        PatchingConfig(stain_norm="vahadane")


@pytest.mark.parametrize("stained", [0, 10])
def test_an_image_with_too_little_stain_is_used_as_it_is_with_a_warning(caplog, stained):
    rgb = np.full((64, 64, 3), 245, np.uint8)
    rgb.reshape(-1, 3)[:stained] = (120, 60, 150)
    image = Image.fromarray(rgb)
    with caplog.at_level(logging.WARNING, logger="hf_histo.data.stain"):
        assert normalize_stain(image, "macenko", "blank.png") is image
    assert "blank.png: the macenko stain estimate failed" in caplog.text


def _divide_by_zero(**kwargs):
    return np.ones(3) / np.zeros(3), None, None  # as torchstain does on a degenerate estimate (maxC of 0)


def _no_convergence(**kwargs):
    raise np.linalg.LinAlgError("Eigenvalues did not converge")


@pytest.mark.parametrize("normalize", [_no_convergence, _divide_by_zero], ids=["raises", "divides_by_zero"])
def test_a_failed_or_non_finite_estimate_falls_back_with_a_warning(monkeypatch, caplog, normalize):
    fake = SimpleNamespace(normalize=normalize, HERef=None, maxCRef=None)
    monkeypatch.setattr(
        stain, "torchstain", SimpleNamespace(normalizers=SimpleNamespace(MacenkoNormalizer=lambda backend: fake))
    )
    image = Image.fromarray(he_image(LAB_A))
    with caplog.at_level(logging.WARNING, logger="hf_histo.data.stain"):
        assert normalize_stain(image, "macenko", "odd.png") is image
    assert "odd.png: the macenko stain estimate failed" in caplog.text


def test_the_banded_transform_is_torchstains():
    rgb = he_image(LAB_B, seed=3, size=120)
    normalizer = stain.torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    normalizer.HERef, normalizer.maxCRef = np.array(stain.MACENKO_HE_REF), np.array(stain.MACENKO_MAX_C_REF)
    whole, _, _ = normalizer.normalize(I=rgb, Io=240, alpha=1, beta=0.15, stains=False)
    normalizer.fit(rgb, Io=240, alpha=1, beta=0.15)  # the estimate alone: this image's stains and concentrations
    ours = stain._to_reference(rgb, normalizer.HERef, normalizer.maxCRef)
    difference = np.abs(ours.astype(int) - whole.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.001  # lstsq rounding at the uint8 cast


def test_a_large_image_is_estimated_on_a_subsample_and_normalised_in_bands(monkeypatch):
    image = Image.fromarray(he_image(LAB_B, seed=1, size=200, strength=0.7))
    one_piece = np.asarray(normalize_stain(image, "macenko"), float)
    monkeypatch.setattr(stain, "MACENKO_ONE_PIECE_PIXELS", 10_000)  # 40,000 pixels: every 2nd one, 12-row bands
    banded = np.asarray(normalize_stain(image, "macenko"), float)
    assert banded.shape == one_piece.shape
    assert np.abs(banded - one_piece).mean() < 1.5  # the subsample's estimate is the image's, to a grey level
    assert np.abs(banded - np.asarray(image, float)).mean() > 5 * np.abs(banded - one_piece).mean()


def test_without_torchstain_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(stain, "torchstain", None)
    with pytest.raises(ImportError, match=r"pip install 'torchstain>=1\.3'"):
        normalize_stain(Image.fromarray(he_image(LAB_A)), "macenko")


def _table(root, n: int = 4):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label", "patient_id"])
        for i in range(n):
            Image.fromarray(he_image(LAB_A if i % 2 else LAB_B, seed=i, size=80)).save(root / "images" / f"im{i}.png")
            mask = np.zeros((80, 80), np.uint8)
            mask[8:72, 4 + i : 60 + i] = 255
            Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
            writer.writerow([f"im{i}.png", "ab"[i % 2], f"p{i}"])
    return root


def test_the_dataset_and_the_engine_cut_the_same_normalised_patches(tmp_path):
    root = _table(tmp_path / "data")
    patching = PatchingConfig(strategy="topk", patch_size=32, top_k=3, stain_norm="macenko")
    plain = PatchingConfig(strategy="topk", patch_size=32, top_k=3)
    assert config_name(patching) == "topk-p32-s16-k3-macenko" and config_name(plain) == "topk-p32-s16-k3"
    train = load_patch_dataset(root, patching, val_fraction=0, cache_dir=tmp_path / "cache")["train"]
    raw = load_patch_dataset(root, plain, val_fraction=0, cache_dir=tmp_path / "cache")["train"]
    assert train["bbox"] == raw["bbox"]  # the boxes come from the mask: normalisation changes only the pixels
    engine = InferenceEngine(tiny_model(patching=patching.to_dict()), make_image_processor(32))
    checked = 0
    for i in range(4):
        path = str(root / "images" / f"im{i}.png")
        patched = engine.patch(engine.decode(path), str(root / "masks" / f"im{i}.png"), name=path)
        crops = {tuple(map(int, box[:4])): np.asarray(crop) for box, crop in zip(patched.boxes, engine.crops(patched))}
        for row, raw_row in zip(train, raw):
            if row["image_id"] != f"im{i}":
                continue
            stored = np.asarray(row["image"])
            assert np.array_equal(stored, crops[tuple(row["bbox"])])
            assert np.abs(stored.astype(int) - np.asarray(raw_row["image"], int)).mean() > 2  # normalised
            checked += 1
    assert checked == len(train) == 12


# A fold's training starts torch's OpenMP pool in the process that then forks the builder's cutting processes: the
# stain normalisation there must not run an OpenMP region (torch's would hang in the child).
AFTER_TRAINING = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from test_stain import _table
    from hf_histo.data.builder import load_patch_dataset
    from hf_histo.data.patching import PatchingConfig

    a = torch.randn(1500, 1500)
    (a @ a).sum(), torch.linalg.eigh(a[:200, :200] @ a[:200, :200].T)
    root = Path(sys.argv[1])
    patching = PatchingConfig(strategy="topk", patch_size=32, top_k=3, stain_norm="macenko")
    train = load_patch_dataset(_table(root / "data"), patching, val_fraction=0, cache_dir=root / "c", num_proc=2)
    print(len(train["train"]))
    """
)


def test_cutting_processes_forked_after_torch_ran_normalise_without_hanging(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", AFTER_TRAINING, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "12"


def test_read_ahead_threads_normalise_as_one_thread_does():
    patching = PatchingConfig(strategy="grid", patch_size=32, min_foreground=100, stain_norm="macenko")
    model, processor = tiny_model(patching=patching.to_dict()), make_image_processor(32)
    items = [(he_image(LAB_A if i % 2 else LAB_B, seed=i, size=64 + 8 * i), None, f"im{i}") for i in range(5)]
    one = list(InferenceEngine(model, processor, num_workers=0).predict_many(items))
    threads = list(InferenceEngine(model, processor, num_workers=2, batch_size=4).predict_many(items))
    raw = list(
        InferenceEngine(model, processor, patching=dataclasses.replace(patching, stain_norm="none")).predict_many(
            items
        )
    )
    for a, b, c in zip(one, threads, raw):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
        assert np.array_equal(a.boxes, c.boxes)
    assert any(not np.allclose(a.patch_probs, c.patch_probs, atol=1e-4) for a, c in zip(one, raw))


def test_inspect_draws_its_contact_sheet_on_the_normalised_images(tmp_path, monkeypatch):
    from hf_histo.data import inspect as inspect_module

    root = _table(tmp_path / "data")
    drawn, thumbnail = [], inspect_module._thumbnail
    monkeypatch.setattr(
        inspect_module, "_thumbnail", lambda image: drawn.append(np.asarray(image)) or thumbnail(image)
    )
    patching = PatchingConfig(strategy="grid", patch_size=32, min_foreground=10, stain_norm="macenko")
    inspect_module.inspect_dataset(root, tmp_path / "out", patching, strategies=("grid",), n_contact=2)
    originals = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((root / "images").iterdir())]
    normalised = [np.asarray(normalize_stain(Image.fromarray(o), "macenko")) for o in originals]
    assert len(drawn) == 2 and (tmp_path / "out" / "contact_sheet.png").is_file()
    assert all(any(np.array_equal(d, n) for n in normalised) for d in drawn)
    assert not any(np.array_equal(d, o) for d in drawn for o in originals)
