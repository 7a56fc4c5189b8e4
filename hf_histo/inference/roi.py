"""Region-of-interest masks from a segmentation model: overlapping sliding windows with blended logits, any size."""

# Ships with classifier checkpoints that name an ROI model (the pipeline runs on it): numpy, PIL, torch,
# transformers and siblings, relatively. The segmentation folder itself ships its own model code (remote code).

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.masks import resolve_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows covering ``[0, length)``: one window when it fits, else steps of ``window * (1 - overlap)``."""
    if length <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    starts = list(range(0, length - window, step))
    return starts + [length - window]


def blend_weights(height: int, width: int) -> torch.Tensor:
    """A Gaussian importance map (sigma = side / 8, floor 1e-3): window centres count more than their borders."""

    def ramp(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-0.5 * (x / max(n / 8, 1.0)) ** 2)

    return (ramp(height)[:, None] * ramp(width)[None, :]).clamp_min(1e-3)


class RoiSegmenter:
    """Predict per-pixel classes of whole images with a semantic-segmentation model, window by window.

    Windows of ``window_size`` (clipped to the image) overlap by ``window_overlap``; each window's logits (upsampled
    to the window when the model predicts at a lower resolution, as SegFormer does) are weighted by a Gaussian map
    and averaged, so no seam shows and the image is never resized. An image that fits one window is one forward
    pass. Windows go through the model in batches.

    Args:
        model: A semantic-segmentation model returning ``logits`` (`HistoSegmentationModel`, or any
            `AutoModelForSemanticSegmentation`).
        image_processor: The processor saved with it; its ``image_mean``/``image_std``/``rescale_factor`` normalise
            the pixels (ImageNet statistics without one).
        window_size: Window side (default: ``model.config.window_size``, else 512).
        window_overlap: Overlap share in [0, 1) (default: ``model.config.window_overlap``, else 0.25).
        batch_size: Windows per forward pass.
        fill_holes: Fill the holes a predicted region encloses (binary models only; default:
            ``model.config.fill_holes``, else False).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: Any = None,
        *,
        window_size: int | None = None,
        window_overlap: float | None = None,
        batch_size: int = 8,
        fill_holes: bool | None = None,
    ):
        config = model.config
        self.model = model.eval()
        self.window = int(window_size or getattr(config, "window_size", None) or 512)
        overlap = getattr(config, "window_overlap", 0.25) if window_overlap is None else window_overlap
        self.overlap = float(overlap)
        if self.window < 1 or not 0 <= self.overlap < 1:
            raise ValueError(f"window_size must be >= 1 and window_overlap in [0, 1), got {self.window}, {overlap}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        mean = getattr(image_processor, "image_mean", None) or IMAGENET_MEAN
        std = getattr(image_processor, "image_std", None) or IMAGENET_STD
        normalize = getattr(image_processor, "do_normalize", True) is not False
        self.mean = torch.tensor(mean if normalize else (0.0, 0.0, 0.0), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std if normalize else (1.0, 1.0, 1.0), dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = float(getattr(image_processor, "rescale_factor", None) or 1 / 255)
        self.labels = [str(config.id2label[i]) for i in range(len(config.id2label))]
        self.binary = getattr(config, "mask_mode", "binary") == "binary" or len(self.labels) == 2
        fill = getattr(config, "fill_holes", False) if fill_holes is None else fill_holes
        self.fill_holes = bool(fill) and self.binary

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device | None = None, **kwargs: Any) -> RoiSegmenter:
        """Load a saved segmentation folder (or Hub repo id) with its image processor.

        Args:
            path: The folder written by ``recipes/roi_segmentation.py`` (or any semantic-segmentation checkpoint).
            device: Where the model runs (default: CUDA when available, else CPU).
            kwargs: `RoiSegmenter` arguments (``window_size``, ``window_overlap``, ``batch_size``).
        """
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        model = AutoModelForSemanticSegmentation.from_pretrained(str(path), trust_remote_code=True)
        try:
            processor = AutoImageProcessor.from_pretrained(str(path), trust_remote_code=True)
        except (OSError, ValueError):  # no preprocessor_config.json: ImageNet statistics
            processor = None
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model.to(device), processor, **kwargs)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    def _to_model(self, tiles: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() * self.scale
        x = (x - self.mean) / self.std
        return x.to(self.device, dtype=next(self.model.parameters()).dtype)

    @torch.inference_mode()
    def logits(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """Blended class logits of the whole image, ``(num_labels, height, width)`` float32 on the CPU."""
        array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"expected an RGB image (height, width, 3), got shape {array.shape}")
        height, width = array.shape[:2]
        tile_h, tile_w = min(self.window, height), min(self.window, width)
        boxes = [
            (y, x)
            for y in window_starts(height, self.window, self.overlap)
            for x in window_starts(width, self.window, self.overlap)
        ]
        weights = blend_weights(tile_h, tile_w) if len(boxes) > 1 else torch.ones(tile_h, tile_w)
        total = torch.zeros(len(self.labels), height, width)
        norm = torch.zeros(height, width)
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start : start + self.batch_size]
            tiles = np.stack([array[y : y + tile_h, x : x + tile_w] for y, x in chunk])
            out = self.model(pixel_values=self._to_model(tiles)).logits.float()
            if out.shape[-2:] != (tile_h, tile_w):
                out = F.interpolate(out, size=(tile_h, tile_w), mode="bilinear", align_corners=False)
            out = out.cpu()
            for (y, x), tile_logits in zip(chunk, out):
                total[:, y : y + tile_h, x : x + tile_w] += tile_logits * weights
                norm[y : y + tile_h, x : x + tile_w] += weights
        return total / norm

    def predict(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Class index per pixel, ``(height, width)`` uint8 (0 is the background), enclosed holes filled if set."""
        classes = self.logits(image).argmax(0).numpy().astype(np.uint8)
        if self.fill_holes:
            from scipy.ndimage import binary_fill_holes

            classes = binary_fill_holes(classes > 0).astype(np.uint8)
        return classes

    def roi_mask(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """The region of interest (every class but the background) as a boolean ``(height, width)`` array."""
        return self.predict(image) > 0


def mask_png(classes: np.ndarray, binary: bool) -> Image.Image:
    """A predicted mask as a PNG-ready image: 0/255 for a binary model, the class index otherwise."""
    values = (classes > 0).astype(np.uint8) * 255 if binary else classes.astype(np.uint8)
    return Image.fromarray(values, mode="L")


def count_windows(height: int, width: int, window: int, overlap: float) -> int:
    """Windows of ``window`` px at ``overlap`` covering a ``height`` x ``width`` image (for progress totals)."""
    return math.prod(len(window_starts(n, window, overlap)) for n in (height, width))


# `mask_source` of an image without a mask patched on the ROI model's region, and when that region is empty.
ROI_SOURCE = "roi_model"
EMPTY_ROI_SOURCE = "empty_roi_tissue"


def load_roi(
    roi_model: str | os.PathLike | RoiSegmenter | bool | None,
    config: Any = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> RoiSegmenter | None:
    """The ROI segmenter an inference entry point uses for images without a mask.

    Args:
        roi_model: A `RoiSegmenter`; a segmentation folder or Hub repo id to load; None (or True): the classifier
            config's ``roi_model``, if any; False: none (tissue detection).
        config: The classifier's config. A relative ``roi_model`` folder that is not found from the working
            directory is looked up in the classifier's own folder (``config.name_or_path``) too.
        device: Where the segmentation model runs (default: CUDA when available, else CPU).
        kwargs: `RoiSegmenter` arguments (``window_size``, ``window_overlap``, ``batch_size``).
    """
    if roi_model is None or roi_model is True:
        roi_model = getattr(config, "roi_model", None)
    if roi_model is None or roi_model is False:
        return None
    if not isinstance(roi_model, (str, os.PathLike)):  # a loaded segmenter (this module's, or another copy's)
        return roi_model
    path = os.fspath(roi_model)
    base = getattr(config, "name_or_path", None) or ""
    if not os.path.isabs(path) and not os.path.exists(path) and base and os.path.isdir(os.path.join(base, path)):
        path = os.path.join(base, path)
    return RoiSegmenter.from_pretrained(path, device=device, **kwargs)


def resolve_roi_mask(
    roi: RoiSegmenter | None,
    image: Image.Image,
    mask: Any,
    empty_fallback: str = "tissue",
    resize: bool = False,
    image_path: str | None = None,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, str]:
    """`resolve_mask`, with an ROI model's region in place of tissue detection for an image without a mask.

    A given mask always wins (``resolve_mask``'s sources). Without one, the region ``roi`` predicts (source
    ``"roi_model"``); when it predicts none, detected tissue (``"empty_roi_tissue"``; ``"whole"`` when there is
    none either). Without ``roi``: ``resolve_mask`` (tissue detection, ``"tissue"``).
    """
    if mask is None and roi is not None:
        region = roi.roi_mask(image)
        if region.any():
            return region, ROI_SOURCE
        tissue, source = resolve_mask(image, None, empty_fallback, image_path=image_path, max_pixels=max_pixels)
        return tissue, EMPTY_ROI_SOURCE if source == "tissue" else source
    return resolve_mask(image, mask, empty_fallback, resize=resize, image_path=image_path, max_pixels=max_pixels)
