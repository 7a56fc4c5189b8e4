"""Feeding the model: images read ahead by threads; an image processor's resize and normalisation as tensor ops."""

# Ships with checkpoints next to engine.py: stdlib, numpy and torch only (no torchvision: the resize is the torch
# kernel torchvision calls).

from __future__ import annotations

import platform
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# torchvision resizes uint8 images natively on these CPUs and through float32 (then rounds) elsewhere; the tensor
# path does the same, so its patches equal the torchvision image processor's and training's evaluation transform's.
_NATIVE_UINT8_RESIZE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
    "aarch64",
    "arm64",
)
_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, transformers' default `resample`


def read_ahead(
    function: Callable[[Any], Any], items: Iterable[Any], workers: int, ahead: Callable[[], int] | None = None
) -> Iterator[Any]:
    """``function(item)`` of each item, in order, computed by ``workers`` threads ahead of the caller.

    ``ahead()`` (asked after each submission; default ``workers``) is how many more items than the one handed over
    may be submitted. With ``workers=0`` each item is computed in the calling thread when it is asked for (nothing is
    read ahead). An exception raised by ``function`` is raised at its item's place.
    """
    if workers <= 0:
        yield from map(function, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="hf_histo-read-ahead")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            while len(pending) > max(workers, ahead() if ahead else 0):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class PixelTransform:
    """An image processor's resize, rescale and normalisation as tensor ops on a stack of uint8 patches.

    The numbers are those of transformers' torchvision `ViTImageProcessor` and of training's evaluation transform:
    a bilinear, antialiased resize of the uint8 pixels, then ``(x - mean / rescale) / (std / rescale)`` in float32.
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale_factor: float

    @classmethod
    def of(cls, processor: Any) -> PixelTransform | None:
        """The transform of a ViT image processor (resize to height x width, bilinear, no crop); None otherwise."""
        size = getattr(processor, "size", None)
        side = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
        resample = getattr(processor, "resample", None)
        try:
            bilinear = resample is None or int(resample) == _BILINEAR
        except (TypeError, ValueError):  # a torchvision InterpolationMode: the processor itself is called
            bilinear = False
        wanted = ("do_resize", "do_rescale", "do_normalize", "rescale_factor", "image_mean", "image_std")
        if not (
            type(processor).__name__.startswith("ViTImageProcessor")
            and all(getattr(processor, name, None) for name in wanted)
            and size is not None
            and side("height")
            and side("width")
            and bilinear
            and not getattr(processor, "do_center_crop", None)
            and not getattr(processor, "do_pad", None)
        ):
            return None
        return cls(
            (int(side("height")), int(side("width"))),
            tuple(float(m) for m in processor.image_mean),
            tuple(float(s) for s in processor.image_std),
            float(processor.rescale_factor),
        )

    def resize(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, h, w]`` -> uint8 ``[N, 3, *size]`` (unchanged when already that size)."""
        if tuple(patches.shape[-2:]) == self.size:
            return patches
        if _NATIVE_UINT8_RESIZE:
            return F.interpolate(patches, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        resized = F.interpolate(patches.float(), size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return resized.round_().to(torch.uint8)

    def normalize(self, patches: torch.Tensor) -> torch.Tensor:
        """Float32 model input of uint8 patches, on their device."""
        mean = torch.tensor(self.mean, device=patches.device) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.std, device=patches.device) * (1.0 / self.rescale_factor)
        return (patches.float() - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


def stack_patches(transform: PixelTransform, crops: list[np.ndarray]) -> torch.Tensor:
    """Stack ``(h, w, 3)`` uint8 crops into uint8 ``[N, 3, H, W]`` (channels-last), resizing each crop size at once."""
    sizes = {crop.shape[:2] for crop in crops}
    if len(sizes) == 1:  # grid and topk patches
        return transform.resize(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2))  # channels-last: fast resize
    out = torch.empty((len(crops), 3, *transform.size), dtype=torch.uint8, memory_format=torch.channels_last)
    for size in sizes:
        rows = [i for i, crop in enumerate(crops) if crop.shape[:2] == size]
        out[rows] = transform.resize(torch.from_numpy(np.stack([crops[i] for i in rows])).permute(0, 3, 1, 2))
    return out
