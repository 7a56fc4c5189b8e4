"""ROI segmentation data: arguments, image+mask pairs of any layout, and random training crops with augmentation."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from ..data.images import DataError, load_rgb
from ..data.masks import load_class_mask, load_mask
from ..data.samples import Sample
from ..data.sources import read_samples

logger = logging.getLogger(__name__)


@dataclass
class SegmentationArguments:
    """What `recipes/roi_segmentation.py` trains on and how (next to transformers' `TrainingArguments`)."""

    data_dir: str | None = field(default=None, metadata={"help": "Data folder of any layout (images + masks)."})
    layout: str | None = field(default=None, metadata={"help": "Force a layout (detected by default)."})
    masks: str | None = field(default=None, metadata={"help": "A folder of masks named like the images."})
    exclude: str | None = field(default=None, metadata={"help": "Image ids to leave out, one per line."})
    demo: bool = field(default=False, metadata={"help": "Generate H&E-like data with known masks and train on it."})
    mask_mode: str = field(
        default="binary",
        metadata={
            "help": "binary: any non-zero value is ROI; multiclass: mask values are class indices (0 background)."
        },
    )
    classes: str | None = field(
        default=None, metadata={"help": "multiclass: class names, background first, comma-separated."}
    )
    ignore_index: int = field(default=255, metadata={"help": "multiclass: mask value of unannotated pixels."})
    architecture: str = field(
        default="unet", metadata={"help": "unet, unetplusplus, fpn, deeplabv3plus or segformer."}
    )
    encoder_name: str = field(
        default="resnet18", metadata={"help": "smp/timm encoder (e.g. resnet34, tu-convnext_tiny)."}
    )
    encoder_weights: str | None = field(
        default=None,
        metadata={"help": "Pretrained encoder: 'imagenet' (smp), or a SegFormer repo id such as nvidia/mit-b0."},
    )
    encoder_depth: int = field(default=5, metadata={"help": "Encoder stages (3-5)."})
    decoder_channels: str = field(default="128,64,32,16,8", metadata={"help": "Decoder channels, coarse to fine."})
    crop_size: int = field(default=256, metadata={"help": "Side of the random training crops (full resolution)."})
    crops_per_image: int = field(default=6, metadata={"help": "Random crops per training image per epoch."})
    dice_weight: float = field(
        default=1.0, metadata={"help": "Weight of the soft Dice loss added to the CE (0: CE only)."}
    )
    class_weighting: bool = field(
        default=True, metadata={"help": "Weight the CE by median-frequency class balancing."}
    )
    color_jitter: float = field(
        default=0.1, metadata={"help": "Brightness/contrast/saturation jitter (hue: a quarter)."}
    )
    val_fraction: float = field(default=0.2, metadata={"help": "Share of patients for validation (0: train on all)."})
    n_folds: int | None = field(default=None, metadata={"help": "Patient-grouped k-fold cross-validation."})
    fold: int | None = field(default=None, metadata={"help": "With --n_folds: train only this fold."})
    window_size: int = field(default=512, metadata={"help": "Sliding-window side at inference."})
    window_overlap: float = field(default=0.25, metadata={"help": "Sliding-window overlap share at inference."})
    fill_holes: bool = field(
        default=True, metadata={"help": "binary: fill holes enclosed by a predicted region (saved in the config)."}
    )
    max_image_pixels: int | None = field(default=None, metadata={"help": "Raise PIL's decompression-bomb limit."})
    n_plot: int = field(default=4, metadata={"help": "Validation images in the predicted-vs-true plot."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a finished run in --output_dir (an unfinished one resumes)."}
    )

    def __post_init__(self):
        if self.data_dir is None and not self.demo:
            raise ValueError("--data_dir is required (or pass --demo to generate sample data)")
        if self.mask_mode not in ("binary", "multiclass"):
            raise ValueError(f"--mask_mode must be binary or multiclass, got {self.mask_mode!r}")
        if self.mask_mode == "multiclass" and not self.classes:
            raise ValueError("--mask_mode multiclass needs --classes background,class1,... (background first)")
        if self.crop_size < 32 or self.crops_per_image < 1:
            raise ValueError("--crop_size must be >= 32 and --crops_per_image >= 1")

    @property
    def labels(self) -> list[str]:
        """Class names, background first."""
        if self.mask_mode == "binary":
            return ["background", "roi"]
        names = [c.strip() for c in self.classes.split(",") if c.strip()]
        if len(names) < 2:
            raise ValueError(f"--classes needs at least two names (background first), got {self.classes!r}")
        return names


def segmentation_samples(args: SegmentationArguments) -> list[Sample]:
    """The images that have a mask, read from any layout; unlabelled images get one placeholder label for splitting."""
    samples = read_samples(args.data_dir, layout=args.layout, masks=args.masks, exclude=args.exclude).samples
    with_mask = [s for s in samples if s.mask_path is not None]
    if not with_mask:
        raise DataError(
            f"{args.data_dir}: no image has a mask; segmentation trains on image+mask pairs "
            "(put masks in masks/ named like the images, or pass --masks DIR)."
        )
    if len(with_mask) < len(samples):
        logger.warning("%d of %d images have no mask and are not used", len(samples) - len(with_mask), len(samples))
    return [s if s.label else dataclasses.replace(s, label="unlabelled") for s in with_mask]


def load_pair(sample: Sample, args: SegmentationArguments) -> tuple[np.ndarray, np.ndarray]:
    """An image as uint8 RGB ``(H, W, 3)`` and its target as uint8 class indices (``ignore_index`` unannotated)."""
    image = load_rgb(sample.image_path, args.max_image_pixels)
    if args.mask_mode == "binary":
        target = load_mask(sample.mask_path, image.size, image_path=sample.image_path).astype(np.uint8)
    else:
        target = load_class_mask(
            sample.mask_path, image.size, len(args.labels), args.ignore_index, sample.image_path, args.max_image_pixels
        )
    return np.asarray(image, dtype=np.uint8), target


def class_weights(targets: list[np.ndarray], num_labels: int, ignore_index: int) -> torch.Tensor:
    """Median-frequency balancing (Eigen & Fergus, 2015): ``median(freq) / freq_c``; an absent class gets 1."""
    counts = np.zeros(num_labels, dtype=np.float64)
    for target in targets:
        counts += np.bincount(target[target != ignore_index].ravel(), minlength=num_labels)[:num_labels]
    freq = counts / max(counts.sum(), 1.0)
    present = freq > 0
    weights = np.ones(num_labels)
    weights[present] = np.median(freq[present]) / freq[present]
    return torch.tensor(weights, dtype=torch.float32)


class RandomCrops(torch.utils.data.Dataset):
    """Random full-resolution crops of image+mask pairs: quarter turns, flips and colour jitter, normalised.

    Each epoch draws ``crops_per_image`` crops per image; an image smaller than a crop is padded (white image,
    ``ignore_index`` target). Randomness comes from torch's generator, which the Trainer seeds (per worker too).

    Args:
        pairs: ``(image uint8 (H, W, 3), target uint8 (H, W))`` pairs.
        crop_size: Crop side in pixels.
        crops_per_image: Crops per image per epoch.
        mean: Normalisation mean (RGB, 0-1).
        std: Normalisation std.
        jitter: Colour jitter strength (0: none).
        ignore_index: Target value of padding.
    """

    def __init__(
        self,
        pairs: list[tuple[np.ndarray, np.ndarray]],
        crop_size: int,
        crops_per_image: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        jitter: float = 0.1,
        ignore_index: int = 255,
    ):
        self.pairs = [self._padded(image, target, crop_size, ignore_index) for image, target in pairs]
        self.crop, self.crops_per_image = int(crop_size), int(crops_per_image)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.jitter = v2.ColorJitter(jitter, jitter, jitter, jitter / 4) if jitter > 0 else None

    @staticmethod
    def _padded(image: np.ndarray, target: np.ndarray, crop: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
        pad_h, pad_w = max(0, crop - target.shape[0]), max(0, crop - target.shape[1])
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=255)
            target = np.pad(target, ((0, pad_h), (0, pad_w)), constant_values=ignore_index)
        return image, target

    def __len__(self) -> int:
        return len(self.pairs) * self.crops_per_image

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, target = self.pairs[index % len(self.pairs)]
        height, width = target.shape
        y = int(torch.randint(0, height - self.crop + 1, ()))
        x = int(torch.randint(0, width - self.crop + 1, ()))
        pixels = torch.from_numpy(np.ascontiguousarray(image[y : y + self.crop, x : x + self.crop])).permute(2, 0, 1)
        labels = torch.from_numpy(np.ascontiguousarray(target[y : y + self.crop, x : x + self.crop])).long()
        turns = int(torch.randint(0, 4, ()))
        pixels, labels = torch.rot90(pixels, turns, (1, 2)), torch.rot90(labels, turns, (0, 1))
        if torch.rand(()) < 0.5:
            pixels, labels = pixels.flip(2), labels.flip(1)
        pixels = pixels.float() / 255.0
        if self.jitter is not None:
            pixels = self.jitter(pixels).clamp(0, 1)
        return {"pixel_values": (pixels - self.mean) / self.std, "labels": labels.contiguous()}


def data_folder(args: SegmentationArguments, output_dir: str) -> str:
    """The data folder to read: ``data_dir``, or demo data generated once under ``output_dir/demo_data``."""
    if not args.demo or args.data_dir:
        return args.data_dir
    from ..data.synthetic import make_synthetic_dataset

    folder = Path(output_dir) / "demo_data"
    if not (folder / "train_labels.csv").exists():
        make_synthetic_dataset(folder, n_train=24, n_test=0, size_range=(192, 320))
    return str(folder)
