"""Tests of patch transforms: processor-derived input specs, deterministic eval, saved processor, augmentations."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ConvNextImageProcessor, ViTImageProcessor

from hf_histo.data.transforms import (
    HEDJitter,
    InputSpec,
    PatchCollator,
    RandomRot90,
    build_batch_mixer,
    build_transforms,
    input_spec,
    make_image_processor,
    patch_transform_fn,
)


def _image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "source, expected",
    [
        (
            ViTImageProcessor(size={"height": 96, "width": 96}, image_mean=[0.5] * 3, image_std=[0.25] * 3),
            InputSpec(96, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        ),
        (
            ConvNextImageProcessor(size={"shortest_edge": 224}, image_mean=[0.4] * 3, image_std=[0.2] * 3),
            InputSpec(224, (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)),
        ),
        (64, InputSpec(64)),
        (InputSpec(32, (0.1, 0.2, 0.3), (1.0, 1.0, 1.0)), InputSpec(32, (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))),
    ],
)
def test_input_spec_reads_size_mean_std(source, expected):
    spec = input_spec(source)
    assert spec.size == expected.size
    np.testing.assert_allclose(spec.mean, expected.mean)
    np.testing.assert_allclose(spec.std, expected.std)


def test_eval_transform_is_deterministic_resize_and_normalise():
    spec = InputSpec(32, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    transform = build_transforms(spec, train=False)
    image = Image.new("RGB", (50, 70), (255, 128, 0))
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (torch.tensor([1.0, 128 / 255, 0.0]) - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    torch.testing.assert_close(out[:, 5, 7], expected, atol=1e-5, rtol=0)
    noisy = _image(1)
    torch.testing.assert_close(transform(noisy), transform(noisy))  # no randomness at evaluation
    torch.manual_seed(0)
    first = build_transforms(spec, train=True, augment="none")(noisy)
    torch.testing.assert_close(first, transform(noisy))  # augment="none" trains on the eval view


@pytest.mark.parametrize(
    "source",
    [
        48,
        InputSpec(40, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)),
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3),
    ],
)
def test_make_image_processor_is_the_eval_transform(source):
    processor = make_image_processor(source)
    spec = input_spec(source)
    assert processor.size == {"height": spec.size, "width": spec.size}
    patch = _image(5, (70, 52))
    ours = processor(images=[patch], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours, build_transforms(source, train=False)(patch), atol=1e-4, rtol=0)
    assert make_image_processor(processor).to_dict() == processor.to_dict()  # saving it again changes nothing


def test_train_transform_is_random_but_seeded():
    transform = build_transforms(32, train=True, augment="histo")
    image = _image(2)
    torch.manual_seed(3)
    a = transform(image)
    torch.manual_seed(3)
    b = transform(image)
    c = transform(image)
    assert a.shape == (3, 32, 32)
    torch.testing.assert_close(a, b)
    assert not torch.equal(b, c)


def test_flips_and_rotations_only_permute_pixels():
    image = _image(4, (32, 32))
    eval_view = build_transforms(32, train=False)(image)
    for seed in range(6):
        torch.manual_seed(seed)
        view = build_transforms(32, train=True, augment="flips")(image)
        torch.testing.assert_close(view.flatten().sort().values, eval_view.flatten().sort().values)
    rot = RandomRot90()
    x = torch.arange(16.0).reshape(1, 4, 4)
    assert {tuple(rot(x).flatten().tolist()) for _ in range(40)} == {
        tuple(torch.rot90(x, k, dims=(-2, -1)).flatten().tolist()) for k in range(4)
    }


def test_hed_jitter_identity_without_jitter_and_bounded_with_it():
    x = torch.rand(3, 16, 16) * 0.8 + 0.1
    torch.testing.assert_close(HEDJitter(sigma=0.0, bias=0.0)(x), x, atol=2e-3, rtol=0)
    torch.manual_seed(0)
    y = HEDJitter(sigma=0.2, bias=0.1)(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="sigma and bias"):
        HEDJitter(sigma=-1)


def test_unknown_augmentation_is_rejected():
    with pytest.raises(ValueError, match="augment='color'"):
        build_transforms(32, train=True, augment="color")


def test_batch_mixer_returns_soft_targets_and_none_when_disabled():
    assert build_batch_mixer(4) is None
    torch.manual_seed(0)
    mix = build_batch_mixer(4, cutmix_alpha=1.0, mixup_alpha=0.2)
    x = torch.rand(6, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    mixed_x, soft = mix(x, y)
    assert mixed_x.shape == x.shape and soft.shape == (6, 4)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(6))
    never = build_batch_mixer(4, cutmix_alpha=1.0, prob=1e-9)
    same_x, same_y = never(x, y)
    assert same_x is x and same_y is y
    with pytest.raises(ValueError, match="mix probability"):
        build_batch_mixer(4, mixup_alpha=1.0, prob=0.0)


def test_collator_and_dataset_transform():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"image": [_image(i) for i in range(3)], "label": [0, 1, 1], "image_id": ["a", "a", "b"]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Value("int64"), "image_id": datasets.Value("string")}
        ),
    )
    view = ds.with_transform(patch_transform_fn(build_transforms(16, train=False)))
    batch = PatchCollator()([view[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["labels"].tolist() == [0, 1, 1]
    assert list(view.with_format(None)["image_id"]) == ["a", "a", "b"]
