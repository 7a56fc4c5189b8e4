"""Feeding the GPU: batched jitter equals the per-patch augmentation, seeded draws, workers, multi-process builds."""

import os
import runpy
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from skimage.color import hed_from_rgb, rgb2hed, rgb_from_hed
from test_sources import make_table
from torchvision.transforms import v2
from torchvision.transforms.v2 import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from hf_histo.data import workers
from hf_histo.data.augmentation import BatchAugment, HEDJitter, PatchAugment, color_jitter, hed_jitter
from hf_histo.data.builder import build_patch_dataset, load_patch_dataset
from hf_histo.data.images import DataError
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.synthetic import make_synthetic_dataset, make_synthetic_image
from hf_histo.data.transforms import (
    AugmentationSeed,
    InputSpec,
    PatchCollator,
    build_patch_augment,
    build_transforms,
    patch_transform_fn,
    to_uint8_tensor,
)
from hf_histo.training.arguments import parse_args

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
SPEC = InputSpec(32, (0.7, 0.5, 0.6), (0.2, 0.25, 0.2))
SPEC0 = InputSpec(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # no normalisation


def _he_patches(n: int, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    side = max(64, 2 * size)
    box = (side // 2 - size // 2, side // 2 - size // 2, side // 2 + size - size // 2, side // 2 + size - size // 2)
    return [make_synthetic_image(rng, i % 4, (side, side))[0].crop(box) for i in range(n)]


@pytest.fixture
def one_thread():
    """Thousands of ops on tiny images: one intra-op thread (two spin-wait when the cores are busy: 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _denormalise(x: torch.Tensor, spec: InputSpec = SPEC) -> torch.Tensor:
    return x * torch.tensor(spec.std).view(3, 1, 1) + torch.tensor(spec.mean).view(3, 1, 1)


# ---- batched jitter: the same ops and the same distribution as the per-patch transform ----------------------------
def test_batched_color_jitter_is_torchvisions_with_each_images_order_and_factors():
    torch.manual_seed(0)
    images = torch.rand(12, 3, 20, 20)
    order = torch.stack([torch.randperm(4) for _ in range(12)])
    factors = torch.cat([torch.empty(12, 3).uniform_(0.7, 1.3), torch.empty(12, 1).uniform_(-0.1, 0.1)], dim=1)
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    expected = []
    for image, fn_order, f in zip(images, order, factors):
        for op in fn_order.tolist():
            image = ops[op](image, float(f[op]))
        expected.append(image)
    torch.testing.assert_close(color_jitter(images, order, factors), torch.stack(expected), atol=2e-6, rtol=0)


def _hed_reference(image: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """0.x's HEDJitter in numpy: skimage's Ruifrok-Johnston stain separation, jitter, recombination."""
    log_adjust = np.log(1e-6)
    stains = (np.log(np.maximum(image.transpose(1, 2, 0), 1e-6)) / log_adjust) @ hed_from_rgb
    return np.clip(np.exp((stains * alpha + beta) * log_adjust @ rgb_from_hed), 0, 1).transpose(2, 0, 1)


def test_batched_hed_jitter_is_the_per_image_one():
    torch.manual_seed(1)
    uint8 = (torch.rand(6, 3, 16, 16) * 200 + 30).to(torch.uint8)
    params = torch.cat([1 + (torch.rand(6, 3) * 2 - 1) * 0.2, (torch.rand(6, 3) * 2 - 1) * 0.1], dim=1)
    images = uint8.double().numpy() / 255
    expected = torch.tensor(
        np.stack([_hed_reference(x, p[:3], p[3:]) for x, p in zip(images, params.double().numpy())])
    )
    batch = hed_jitter(uint8.float() / 255, params[:, :3], params[:, 3:])
    torch.testing.assert_close(batch.double(), expected, atol=1e-5, rtol=0)
    one = HEDJitter(0.2, 0.1).transform(uint8[2].float() / 255, {"alpha": params[2, :3], "beta": params[2, 3:]})
    torch.testing.assert_close(one.double(), expected[2], atol=1e-5, rtol=0)
    full = torch.cat([torch.arange(4).repeat(6, 1).float(), torch.ones(6, 4), params], dim=1)  # colour: identity
    out = BatchAugment((0.0,) * 3, (1.0,) * 3, hed=True)(uint8, full)  # per image on the CPU
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_random_crop_boxes_follow_random_resized_crop():
    augment = PatchAugment(64, "histo", crop_scale=(0.3, 1.0))
    generator = torch.Generator().manual_seed(0)
    ours = [augment._crop_box(60, 90, iter(torch.rand(40, generator=generator).tolist())) for _ in range(2000)]
    crop = RandomResizedCrop(64, scale=(0.3, 1.0))
    torch.manual_seed(0)
    image = torch.zeros(3, 60, 90)
    theirs = [
        (lambda p: (p["top"], p["left"], p["height"], p["width"]))(crop.make_params([image])) for _ in range(2000)
    ]
    for k in range(4):
        assert ks_2samp([b[k] for b in ours], [b[k] for b in theirs]).pvalue > 0.01, k
        assert all(0 <= b[0] and b[0] + b[2] <= 60 and 0 <= b[1] and b[1] + b[3] <= 90 for b in ours)


def _mean_hed(images: torch.Tensor) -> np.ndarray:
    """Mean haematoxylin, eosin and DAB concentration of each image (`skimage.color.rgb2hed`, batched)."""
    rgb = images.permute(0, 2, 3, 1).clamp_min(1e-6).double().numpy()
    return np.maximum((np.log(rgb) / np.log(1e-6)) @ hed_from_rgb, 0).mean(axis=(1, 2))


def _jitter_statistics(
    views: list[torch.Tensor], bases: list[torch.Tensor], spec: InputSpec = SPEC
) -> dict[str, np.ndarray]:
    """Per-view shifts of the channel means, ratios of the channel stds and shifts of the mean HED concentrations."""
    out = {}
    views = torch.stack([_denormalise(v, spec).clamp(0, 1) for v in views])
    bases = torch.stack([_denormalise(b, spec).clamp(0, 1) for b in bases])
    out["mean_shift"] = (views.mean(dim=(-2, -1)) - bases.mean(dim=(-2, -1))).numpy()
    out["std_ratio"] = (views.std(dim=(-2, -1)) / bases.std(dim=(-2, -1)).clamp_min(1e-3)).numpy()
    out["hed_shift"] = _mean_hed(views) - _mean_hed(bases)
    first = rgb2hed(bases[0].permute(1, 2, 0).numpy()).mean(axis=(0, 1))
    np.testing.assert_allclose(_mean_hed(bases[:1])[0], first, atol=1e-6)  # the batched rgb2hed is rgb2hed
    return out


def test_batched_jitter_draws_the_per_patch_jitters_distribution(one_thread):
    """Fixed seeds; colour jitter 0.15 or HED jitter 0.07 instead of 0.1 / 0.05 fail these bounds."""
    n = 1500
    bases = torch.stack([to_uint8_tensor(p) for p in _he_patches(4, size=16)])
    reference = v2.Compose([v2.ColorJitter(0.1, 0.1, 0.1, 0.02), HEDJitter(0.05, 0.05)])
    ref_views = []
    for i in range(n):
        torch.manual_seed(i)
        ref_views.append(reference(bases[i % 4].float() / 255))
    augment = PatchAugment(16, "histo", color_jitter=0.1, hed_jitter=0.05)
    generator = torch.Generator().manual_seed(0)
    params = torch.stack(
        [augment._jitter_params(iter(torch.rand(14, generator=generator).tolist())) for _ in range(n)]
    )
    ours = BatchAugment((0.0,) * 3, (1.0,) * 3, color=True, hed=True)(bases[torch.arange(n) % 4], params)
    plain = (bases[torch.arange(n) % 4].float() / 255).unbind()
    ref_stats, our_stats = _jitter_statistics(ref_views, plain, SPEC0), _jitter_statistics(list(ours), plain, SPEC0)
    for name in ref_stats:
        for channel in range(3):
            a, b = ref_stats[name][:, channel], our_stats[name][:, channel]
            assert ks_2samp(a, b).pvalue > 0.01, (name, channel)
            assert abs(a.mean() - b.mean()) < 0.1 * a.std(), (name, channel)
            assert b.std() == pytest.approx(a.std(), rel=0.08), (name, channel)


@pytest.mark.parametrize("augment", ["histo", "flips"])
def test_batched_augmentation_matches_the_per_patch_transform_in_distribution(augment, one_thread):
    """Fixed seeds; a distribution that differs (e.g. colour jitter 0.15 instead of 0.1) fails these bounds."""
    patches = _he_patches(8)
    n = 256
    reference = build_transforms(SPEC, train=True, augment=augment)
    eval_view = build_transforms(SPEC, train=False)
    ref_views = []
    for i in range(n):
        torch.manual_seed(i)
        ref_views.append(reference(patches[i % 8]))
    patch_augment = build_patch_augment(SPEC, augment)
    drawn = [
        patch_augment(to_uint8_tensor(patches[i % 8]), torch.Generator().manual_seed(10_000 + i)) for i in range(n)
    ]
    params = torch.stack([p for _, p in drawn]) if drawn[0][1] is not None else None
    ours = patch_augment.batch_augment()(torch.stack([x for x, _ in drawn]), params)
    bases = [eval_view(patches[i % 8]) for i in range(n)]
    ref_stats, our_stats = _jitter_statistics(ref_views, bases), _jitter_statistics(list(ours), bases)
    for name in ref_stats:
        for channel in range(3):
            a, b = (np.round(stats[name][:, channel], 4) for stats in (ref_stats, our_stats))  # no float noise
            assert ks_2samp(a, b).pvalue > 0.01, (name, channel)
            assert abs(a.mean() - b.mean()) < 0.25 * a.std() + 1e-4, (name, channel)
            assert b.std() == pytest.approx(a.std(), rel=0.2, abs=1e-4), (name, channel)


def test_no_augmentation_trains_on_the_eval_view():
    patch = _he_patches(1, size=40)[0]
    augment = build_patch_augment(SPEC, "none")
    pixels, params = augment(to_uint8_tensor(patch))
    assert params is None and pixels.dtype == torch.uint8
    out = augment.batch_augment()(pixels[None])[0]
    torch.testing.assert_close(out, build_transforms(SPEC, train=False)(patch), atol=1e-5, rtol=0)


# ---- seeded draws: reproducible with any number of workers, new at each epoch ------------------------------------
def _patch_view(seed: AugmentationSeed, augment: str = "histo") -> datasets.Dataset:
    images = _he_patches(12)
    ds = datasets.Dataset.from_dict(
        {
            "image": images,
            "label": [i % 2 for i in range(12)],
            "image_id": [f"im{i // 3}" for i in range(12)],
            "patch_index": [i % 3 for i in range(12)],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.Value("int64"),
                "image_id": datasets.Value("string"),
                "patch_index": datasets.Value("int32"),
            }
        ),
    )
    return ds.with_transform(patch_transform_fn(build_patch_augment(SPEC, augment), seed=seed))


def _batches(view: datasets.Dataset, num_workers: int, **kw) -> list[dict[str, torch.Tensor]]:
    loader = torch.utils.data.DataLoader(view, batch_size=4, collate_fn=PatchCollator(), num_workers=num_workers, **kw)
    return list(loader)


def test_seeded_patches_are_the_same_in_two_runs_and_with_workers():
    first = _batches(_patch_view(AugmentationSeed(7)), 0)
    again = _batches(_patch_view(AugmentationSeed(7)), 2)
    assert first[0]["pixel_values"].dtype == torch.uint8 and first[0]["augment_params"].shape == (4, 14)
    for a, b in zip(first, again):
        assert a.keys() == b.keys() == {"pixel_values", "augment_params", "labels"}
        for key in a:
            assert torch.equal(a[key], b[key]), key
    other = _batches(_patch_view(AugmentationSeed(8)), 0)
    assert not torch.equal(first[0]["pixel_values"], other[0]["pixel_values"])


def test_persistent_workers_see_the_new_epoch():
    seed = AugmentationSeed(3)
    view = _patch_view(seed)
    loader = torch.utils.data.DataLoader(
        view, batch_size=4, collate_fn=PatchCollator(), num_workers=1, persistent_workers=True
    )
    epoch0 = list(loader)
    seed.epoch = 1
    epoch1 = list(loader)
    fresh = AugmentationSeed(3)
    fresh.epoch = 1
    expected = _batches(_patch_view(fresh), 0)
    assert not torch.equal(epoch0[0]["pixel_values"], epoch1[0]["pixel_values"])
    for a, b in zip(epoch1, expected):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(
            a["augment_params"], b["augment_params"]
        )


def test_a_seed_needs_the_generator_drawing_augmentation():
    with pytest.raises(TypeError, match="needs a PatchAugment"):
        patch_transform_fn(build_transforms(SPEC, train=True), seed=AugmentationSeed(0))


# ---- multi-process builds and patch storage ------------------------------------------------------------------------
def _stored(split: datasets.Dataset) -> dict[str, list]:
    raw = split.cast_column("image", datasets.Image(decode=False))
    return {name: raw[name] if name != "image" else [x["bytes"] for x in raw[name]] for name in raw.column_names}


def test_two_processes_build_the_same_bytes_in_the_same_order(tmp_path):
    rows = [(f"im{i:02d}.png", "ab"[i % 2], f"p{i}") for i in range(10)]
    root = make_table(tmp_path / "data", rows)
    patching = PatchingConfig(strategy="grid", patch_size=24, stride=16, min_foreground=10)
    one, report_one = build_patch_dataset(root, patching, val_fraction=0.3, cache_dir=tmp_path / "c1")
    two, report_two = build_patch_dataset(root, patching, val_fraction=0.3, cache_dir=tmp_path / "c2", num_proc=2)
    assert set(one) == set(two) == {"train", "validation"}
    for split in one:
        assert len(set(one[split]["image_id"])) >= 2  # each split really was cut by two processes
        assert _stored(one[split]) == _stored(two[split]), split
    assert report_one.images == report_two.images and report_one.splits == report_two.splits


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_ordered_map_keeps_the_order_and_this_process_takes_a_share():
    """2 processes = 1 worker + this one: both compute items, results come in order, early stops cancel."""
    pool = workers.process_pool(2)
    try:
        assert pool._max_workers == 1
        delays = [0.02 * (i % 3) for i in range(24)]
        pids = list(workers.ordered_map(_pid_after, delays, pool))
        assert len(pids) == 24 and os.getpid() in pids and len(set(pids)) == 2
        squares = list(workers.ordered_map(abs, [-i for i in range(40)], pool))
        assert squares == list(range(40))
        stopped = workers.ordered_map(_pid_after, [0.05] * 50, pool)
        next(stopped)
        stopped.close()  # stops early: cancels what no worker has started
    finally:
        pool.shutdown()
    assert workers.process_pool(1) is None and list(workers.ordered_map(abs, [-2, 3])) == [2, 3]


def test_a_bad_image_met_by_a_worker_process_raises_or_is_skipped_as_in_one(tmp_path):
    root = make_table(tmp_path / "data", [(f"im{i}.png", "ab"[i % 2], f"p{i}") for i in range(6)])
    (root / "images" / "im3.png").write_bytes((root / "images" / "im3.png").read_bytes()[:100])
    patching = PatchingConfig(strategy="topk", patch_size=32, top_k=2)
    with pytest.raises(DataError, match=r"im3\.png: truncated"):
        load_patch_dataset(root, patching, val_fraction=0, cache_dir=tmp_path / "c", num_proc=2)
    skipped = {}
    for n in (1, 2):
        data, report = build_patch_dataset(
            root, patching, val_fraction=0, cache_dir=tmp_path / f"s{n}", on_error="skip", num_proc=n
        )
        skipped[n] = (report.skipped, _stored(data["train"]))
    assert skipped[1] == skipped[2] and "im3.png" in skipped[2][0][0][0]


def test_raw_and_png_patches_hold_the_same_pixels_in_separate_caches(tmp_path):
    root = make_table(tmp_path / "data", [(f"im{i}.png", "ab"[i % 2], f"p{i}") for i in range(4)])
    patching = PatchingConfig(strategy="topk", patch_size=32, top_k=2)
    raw, raw_report = build_patch_dataset(root, patching, val_fraction=0, cache_dir=tmp_path / "c")
    png, png_report = build_patch_dataset(root, patching, val_fraction=0, cache_dir=tmp_path / "c", patch_format="png")
    assert raw_report.cache_dir != png_report.cache_dir and not png_report.cached
    assert _stored(raw["train"])["image"][0][:2] == b"P6" and _stored(png["train"])["image"][0][:4] == b"\x89PNG"
    for a, b in zip(raw["train"]["image"], png["train"]["image"]):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="patch_format='jpeg' is not supported"):
        load_patch_dataset(root, patching, cache_dir=tmp_path / "c", patch_format="jpeg")


# ---- worker defaults ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cpus, local_world, workers_expected, proc_expected", [(16, 1, 8, 8), (16, 4, 3, 8), (2, 1, 1, 2), (1, 1, 0, 1)]
)
def test_worker_defaults_follow_the_cpus(monkeypatch, cpus, local_world, workers_expected, proc_expected):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert workers.default_num_workers() == workers_expected
    assert workers.default_num_proc() == proc_expected


def test_recipe_workers_default_on_and_explicit_flags_win(tmp_path, monkeypatch):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    base = ["--data_dir", "D", "--output_dir", str(tmp_path)]
    data_args, _, args = parse_args({}, base)
    assert (args.dataloader_num_workers, args.dataloader_persistent_workers, data_args.num_proc) == (3, True, 4)
    assert args.dataloader_pin_memory is torch.cuda.is_available()
    data_args, _, args = parse_args({}, base + ["--dataloader_num_workers", "0", "--num_proc", "1"])
    assert (args.dataloader_num_workers, args.dataloader_persistent_workers, data_args.num_proc) == (0, False, 1)
    _, _, args = parse_args({}, base + ["--dataloader_num_workers=2", "--dataloader_persistent_workers", "false"])
    assert (args.dataloader_num_workers, args.dataloader_persistent_workers) == (2, False)
    _, _, args = parse_args({"dataloader_num_workers": 1}, base + ["--dataloader_pin_memory", "true"])
    assert (args.dataloader_num_workers, args.dataloader_persistent_workers, args.dataloader_pin_memory) == (
        1,
        True,
        True,
    )
    with pytest.raises(ValueError, match="--num_proc must be >= 1"):
        parse_args({}, base + ["--num_proc", "0"])


# ---- the trainer jitters the batch; a recipe trains with workers -------------------------------------------------
def test_trainer_jitters_and_normalises_uint8_batches(tmp_path):
    from tiny_models import tiny_model

    from hf_histo.training.arguments import HistoTrainingArguments
    from hf_histo.training.trainer import HistoTrainer

    view = _patch_view(AugmentationSeed(0))
    model = tiny_model("vit")
    seen = []
    forward = model.forward
    model.forward = lambda pixel_values, **kw: seen.append(pixel_values) or forward(pixel_values=pixel_values, **kw)
    args = HistoTrainingArguments(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="no")
    trainer = HistoTrainer(model=model, args=args, train_dataset=view, data_collator=PatchCollator())
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(model.train(), batch)
    expected = trainer.batch_augment(batch["pixel_values"], batch["augment_params"])
    assert seen[-1].dtype == torch.float32 and torch.equal(seen[-1], expected)
    assert not torch.equal(expected, trainer.batch_augment(batch["pixel_values"]))  # the jitter was applied


@pytest.mark.slow
def test_recipe_trains_with_workers_through_its_main(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", n_train=12, n_test=2, size_range=(160, 240), seed=0)
    argv = ["--demo", "--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "2"]
    argv += ["--dataloader_num_workers", "2", "--image_size", "32", "--per_device_train_batch_size", "8"]
    argv += ["--n_bootstrap", "20", "--disable_tqdm", "true", "--cache_dir", str(tmp_path / "cache")]
    old = sys.argv
    sys.argv = [str(RECIPES_DIR / "phikon_frozen.py"), *argv]  # histo augmentation + CutMix, batch jitter
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = old
    assert (tmp_path / "out" / "metrics.json").is_file()
