"""Train/eval patch transforms from a backbone's image processor, histology augmentation, CutMix/MixUp batches."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from .augmentation import AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, HEDJitter, PatchAugment, RandomRot90

__all__ = [
    "AUGMENTATIONS",
    "AugmentationSeed",
    "HEDJitter",
    "InputSpec",
    "PatchAugment",
    "PatchCollator",
    "RandomRot90",
    "build_batch_mixer",
    "build_patch_augment",
    "build_transforms",
    "input_spec",
    "make_image_processor",
    "patch_transform_fn",
    "to_uint8_tensor",
]


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
    """Build the per-patch transform: PIL image -> normalised float tensor `[3, size, size]`, all on the CPU.

    The evaluation transform, and the reference of the training augmentation: training runs its equal
    `build_patch_augment` (geometric ops per patch, colour and stain jitter on the batch), which draws from the
    same distributions.

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


def build_patch_augment(
    processor_or_size: Any,
    augment: str = "histo",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_scale: tuple[float, float] = (0.6, 1.0),
    color_jitter: float = 0.1,
    hed_jitter: float = 0.05,
    geometry_on_batch: bool = False,
) -> PatchAugment:
    """The training augmentation of `build_transforms(..., train=True)` split for speed: a `PatchAugment`.

    Per patch (DataLoader workers): decode, crop/resize, flips and quarter turns on uint8; per batch, on the
    training device (its `batch_augment()`, which `HistoTrainer` applies): colour and HED jitter, normalisation.
    With `geometry_on_batch` (for GPU runs) the crop/resize, flips and turns move to the batch too. The other
    arguments are `build_transforms`'.
    """
    spec = input_spec(processor_or_size, mean, std)
    return PatchAugment(
        spec.size, augment, spec.mean, spec.std, crop_scale, color_jitter, hed_jitter, geometry_on_batch
    )


class AugmentationSeed:
    """Seeds each patch's augmentation from `(seed, epoch, image_id, patch_index)` instead of torch's global RNG.

    The draws then no longer depend on how many batches were loaded before nor on which DataLoader worker loads
    a patch, so a run resumed from a mid-epoch checkpoint (where Trainer skips the already-seen batches without
    loading them) augments every later patch exactly as the uninterrupted run did. `HistoTrainer` advances `epoch`
    at each epoch start; the epoch lives in shared memory, so persistent DataLoader workers see it change.

    Args:
        seed: Base seed (the run's `--seed`).
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch being trained."""
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(int(value))

    def for_patch(self, image_id: Any, patch_index: Any) -> int:
        """The seed of one patch's augmentation in the current epoch."""
        key = f"{self.seed}:{self.epoch}:{image_id}:{patch_index}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF

    def generator(self, image_id: Any, patch_index: Any) -> torch.Generator:
        """A CPU `torch.Generator` seeded for one patch in the current epoch."""
        return torch.Generator().manual_seed(self.for_patch(image_id, patch_index))


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """A decoded patch as a uint8 `[3, H, W]` tensor (RGB): a channels-last view of the pixels, no copy."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def patch_transform_fn(
    transform: Callable,
    image_column: str = "image",
    label_column: str = "label",
    seed: AugmentationSeed | None = None,
) -> Callable:
    """Wrap a per-patch transform for `datasets.Dataset.with_transform`.

    The returned function maps a batch of rows to `{"pixel_values": [...], "labels": [...]}`; only these reach the
    model, while the dataset keeps its `image_id` / `foreground` columns for image-level metrics. With a
    `PatchAugment` (training), `pixel_values` are uint8 and rows also carry `augment_params` (colour/stain jitter
    parameters) when it jitters; the function's `batch_augment` attribute is then the `BatchAugment` that
    `HistoTrainer` applies to each collated batch on the training device.

    Args:
        transform: A `PatchAugment`, or any PIL image -> tensor callable (e.g. `build_transforms`).
        image_column: Column holding the patch image.
        label_column: Column holding the class index.
        seed: Per-patch augmentation seeds (with a `PatchAugment`); None draws from torch's global RNG.
    """
    augment = transform if isinstance(transform, PatchAugment) else None
    if seed is not None and augment is None:
        raise TypeError(f"seed= needs a PatchAugment transform (it draws from a generator), got {type(transform)}")

    def apply(batch: dict[str, list]) -> dict[str, list]:
        images = batch[image_column]
        if augment is None:
            out: dict[str, list] = {"pixel_values": [transform(image.convert("RGB")) for image in images]}
        else:
            ids = batch.get("image_id") if seed is not None else None
            indices = batch.get("patch_index") or range(len(images))
            drawn = [
                augment(to_uint8_tensor(image), None if ids is None else seed.generator(ids[i], indices[i]))
                for i, image in enumerate(images)
            ]
            out = {"pixel_values": [patch for patch, _ in drawn]}
            if augment.batch_params:
                out["augment_params"] = [params for _, params in drawn]
        if label_column in batch:
            out["labels"] = list(batch[label_column])
        return out

    apply.augmentation_seed = seed
    apply.batch_augment = None if augment is None else augment.batch_augment()
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


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.stack`, with channels-last `[3, H, W]` views (patches as decoded) stacked as one `[B, H, W, 3]` copy.

    The result is then a channels-last `[B, 3, H, W]` view: the copy stays a memcpy instead of a strided gather.
    """
    first = tensors[0] if tensors else None
    if first is not None and first.dim() == 3 and all(t.shape == first.shape for t in tensors):
        channels_last = [t.permute(1, 2, 0) for t in tensors]
        if all(t.is_contiguous() for t in channels_last):
            return torch.stack(channels_last).permute(0, 3, 1, 2)
    shapes = sorted({tuple(t.shape) for t in tensors})
    if len(shapes) > 1:
        raise ValueError(
            f"patches of different sizes in one batch ({shapes[:3]}): with the crop and resize on the batch "
            "(geometry_on_batch), use one patch size (the grid or topk strategy) or geometry_on_batch=False"
        )
    return torch.stack(tensors)


class PatchCollator:
    """Stack `pixel_values`, `labels` and `augment_params` of a list of rows; optionally mix the batch (CutMix/MixUp).

    Args:
        mixer: From `build_batch_mixer`; applied only while `training` is True, to float inputs (uint8 training
            batches of a `PatchAugment` are mixed after their `BatchAugment`: pass the mixer to `HistoTrainer`).
        input_name: Key of the model input (`"pixel_values"`, or `"embeddings"` for cached features).
    """

    def __init__(self, mixer: Callable | None = None, input_name: str = "pixel_values"):
        self.mixer = mixer
        self.input_name = input_name
        self.training = True

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate rows into a batch dict."""
        inputs = _stack([torch.as_tensor(row[self.input_name]) for row in rows])
        batch = {self.input_name: inputs}
        if rows and rows[0].get("augment_params") is not None:
            batch["augment_params"] = torch.stack([row["augment_params"] for row in rows])
        if rows and "labels" in rows[0]:
            labels = torch.as_tensor([int(row["labels"]) for row in rows], dtype=torch.long)
            if self.mixer is not None and self.training:
                if not inputs.is_floating_point():
                    raise ValueError("PatchCollator(mixer=...) got uint8 patches: pass the mixer to HistoTrainer")
                inputs, labels = self.mixer(inputs, labels)
                batch[self.input_name] = inputs
            batch["labels"] = labels
        return batch
