"""Histology augmentation in two halves: geometric ops per patch on uint8 tensors, colour and stain jitter per batch."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn.functional import affine_grid, conv2d, grid_sample, interpolate
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

AUGMENTATIONS = ("none", "flips", "histo")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Jitter parameters, one row per patch: the order of the colour ops (a permutation of 0..3 = brightness,
# contrast, saturation, hue, as torchvision's ColorJitter), their 4 factors, 3 HED scales, 3 HED shifts.
N_JITTER_PARAMS = 14
# With the geometry on the batch, rows start with: crop top, left, height, width (pixels of the stored patch),
# horizontal flip, vertical flip, quarter turns; the jitter parameters follow.
N_GEOMETRY_PARAMS = 7
_CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
_CROP_TRIES = 10  # as RandomResizedCrop, before falling back to a centre crop
_UNIFORMS = 4 * _CROP_TRIES + 3 + N_JITTER_PARAMS  # crop tries, flips + turns, jitter
_HED_MATRICES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _hed_matrices(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Ruifrok-Johnston RGB <-> HED matrices of `skimage.color` on `device` (made once per device)."""
    if device not in _HED_MATRICES:
        from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

        _HED_MATRICES[device] = (
            torch.tensor(hed_from_rgb, dtype=torch.float32, device=device),
            torch.tensor(rgb_from_hed, dtype=torch.float32, device=device),
        )
    return _HED_MATRICES[device]


def hed_jitter(images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Scale and shift the haematoxylin, eosin and DAB concentrations of float RGB images in [0, 1].

    Args:
        images: `[..., 3, H, W]` float images.
        alpha: Stain scales, `[3]` for all images or `[..., 3]` (one row per image).
        beta: Stain shifts, shaped like `alpha`.

    Returns:
        The jittered images, same shape and dtype, clamped to [0, 1].
    """
    hed_from_rgb, rgb_from_hed = _hed_matrices(images.device)
    log_adjust = math.log(1e-6)
    x = images.float().reshape(-1, *images.shape[-3:])
    # Optical density -> stains and back are 3x3 colour mixes: 1x1 convolutions (no channels-last copies).
    density = torch.log(x.clamp_min(1e-6)) / log_adjust
    stains = conv2d(density, hed_from_rgb.T[:, :, None, None])
    stains = stains * alpha.reshape(-1, 3, 1, 1).to(stains) + beta.reshape(-1, 3, 1, 1).to(stains)
    out = torch.exp(conv2d(stains * log_adjust, rgb_from_hed.T[:, :, None, None])).clamp_(0, 1)
    return out.reshape(images.shape).to(images.dtype)


def _gray(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(images: torch.Tensor, other: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    return (images * factor + other * (1.0 - factor)).clamp_(0, 1)


def _brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * factor).clamp_(0, 1)


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _gray(images).mean(dim=(-3, -2, -1), keepdim=True), factor)


def _saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _gray(images), factor)


def _hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(images).unbind(dim=-3)
    return _hsv_to_rgb(torch.stack(((h + factor[:, 0]).remainder_(1.0), s, v), dim=-3))


_COLOR_OPS = (_brightness, _contrast, _saturation, _hue)  # the order of ColorJitter's `fn_idx`


def color_jitter(images: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's `ColorJitter` on a batch, with each image's own op order and factors.

    Args:
        images: `[B, 3, H, W]` float images in [0, 1].
        order: `[B, 4]` op indices (0 brightness, 1 contrast, 2 saturation, 3 hue), a permutation per image.
        factors: `[B, 4]` brightness, contrast and saturation factors and hue shift.
    """
    out = images.clone()
    order = order.long()
    for position in range(4):
        for op, fn in enumerate(_COLOR_OPS):
            rows = (order[:, position] == op).nonzero().squeeze(1)
            if rows.numel():
                out[rows] = fn(out[rows], factors[rows, op].reshape(-1, 1, 1, 1).to(out))
    return out


def batch_geometry(images: torch.Tensor, geometry: torch.Tensor, size: int) -> torch.Tensor:
    """`PatchAugment`'s per-patch geometry on a float batch: crop, resize, flips and quarter turns.

    Crops that are upscaled (the usual case: a crop of the patch back to its size) go through one affine resampling
    of the whole batch (`grid_sample`, pixel centres placed as `resize` places them), which equals the per-patch
    `resized_crop` + flips + turns up to the crop's border pixels. Crops that shrink need antialiasing, which
    `grid_sample` lacks: those rows are cut and resized one by one, as per patch.

    Args:
        images: `[B, 3, H, W]` float images (one patch size per batch).
        geometry: `[B, N_GEOMETRY_PARAMS]` rows, as `PatchAugment(geometry_on_batch=True)` draws them.
        size: Output side.

    Returns:
        `[B, 3, size, size]` float images.
    """
    height, width = images.shape[-2:]
    g = geometry.to(images.device, torch.float32)
    top, left, h, w, hflip, vflip, turns = g.unbind(1)
    if (height, width) != (size, size) and bool(((top == 0) & (left == 0) & (h == height) & (w == width)).all()):
        # Whole patches (`"flips"`): one antialiased resize of the batch, then the exact flips and turns below.
        images = interpolate(images, size=[size, size], mode="bilinear", antialias=True, align_corners=False)
        height = width = size
        h, w = torch.full_like(h, size), torch.full_like(w, size)
    # Output -> patch coordinates (normalised, align_corners=False): undo the turns (`rot90` counter-clockwise),
    # then the flips, then place the crop in the patch.
    angle = turns.round() * (math.pi / 2)
    cos, sin = torch.cos(angle).round(), torch.sin(angle).round()
    fx, fy = 1 - 2 * hflip, 1 - 2 * vflip
    sx, sy = w / width, h / height
    theta = torch.stack(
        (
            torch.stack((sx * fx * cos, -sx * fx * sin, (2 * left + w) / width - 1), dim=1),
            torch.stack((sy * fy * sin, sy * fy * cos, (2 * top + h) / height - 1), dim=1),
        ),
        dim=1,
    )
    grid = affine_grid(theta, [len(images), images.shape[1], size, size], align_corners=False)
    out = grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    for i in torch.nonzero(torch.maximum(h, w) > size).flatten().tolist():
        t, x, hh, ww, hf, vf, k = (int(v) for v in geometry[i].tolist())
        crop = images[i : i + 1, :, t : t + hh, x : x + ww]
        crop = interpolate(crop, size=[size, size], mode="bilinear", antialias=True, align_corners=False)[0]
        crop = crop.flip(-1) if hf else crop
        crop = crop.flip(-2) if vf else crop
        out[i] = torch.rot90(crop, k, dims=(-2, -1))
    return out


class PatchAugment:
    """The per-patch half of the training augmentation: uint8 `[3, H, W]` -> uint8 `[3, size, size]` on the CPU.

    `"histo"` crops a random area (`RandomResizedCrop`'s distribution) and resizes it, `"flips"` and `"histo"`
    flip and turn by quarter turns, `"none"` only resizes. For `"histo"` it also draws the patch's colour and HED
    jitter parameters, which `BatchAugment` applies to the collated batch on the training device. All draws come
    from one `torch.Generator` per patch (or torch's global one), so a seeded patch is reproducible anywhere.

    With `geometry_on_batch`, the patch is returned as stored and the crop/flip/turn draws travel with the jitter
    parameters: `BatchAugment` resamples the whole batch in one op (`batch_geometry`) on the training device. A GPU
    run then leaves each loader core only the decode; on a CPU the per-patch ops are cheaper. Needs one patch size
    per batch (the `grid` and `topk` strategies).

    Args:
        size: Output side.
        augment: One of `AUGMENTATIONS`.
        mean: Normalisation mean (used by `batch_augment()`).
        std: Normalisation std.
        crop_scale: Area range of the random crop (`"histo"`).
        color_jitter: Brightness/contrast/saturation jitter, hue a fifth of it (`"histo"`; 0 disables).
        hed_jitter: Sigma and bias of the HED stain jitter (`"histo"`; 0 disables).
        geometry_on_batch: Leave crop, resize, flips and turns to `BatchAugment` (`"histo"` and `"flips"`).
    """

    def __init__(
        self,
        size: int,
        augment: str = "histo",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        color_jitter: float = 0.1,
        hed_jitter: float = 0.05,
        geometry_on_batch: bool = False,
    ):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r} is not supported; choose one of {list(AUGMENTATIONS)}")
        if color_jitter < 0 or hed_jitter < 0:
            raise ValueError(f"color_jitter and hed_jitter must be >= 0, got {color_jitter}, {hed_jitter}")
        self.size, self.augment, self.mean, self.std = int(size), augment, tuple(mean), tuple(std)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        histo = augment == "histo"
        self.color_jitter = float(color_jitter) if histo else 0.0
        self.hed_jitter = float(hed_jitter) if histo else 0.0
        self.geometry_on_batch = bool(geometry_on_batch) and augment != "none"

    @property
    def jitters(self) -> bool:
        """Whether patches carry colour/stain jitter parameters for the batch."""
        return self.color_jitter > 0 or self.hed_jitter > 0

    @property
    def batch_params(self) -> bool:
        """Whether patches carry parameters for the batch half (jitter and/or geometry)."""
        return self.jitters or self.geometry_on_batch

    def batch_augment(self) -> BatchAugment:
        """The matching batch half (geometry when on the batch, jitter, normalisation)."""
        geometry_size = self.size if self.geometry_on_batch else None
        return BatchAugment(self.mean, self.std, self.color_jitter > 0, self.hed_jitter > 0, geometry_size)

    def __call__(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment one uint8 `[3, H, W]` patch; returns it and its batch parameters (or None).

        A channels-last view of the decoded patch (`to_uint8_tensor`) resizes ~1.5x faster than a contiguous one.
        With `geometry_on_batch` the patch comes back as given, its geometry first in the parameters.
        """
        if self.augment == "none":
            return self._resize(image).contiguous(), None
        u = iter(torch.rand(_UNIFORMS, dtype=torch.float64, generator=generator).tolist())
        height, width = image.shape[-2:]
        box = self._crop_box(height, width, u) if self.augment == "histo" else (0, 0, height, width)
        hflip, vflip, turns = next(u) < 0.5, next(u) < 0.5, int(next(u) * 4)
        jitter = self._jitter_params(u) if self.jitters else None
        if self.geometry_on_batch:
            geometry = torch.tensor([*box, hflip, vflip, turns], dtype=torch.float32)
            return image, geometry if jitter is None else torch.cat((geometry, jitter))
        if self.augment == "histo":
            image = F.resized_crop(image, *box, [self.size, self.size], antialias=True)
        else:
            image = self._resize(image)
        if hflip:
            image = image.flip(-1)
        if vflip:
            image = image.flip(-2)
        if turns:
            image = torch.rot90(image, turns, dims=(-2, -1))
        # Collating strided patches costs more than making them contiguous here (a transpose after odd turns).
        return image.contiguous(), jitter

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) == (self.size, self.size):
            return image
        return F.resize(image, [self.size, self.size], antialias=True)

    def _crop_box(self, height: int, width: int, u: Any) -> tuple[int, int, int, int]:
        """`RandomResizedCrop.make_params`, drawing from `u` (an iterator of uniforms in [0, 1))."""
        area = height * width
        log_lo, log_hi = math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])
        lo, hi = self.crop_scale
        for _ in range(_CROP_TRIES):
            target = area * (lo + (hi - lo) * next(u))
            ratio = math.exp(log_lo + (log_hi - log_lo) * next(u))
            w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            top, left = next(u), next(u)
            if 0 < w <= width and 0 < h <= height:
                return int(top * (height - h + 1)), int(left * (width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < _CROP_RATIO[0]:
            w, h = width, int(round(width / _CROP_RATIO[0]))
        elif in_ratio > _CROP_RATIO[1]:
            w, h = int(round(height * _CROP_RATIO[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _jitter_params(self, u: Any) -> torch.Tensor:
        """`ColorJitter.make_params` and `HEDJitter.make_params` as one row of `N_JITTER_PARAMS` values."""
        keys = [next(u) for _ in range(4)]
        order = sorted(range(4), key=keys.__getitem__)  # a uniform random permutation
        c, hue = self.color_jitter, self.color_jitter / 5
        factors = [max(0.0, 1 - c) + (1 + c - max(0.0, 1 - c)) * next(u) for _ in range(3)]
        factors.append(-hue + 2 * hue * next(u))
        s = self.hed_jitter
        stains = [1.0 + (2 * next(u) - 1) * s for _ in range(3)] + [(2 * next(u) - 1) * s for _ in range(3)]
        return torch.tensor(order + factors + stains, dtype=torch.float32)


class BatchAugment:
    """The batch half: uint8 `[B, 3, S, S]` -> jittered (training) and normalised float32, on the batch's device.

    With `geometry_size`, rows start with `PatchAugment`'s crop/flip/turn draws, applied first (`batch_geometry`);
    without parameters the batch is then only resized to `geometry_size`. Colour jitter (torchvision's `ColorJitter`, with each patch's op order and factors) then HED stain jitter
    (`HEDJitter`), with the parameters `PatchAugment` drew for each patch; then the normalisation of the eval
    transform. Without parameters it only converts and normalises.

    Args:
        mean: Normalisation mean.
        std: Normalisation std.
        color: Apply the colour jitter of the parameters.
        hed: Apply the HED jitter of the parameters.
        geometry_size: Output side when the parameters start with the geometry (None: done per patch).
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        color: bool = False,
        hed: bool = False,
        geometry_size: int | None = None,
    ):
        self.mean, self.std, self.color, self.hed = tuple(mean), tuple(std), bool(color), bool(hed)
        self.geometry_size = None if geometry_size is None else int(geometry_size)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, pixel_values: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """Jitter (when `params` is given) and normalise a uint8 batch; float batches pass through unchanged."""
        if pixel_values.is_floating_point():
            return pixel_values
        device = pixel_values.device
        if device not in self._stats:  # made once per device: a copy to the GPU per batch would wait for it
            self._stats[device] = (
                torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                torch.tensor(self.std, device=device).view(1, 3, 1, 1),
            )
        mean, std = self._stats[device]
        params = None if params is None else params.to(device, torch.float32)
        geometry = None
        if self.geometry_size is not None and params is not None:
            geometry, params = params[:, :N_GEOMETRY_PARAMS], params[:, N_GEOMETRY_PARAMS:]
            params = params if params.shape[1] else None
        # On a CPU the jitter of one image at a time stays in cache: 2-6x faster than batch-wide ops on 224 px.
        step = 1 if device.type == "cpu" and params is not None else max(1, len(pixel_values))
        chunks = []
        with torch.autocast(device.type, enabled=False):  # colour maths in float32 under bf16/fp16 training
            for start in range(0, max(1, len(pixel_values)), step):
                images = pixel_values[start : start + step].float().div_(255)
                if geometry is not None:
                    images = batch_geometry(images, geometry[start : start + step], self.geometry_size)
                elif self.geometry_size is not None and images.shape[-2:] != (self.geometry_size,) * 2:
                    size = [self.geometry_size] * 2
                    images = interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
                if params is not None:
                    rows = params[start : start + step]
                    if self.color:
                        images = color_jitter(images, rows[:, :4], rows[:, 4:8])
                    if self.hed:
                        images = hed_jitter(images, rows[:, 8:11], rows[:, 11:14])
                chunks.append(images.sub_(mean).div_(std))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def __repr__(self) -> str:
        return (
            f"BatchAugment(mean={self.mean}, std={self.std}, color={self.color}, hed={self.hed}, "
            f"geometry_size={self.geometry_size})"
        )


class HEDJitter(Transform):
    """Stain augmentation in haematoxylin-eosin-DAB space (Tellez et al., 2018), one image at a time.

    RGB is turned into stain concentrations with the fixed Ruifrok-Johnston matrix (`skimage.color.rgb2hed`),
    each stain channel is scaled by `U(1 - sigma, 1 + sigma)` and shifted by `U(-bias, bias)`, and the result is
    turned back into RGB (`hed_jitter`). Works on float images in [0, 1] (`[..., 3, H, W]`); randomness comes from
    torch's generator. Training batches get the same jitter from `BatchAugment`.

    Args:
        sigma: Scale jitter of each stain channel.
        bias: Additive jitter of each stain channel.
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.05):
        super().__init__()
        if sigma < 0 or bias < 0:
            raise ValueError(f"HEDJitter: sigma and bias must be >= 0, got {sigma}, {bias}")
        self.sigma = float(sigma)
        self.bias = float(bias)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw one scale and one shift per stain channel for the whole sample."""
        alpha = 1.0 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.bias
        return {"alpha": alpha, "beta": beta}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the drawn stain jitter to an image tensor; other inputs pass through."""
        if not isinstance(inpt, torch.Tensor) or not inpt.is_floating_point():
            return inpt
        return hed_jitter(inpt, params["alpha"], params["beta"])


class RandomRot90(Transform):
    """Rotate by a random multiple of 90 degrees (tissue has no up; no interpolation, no border)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the number of quarter turns."""
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Rotate image tensors; other inputs pass through."""
        if not isinstance(inpt, torch.Tensor) or params["k"] == 0:
            return inpt
        return torch.rot90(inpt, params["k"], dims=(-2, -1))
