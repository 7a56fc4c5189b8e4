"""Train/eval patch transforms from a backbone's image processor, histology augmentation, CutMix/MixUp batches."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.transforms import v2

AUGMENTATIONS = ("none", "flips", "histo")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What the backbone expects: a square input side and the normalisation statistics."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (part of the embedding-cache key)."""
        return asdict(self)


def input_spec(
    processor_or_size: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> InputSpec:
    """Read the input side and normalisation from an image processor, an `InputSpec` or a plain size.

    Args:
        processor_or_size: A transformers image processor (`size` as height/width, shortest_edge or a plain int;
            `crop_size` wins when the processor centre-crops), an `InputSpec`, or an int side.
        mean: Override of the processor's `image_mean`.
        std: Override of the processor's `image_std`.

    Returns:
        The `InputSpec`.
    """
    if isinstance(processor_or_size, InputSpec):
        spec = processor_or_size
        return InputSpec(spec.size, tuple(mean or spec.mean), tuple(std or spec.std))
    if isinstance(processor_or_size, int):
        return InputSpec(processor_or_size, tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD))
    processor = processor_or_size
    data_config = getattr(processor, "data_config", None)  # timm's TimmWrapperImageProcessor
    if isinstance(data_config, dict) and "input_size" in data_config:
        return InputSpec(
            int(data_config["input_size"][-1]),
            tuple(float(m) for m in (mean or data_config.get("mean", IMAGENET_MEAN))),
            tuple(float(s) for s in (std or data_config.get("std", IMAGENET_STD))),
        )
    size = _side(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    size = size or _side(getattr(processor, "size", None))
    if not size:
        raise ValueError(f"cannot read an input size from {type(processor).__name__}; pass an int size instead")
    mean = mean or getattr(processor, "image_mean", None) or IMAGENET_MEAN
    std = std or getattr(processor, "image_std", None) or IMAGENET_STD
    return InputSpec(int(size), tuple(float(m) for m in mean), tuple(float(s) for s in std))


def _side(size: Any) -> int | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size
    get = size.get if isinstance(size, dict) else lambda k, d=None: getattr(size, k, d)
    for key in ("height", "shortest_edge", "width", "longest_edge"):
        value = get(key, None)
        if value:
            return int(value)
    return None


def make_image_processor(processor_or_spec: Any) -> Any:
    """The image processor saved with a model and used by inference: the eval transform as a transformers processor.

    A `ViTImageProcessor` that resizes each patch to the backbone's square side and normalises it with its
    statistics (no centre crop, which ConvNeXt/timm processors would add), so the pipeline sees what training's
    evaluation saw.

    Args:
        processor_or_spec: The backbone's image processor, an `InputSpec` or an int side.
    """
    from transformers import ViTImageProcessor

    spec = input_spec(processor_or_spec)
    return ViTImageProcessor(
        do_resize=True,
        size={"height": spec.size, "width": spec.size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
    )


class HEDJitter(v2.Transform):
    """Stain augmentation in haematoxylin-eosin-DAB space (Tellez et al., 2018).

    RGB is turned into stain concentrations with the fixed Ruifrok-Johnston matrix (`skimage.color.rgb2hed`),
    each stain channel is scaled by `U(1 - sigma, 1 + sigma)` and shifted by `U(-bias, bias)`, and the result is
    turned back into RGB. Works on float images in [0, 1] (`[..., 3, H, W]`); randomness comes from torch's
    generator, so a seeded Trainer reproduces it.

    Args:
        sigma: Scale jitter of each stain channel.
        bias: Additive jitter of each stain channel.
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.05):
        super().__init__()
        from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

        if sigma < 0 or bias < 0:
            raise ValueError(f"HEDJitter: sigma and bias must be >= 0, got {sigma}, {bias}")
        self.sigma = float(sigma)
        self.bias = float(bias)
        self.register_buffer("hed_from_rgb", torch.tensor(hed_from_rgb, dtype=torch.float32), persistent=False)
        self.register_buffer("rgb_from_hed", torch.tensor(rgb_from_hed, dtype=torch.float32), persistent=False)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw one scale and one shift per stain channel for the whole sample."""
        alpha = 1.0 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.bias
        return {"alpha": alpha, "beta": beta}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the drawn stain jitter to an image tensor; other inputs pass through."""
        if not isinstance(inpt, torch.Tensor) or not inpt.is_floating_point():
            return inpt
        log_adjust = torch.log(torch.tensor(1e-6))
        rgb = inpt.movedim(-3, -1).clamp_min(1e-6)
        stains = (torch.log(rgb) / log_adjust) @ self.hed_from_rgb
        stains = stains * params["alpha"] + params["beta"]
        out = torch.exp((stains * log_adjust) @ self.rgb_from_hed).clamp(0, 1)
        return out.movedim(-1, -3).to(inpt.dtype)


class RandomRot90(v2.Transform):
    """Rotate by a random multiple of 90 degrees (tissue has no up; no interpolation, no border)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the number of quarter turns."""
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Rotate image tensors; other inputs pass through."""
        if not isinstance(inpt, torch.Tensor) or params["k"] == 0:
            return inpt
        return torch.rot90(inpt, params["k"], dims=(-2, -1))


def build_transforms(
    processor_or_size: Any,
    train: bool,
    augment: str = "histo",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_scale: tuple[float, float] = (0.6, 1.0),
    color_jitter: float = 0.1,
    hed_jitter: float = 0.05,
) -> v2.Compose:
    """Build the patch transform: PIL image -> normalised float tensor `[3, size, size]`.

    Args:
        processor_or_size: The backbone's image processor, an `InputSpec` or an input side (see `input_spec`).
        train: Training transform (random augmentation) or evaluation transform (deterministic resize).
        augment: `"none"` (resize only), `"flips"` (+ flips and 90-degree rotations) or `"histo"` (+ random
            resized crop, colour jitter and HED stain jitter). Ignored when `train` is False.
        mean: Normalisation mean override.
        std: Normalisation std override.
        crop_scale: Area range of `RandomResizedCrop` for `"histo"`.
        color_jitter: Brightness/contrast/saturation jitter (hue gets a fifth of it) for `"histo"`; 0 disables.
        hed_jitter: Sigma and bias of `HEDJitter` for `"histo"`; 0 disables.

    Returns:
        A `torchvision.transforms.v2.Compose`.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r} is not supported; choose one of {list(AUGMENTATIONS)}")
    spec = input_spec(processor_or_size, mean, std)
    size = (spec.size, spec.size)
    steps: list[v2.Transform] = [v2.ToImage()]
    if train and augment == "histo":
        steps.append(v2.RandomResizedCrop(size, scale=crop_scale, antialias=True))
    else:
        steps.append(v2.Resize(size, antialias=True))
    if train and augment in ("flips", "histo"):
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train and augment == "histo":
        if color_jitter > 0:
            steps.append(
                v2.ColorJitter(
                    brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=color_jitter / 5
                )
            )
        if hed_jitter > 0:
            steps.append(HEDJitter(sigma=hed_jitter, bias=hed_jitter))
    steps.append(v2.Normalize(mean=list(spec.mean), std=list(spec.std)))
    return v2.Compose(steps)


class AugmentationSeed:
    """Seeds each patch's augmentation from `(seed, epoch, image_id, patch_index)` instead of torch's global RNG.

    The draws then no longer depend on how many batches were loaded before, so a run resumed from a mid-epoch
    checkpoint (where Trainer skips the already-seen batches without loading them) augments every later patch
    exactly as the uninterrupted run did. `HistoTrainer` advances `epoch` at each epoch start.

    Args:
        seed: Base seed (the run's `--seed`).
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.epoch = 0

    def for_patch(self, image_id: Any, patch_index: Any) -> int:
        """The seed of one patch's augmentation in the current epoch."""
        key = f"{self.seed}:{self.epoch}:{image_id}:{patch_index}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def patch_transform_fn(
    transform: Callable,
    image_column: str = "image",
    label_column: str = "label",
    seed: AugmentationSeed | None = None,
) -> Callable:
    """Wrap a per-image transform for `datasets.Dataset.with_transform`.

    The returned function maps a batch of rows to `{"pixel_values": [...], "labels": [...]}`; only these two
    reach the model, while the dataset keeps its `image_id` / `foreground` columns for image-level metrics.

    Args:
        transform: PIL image -> tensor.
        image_column: Column holding the patch image.
        label_column: Column holding the class index.
        seed: Per-patch augmentation seeds (training); None uses torch's global RNG.
    """

    def apply(batch: dict[str, list]) -> dict[str, list]:
        images = batch[image_column]
        if seed is None or "image_id" not in batch:
            pixels = [transform(image.convert("RGB")) for image in images]
        else:
            indices = batch.get("patch_index") or range(len(images))
            pixels = []
            for image, image_id, index in zip(images, batch["image_id"], indices):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed.for_patch(image_id, index))
                    pixels.append(transform(image.convert("RGB")))
        out = {"pixel_values": pixels}
        if label_column in batch:
            out["labels"] = list(batch[label_column])
        return out

    apply.augmentation_seed = seed
    return apply


def build_batch_mixer(
    num_classes: int, cutmix_alpha: float = 0.0, mixup_alpha: float = 0.0, prob: float = 1.0
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """CutMix and/or MixUp on a batch (torchvision v2), applied with probability `prob`.

    Args:
        num_classes: Number of classes (the mixed labels are `[B, num_classes]` probabilities).
        cutmix_alpha: Beta parameter of CutMix; 0 disables it.
        mixup_alpha: Beta parameter of MixUp; 0 disables it.
        prob: Probability that a batch is mixed (one of the enabled methods chosen at random).

    Returns:
        `mix(pixel_values, labels) -> (pixel_values, labels)`, or None when both are disabled. Unmixed batches
        keep integer labels; the losses of `hf_histo.training.losses` accept both.
    """
    methods = []
    if cutmix_alpha > 0:
        methods.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if mixup_alpha > 0:
        methods.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if not methods:
        return None
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mix probability must be in (0, 1], got {prob}")
    mixer = methods[0] if len(methods) == 1 else v2.RandomChoice(methods)

    def mix(pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if prob < 1.0 and torch.rand(()) >= prob:
            return pixel_values, labels
        return mixer(pixel_values, labels)

    return mix


class PatchCollator:
    """Stack `pixel_values` and `labels` of a list of rows; optionally mix the batch (CutMix/MixUp).

    Args:
        mixer: From `build_batch_mixer`; applied only while `training` is True.
        input_name: Key of the model input (`"pixel_values"`, or `"embeddings"` for cached features).
    """

    def __init__(self, mixer: Callable | None = None, input_name: str = "pixel_values"):
        self.mixer = mixer
        self.input_name = input_name
        self.training = True

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate rows into a batch dict."""
        inputs = torch.stack([torch.as_tensor(row[self.input_name]) for row in rows])
        batch = {self.input_name: inputs}
        if rows and "labels" in rows[0]:
            labels = torch.as_tensor([int(row["labels"]) for row in rows], dtype=torch.long)
            if self.mixer is not None and self.training:
                inputs, labels = self.mixer(inputs, labels)
                batch[self.input_name] = inputs
            batch["labels"] = labels
        return batch
