"""Geometry on the batch (GPU runs): the same crops, flips and turns as per patch, through the loader and a Trainer."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.functional import interpolate

from hf_histo.data.augmentation import N_GEOMETRY_PARAMS, N_JITTER_PARAMS, PatchAugment, batch_geometry
from hf_histo.data.builder import load_patch_dataset
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.synthetic import make_synthetic_dataset
from hf_histo.data.transforms import AugmentationSeed, PatchCollator, patch_transform_fn
from hf_histo.training.arguments import DataArguments, HistoTrainingArguments, ModelArguments
from hf_histo.training.run import build_model, with_patch_transforms
from hf_histo.training.trainer import HistoTrainer


def _batch_augment(view: datasets.Dataset):
    """The `BatchAugment` a `with_transform` view carries (what `HistoTrainer` applies to its batches)."""
    return view.format["format_kwargs"]["transform"].batch_augment


def _smooth_patch(side: int = 40, seed: int = 0) -> torch.Tensor:
    """A uint8 `[3, side, side]` patch without single-pixel detail (so resampling differences stay small).

    Values stay in [20, 235], as in stained tissue: near 0 the optical density of HED jitter turns a rounding
    difference (uint8 per patch, float on the batch) into a large one.
    """
    coarse = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    smooth = interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)
    return (20 + smooth[0] * 215).round().to(torch.uint8)


@pytest.mark.parametrize("augment", ["histo", "flips"])
@pytest.mark.parametrize("size", [64, 40, 16])  # upscaled crops, same size, shrunk (antialiased) crops
def test_geometry_on_the_batch_equals_the_per_patch_geometry(augment, size):
    """Same seeds: the same draws, and pixels within uint8 rounding inside the crop (the border differs slightly)."""
    patches = [_smooth_patch(seed=i) for i in range(4)]
    per_patch = PatchAugment(size, augment, crop_scale=(0.3, 1.0))
    on_batch = PatchAugment(size, augment, crop_scale=(0.3, 1.0), geometry_on_batch=True)
    expected, raw, params = [], [], []
    for i in range(48):
        a, jitter = per_patch(patches[i % 4], torch.Generator().manual_seed(i))
        b, row = on_batch(patches[i % 4], torch.Generator().manual_seed(i))
        assert b is patches[i % 4]  # left as stored: the worker only decodes
        assert len(row) == N_GEOMETRY_PARAMS + (N_JITTER_PARAMS if augment == "histo" else 0)
        assert jitter is None or torch.equal(jitter, row[N_GEOMETRY_PARAMS:])
        expected.append(a.float())
        raw.append(b)
        params.append(row)
    geometry = torch.stack(params)[:, :N_GEOMETRY_PARAMS]
    assert {int(k) for k in geometry[:, 6]} == {0, 1, 2, 3} and set(geometry[:, 4].tolist()) == {0.0, 1.0}
    out = batch_geometry(torch.stack(raw).float(), geometry, size)
    diff = (out - torch.stack(expected)).abs()
    assert out.shape == (48, 3, size, size)
    assert diff[..., 2:-2, 2:-2].max() <= 1.01 and diff.mean() < 1.0


def test_a_wrong_turn_or_flip_would_be_caught():
    """The comparison above is sharp: the batch result of a turned patch is far from the unturned one."""
    patch = _smooth_patch()
    turned = batch_geometry(patch[None].float(), torch.tensor([[0, 0, 40, 40, 0, 0, 1.0]]), 40)[0]
    torch.testing.assert_close(turned, torch.rot90(patch.float(), 1, dims=(-2, -1)), atol=1e-3, rtol=0)
    assert (turned - patch.float()).abs().mean() > 10


def _view(geometry_on_batch: bool):
    images = [Image.fromarray(_smooth_patch(48, i).permute(1, 2, 0).numpy()) for i in range(8)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 2 for i in range(8)], "image_id": [f"im{i // 2}" for i in range(8)]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Value("int64"), "image_id": datasets.Value("string")}
        ),
    )
    augment = PatchAugment(32, "histo", geometry_on_batch=geometry_on_batch)
    return ds.with_transform(patch_transform_fn(augment, seed=AugmentationSeed(5))), augment


def test_the_loader_then_the_batch_half_gives_the_per_patch_batches():
    batches = {}
    for on_batch in (False, True):
        view, augment = _view(on_batch)
        batch = next(iter(torch.utils.data.DataLoader(view, batch_size=8, collate_fn=PatchCollator())))
        side = 48 if on_batch else 32
        assert batch["pixel_values"].shape == (8, 3, side, side) and batch["pixel_values"].dtype == torch.uint8
        batches[on_batch] = augment.batch_augment()(batch["pixel_values"], batch["augment_params"])
    assert batches[True].shape == batches[False].shape == (8, 3, 32, 32)
    std = torch.tensor(PatchAugment(32).std).view(1, 3, 1, 1)
    diff = ((batches[True] - batches[False]) * std * 255).abs()  # in uint8 steps
    # The per-patch path rounds to uint8 before the jitter, which scales that rounding by up to ~3x.
    assert diff[..., 2:-2, 2:-2].max() <= 5 and diff.mean() < 0.6


def test_the_collator_stacks_decoded_patches_and_names_mixed_sizes():
    views = [torch.from_numpy(np.full((6, 5, 3), i, dtype=np.uint8)).permute(2, 0, 1) for i in range(3)]
    batch = PatchCollator()([{"pixel_values": v, "labels": 0} for v in views])["pixel_values"]
    assert torch.equal(batch, torch.stack([v.contiguous() for v in views]))
    assert batch.is_contiguous(memory_format=torch.channels_last)
    odd = torch.zeros(3, 7, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match="different sizes.*grid or topk"):
        PatchCollator()([{"pixel_values": views[0], "labels": 0}, {"pixel_values": odd, "labels": 1}])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry")
    data_dir = make_synthetic_dataset(root / "data", n_train=8, n_test=0, size_range=(130, 160), seed=1)
    patching = PatchingConfig(strategy="grid", patch_size=64, min_foreground=200)
    return data_dir, load_patch_dataset(data_dir, patching, val_fraction=0.25, cache_dir=root / "cache")


@pytest.mark.parametrize(
    ("device", "strategy", "on_batch"),
    [("cuda", "grid", True), ("cuda", "topk", True), ("cuda", "components", False), ("cpu", "grid", False)],
)
def test_geometry_moves_to_the_batch_only_on_a_gpu_with_one_patch_size(tiny, device, strategy, on_batch):
    data_dir, data = tiny
    data_args = DataArguments(data_dir=str(data_dir), patch_size=64, augment="histo", strategy=strategy)
    _, processor = build_model(ModelArguments(model_name_or_path="tiny-vit"), ["a", "b"])
    train, _ = with_patch_transforms(data, processor, data_args, device=torch.device(device))
    size = train[0]["pixel_values"].shape[-1]
    assert (size == 64, _batch_augment(train).geometry_size is not None) == (on_batch, on_batch)


def test_a_trainer_trains_on_batches_whose_geometry_is_on_the_batch(tiny, tmp_path):
    """The GPU placement, run on the CPU: the model gets normalised float batches at its input size."""
    data_dir, data = tiny
    data_args = DataArguments(data_dir=str(data_dir), patch_size=64, augment="histo")
    model, processor = build_model(
        ModelArguments(model_name_or_path="tiny-vit"), data["train"].features["label"].names
    )
    train, evaluation = with_patch_transforms(data, processor, data_args, device="cuda")
    assert _batch_augment(train).geometry_size is not None
    args = HistoTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, num_train_epochs=3, learning_rate=3e-3,
        dataloader_num_workers=0, disable_tqdm=True, eval_strategy="no", save_strategy="no", logging_steps=1,
        report_to=[], seed=0,
    )  # fmt: skip
    seen = []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True)
    trainer = HistoTrainer(model=model, args=args, train_dataset=train, data_collator=PatchCollator())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    size = processor.size["height"]
    assert size != 64 and {tuple(x.shape[1:]) for x in seen} == {(3, size, size)}
    assert all(x.is_floating_point() and -5 < float(x.mean()) < 5 for x in seen)
    assert len(losses) >= 3 and all(np.isfinite(losses))
