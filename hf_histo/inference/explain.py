"""Explanations: per-image patch probability maps, plus attention rollout (ViT) or Grad-CAM (CNN) on the top patch."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..utils import atomic_savefig
from .engine import InferenceEngine, item_error
from .loading import ModelSource, load_engine

METHODS = ("auto", "rollout", "gradcam")
DISPLAY_MAX_SIDE = 1024  # figures show the image at most this large (boxes are scaled with it)
PATCH_CMAP = "RdYlBu_r"


# ---- saliency of one patch -------------------------------------------------------------------------------------------
def _uses_tokens(model: Any) -> bool:
    spec = getattr(model, "spec", None)
    if getattr(model.config, "backbone_config", None) is not None and spec is not None:
        return bool(spec.tokens) and getattr(model.backbone, "timm_model", None) is None
    return False


def attention_rollout(model: Any, pixel_values: torch.Tensor, head_fusion: str = "mean") -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020) of a token backbone, as a patch-grid relevance map.

    Each layer's attention (heads fused by `head_fusion`, `"mean"` or `"max"`) gets the residual identity added and
    rows renormalised; the layers are multiplied from input to output. The relevance of the input patch tokens is
    read from the rows the head consumes: the CLS row (`cls` pooling), the mean patch-token row (`mean`) or both
    averaged (`cls_mean`).

    Args:
        model: A `HistoClassifierForImageClassification` with a ViT/DINOv2 backbone.
        pixel_values: One processed patch batch `[B, 3, H, W]`.
        head_fusion: How the heads of a layer are combined.

    Returns:
        `[B, H / patch_size, W / patch_size]` relevance in [0, 1].
    """
    backbone = model.backbone
    previous = backbone.config._attn_implementation
    if previous != "eager":  # sdpa does not return attention weights
        backbone.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(pixel_values=pixel_values, output_attentions=True).attentions
    finally:
        if previous != "eager":
            backbone.set_attn_implementation(previous)
    if not attentions:
        raise ValueError(f"{type(backbone).__name__} returned no attention weights; use method='gradcam'.")
    batch, _, height, width = pixel_values.shape
    patch = model.config.backbone_config.patch_size
    grid_h, grid_w = height // patch, width // patch
    tokens = attentions[0].shape[-1]
    prefix = tokens - grid_h * grid_w
    if prefix < 0:
        raise ValueError(f"{tokens} tokens do not cover a {grid_h}x{grid_w} patch grid")
    eye = torch.eye(tokens, device=attentions[0].device)
    rollout = eye.expand(batch, tokens, tokens)
    for attention in attentions:
        fused = attention.float().amax(dim=1) if head_fusion == "max" else attention.float().mean(dim=1)
        fused = fused + eye
        fused = fused / fused.sum(dim=-1, keepdim=True)
        rollout = fused @ rollout
    pooling = getattr(model.config, "pooling", "cls")
    cls_row = rollout[:, 0, prefix:]
    mean_row = rollout[:, prefix:, prefix:].mean(dim=1)
    row = {"cls": cls_row, "mean": mean_row}.get(pooling, (cls_row + mean_row) / 2) if prefix else mean_row
    relevance = row.reshape(batch, grid_h, grid_w)
    return _normalise(relevance).cpu().numpy()


def grad_cam(model: Any, pixel_values: torch.Tensor, target: int | Sequence[int]) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., 2017) on the backbone's last spatial feature map.

    The last module of the backbone that outputs a `[B, C, h, w]` map with `h * w > 1` is hooked (the last stage of
    ConvNeXt/ResNet/timm CNNs); channel weights are the spatial means of the target logit's gradient.

    Args:
        model: A `HistoClassifierForImageClassification` (any backbone with spatial feature maps).
        pixel_values: Processed patches `[B, 3, H, W]`.
        target: Class index explained, one for all or one per patch.

    Returns:
        `[B, H, W]` relevance in [0, 1] at input resolution.
    """
    maps: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            maps.append(output)

    handles = [module.register_forward_hook(keep) for module in _feature_modules(model)]
    try:
        with torch.enable_grad():
            pixels = pixel_values.detach().clone().requires_grad_(True)
            logits = model(pixel_values=pixels).logits
            if not maps:
                raise ValueError(f"{type(model.backbone).__name__} has no spatial feature map for Grad-CAM.")
            activation = maps[-1]
            targets = torch.as_tensor(target, device=logits.device).reshape(-1).expand(logits.shape[0])
            score = logits.gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, activation)
    finally:
        for handle in handles:
            handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return _normalise(cam).cpu().numpy()


def _feature_modules(model: Any) -> list[torch.nn.Module]:
    """Backbone modules whose outputs are channels-first feature maps: whole blocks of the backbone table.

    Inside a block, ConvNeXt-style layers work channels-last, so only block outputs are safe to read as
    [B, C, h, w]; backbones the table does not know fall back to every module.
    """
    spec = getattr(model, "spec", None)
    blocks = []
    for name, module in model.backbone.named_modules():
        block = spec.block_id(name + ".") if spec is not None and name else None
        if block is not None and (name + ".").endswith(block + "."):
            blocks.append(module)
    return blocks or list(model.backbone.modules())


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    flat = (flat - low) / (high - low).clamp_min(1e-12)
    return flat.reshape(maps.shape)


def patch_saliency(
    model: Any, pixel_values: torch.Tensor, target: int, method: str = "auto"
) -> tuple[np.ndarray, str]:
    """Relevance map of one processed patch `[1, 3, H, W]` and the method used.

    `"auto"` uses attention rollout for ViT-family backbones and Grad-CAM otherwise (and when a backbone returns no
    attention weights).
    """
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {list(METHODS)}")
    if method == "rollout" or (method == "auto" and _uses_tokens(model)):
        try:
            return attention_rollout(model, pixel_values)[0], "attention rollout"
        except (ValueError, AttributeError, NotImplementedError):
            if method == "rollout":
                raise
    return grad_cam(model, pixel_values, target)[0], "Grad-CAM"


# ---- the figure ------------------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float):
    # No pyplot: no global state or backend switching; savefig renders with Agg.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _patch_map(boxes: np.ndarray, values: np.ndarray, scale: float, size: tuple[int, int]) -> np.ndarray:
    """Per-pixel mean of the values of the patches covering it (overlapping tiles averaged), NaN elsewhere."""
    width, height = size
    total = np.zeros((height, width))
    count = np.zeros((height, width))
    for (x, y, w, h, _), value in zip(boxes.tolist(), values.tolist()):
        x0, y0 = max(round(x * scale), 0), max(round(y * scale), 0)
        x1, y1 = min(round((x + w) * scale), width), min(round((y + h) * scale), height)
        total[y0:y1, x0:x1] += value
        count[y0:y1, x0:x1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def explain_image(
    engine: InferenceEngine,
    image: str | os.PathLike | Image.Image | np.ndarray,
    mask: str | os.PathLike | Image.Image | np.ndarray | None = None,
    *,
    out_path: str | os.PathLike,
    title: str | None = None,
    true_label: str | None = None,
    method: str = "auto",
    batch_size: int | None = None,
) -> Path:
    """Write one explanation PNG for an image.

    Panels: the image with the mask outline (given mask, or detected tissue); every patch coloured by the
    probability of the predicted class (overlapping tiles averaged; most confident patch outlined); that patch with its attention rollout
    (ViT) or Grad-CAM (CNN) overlay.

    Args:
        engine: The model's inference engine.
        image: Path, PIL image or array.
        mask: Its mask; None uses tissue detection, as the pipeline does.
        out_path: PNG to write (atomically).
        title: Figure title (default: the file name when `image` is a path).
        true_label: Shown next to the prediction when known.
        method: `"auto"`, `"rollout"` or `"gradcam"`.
        batch_size: Patches per forward pass.

    Returns:
        `out_path` as a `Path`.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    patched = engine.patch(engine.decode(image), mask, name=name)
    prediction = engine.prediction(patched, engine.patch_probs(patched, batch_size=batch_size))
    pil, mask_arr, boxes = patched.image, patched.mask, patched.boxes
    target = int(np.argmax(prediction.probs))
    target_probs = prediction.patch_probs[:, target]
    top = int(np.argmax(target_probs))
    (crop,) = engine.crops(patched, [top])
    heat, method_used = patch_saliency(engine.model, engine.preprocess([crop]), target, method)
    predicted = prediction.scores(1)[0]

    scale = min(1.0, DISPLAY_MAX_SIDE / max(pil.size))
    shown = pil if scale == 1.0 else pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BILINEAR)
    shown_mask = mask_arr
    if scale != 1.0:
        shown_mask = np.asarray(Image.fromarray(mask_arr.astype(np.uint8) * 255).resize(shown.size, Image.NEAREST)) > 0

    figure = _new_figure(16, 5.6)
    ax_image, ax_patches, ax_top = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.15, 1]})
    ax_image.imshow(shown)
    if 0 < shown_mask.sum() < shown_mask.size:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax_image.contour(shown_mask.astype(np.float32), levels=[0.5], colors=["#00e000"], linewidths=1.2)
    ax_image.set_title(f"image + mask outline ({prediction.mask_source})", fontsize=10)

    cmap, norm = colormaps[PATCH_CMAP], Normalize(0.0, 1.0)
    ax_patches.imshow(shown, alpha=0.45)
    ax_patches.imshow(_patch_map(boxes, target_probs, scale, shown.size), cmap=cmap, norm=norm, alpha=0.6)
    x, y, w, h, _ = boxes[top].tolist()
    ax_patches.add_patch(Rectangle((x * scale, y * scale), w * scale, h * scale, fill=False, edgecolor="black", lw=2))
    ax_patches.set_xlim(0, shown.width)
    ax_patches.set_ylim(shown.height, 0)
    figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax_patches, fraction=0.046, pad=0.03).set_label(
        f"P({predicted['label']}) per patch"
    )
    ax_patches.set_title(
        f"{len(boxes)} patches, {prediction.aggregation} aggregation, TTA {prediction.tta}", fontsize=10
    )

    display = crop.resize((max(heat.shape[1], 224), max(heat.shape[0], 224)), Image.BILINEAR)
    ax_top.imshow(display)
    ax_top.imshow(heat, cmap="jet", alpha=0.45, extent=(0, display.width, display.height, 0), interpolation="bilinear")
    ax_top.set_title(f"top patch P={target_probs[top]:.2f}: {method_used}", fontsize=10)
    for ax in (ax_image, ax_patches, ax_top):
        ax.set_xticks([])
        ax.set_yticks([])

    if title is None and isinstance(image, (str, os.PathLike)):
        title = Path(image).name
    headline = f"predicted {predicted['label']} ({predicted['score']:.2f})"
    if true_label is not None:
        headline += f", true {true_label}"
    if prediction.fallback:
        headline += f"  [fallback: {prediction.fallback}]"
    figure.suptitle(f"{title}: {headline}" if title else headline, fontsize=12)
    figure.tight_layout()
    return atomic_savefig(out_path, figure)


def explain_folder(
    model_dir: ModelSource,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    layout: str | None = None,
    max_images: int | None = None,
    method: str = "auto",
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
    on_error: str = "raise",
    resize_masks: bool = False,
    max_image_pixels: int | None = None,
) -> list[Path]:
    """Write one explanation PNG per image of a data folder (`hf-histo explain`); the output folder is checked first.

    Args:
        model_dir: A checkpoint folder (or Hub id) saved by hf-histo.
        data_dir: A data folder in any layout `read_samples` knows (labelled or not); masks are used when present.
        out_dir: Folder for the PNGs (`<image_id>.png`).
        layout: Force the data layout; detected when None.
        max_images: Explain only the first N images (sorted by image id).
        method: `"auto"` (rollout for ViT-family backbones, Grad-CAM otherwise), `"rollout"` or `"gradcam"`.
        batch_size: Patches per forward pass.
        device: Torch device or index.
        progress: Show a progress bar.
        on_error: `"raise"` stops at the first bad image; `"skip"` goes on and logs the failures in one warning.
        resize_masks: Resize masks whose size differs from their image instead of failing.
        max_image_pixels: Raise PIL's decompression-bomb limit for trusted large images.

    Returns:
        The PNG paths written, in sample order.

    Raises:
        DataError: A bad image (with `on_error="raise"`, naming it) or an output folder that cannot be used.
    """
    from tqdm.auto import tqdm

    from ..data.masks import load_mask
    from ..data.sources import read_samples
    from .engine import ITEM_ERRORS
    from .loading import check_output_folder
    from .predict import check_on_error, log_failures, with_skip_hint

    check_on_error(on_error)
    out_dir = check_output_folder(out_dir)
    samples = read_samples(data_dir, layout=layout, on_error=on_error).samples
    if max_images is not None:
        samples = samples[: max(0, int(max_images))]
    engine = load_engine(model_dir, device=device, batch_size=batch_size, max_image_pixels=max_image_pixels)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, failed = [], []
    for sample in tqdm(samples, desc="explain", unit="image", disable=not progress):
        name = str(sample.image_path)
        try:
            image = engine.decode(sample.image_path)  # decoded once; the mask is sized (or resized) to it here
            mask = None
            if sample.mask_path is not None:
                mask = load_mask(
                    sample.mask_path,
                    image.size,
                    resize=resize_masks,
                    image_path=name,
                    max_pixels=engine.max_image_pixels,
                )
            path = explain_image(
                engine,
                image,
                mask,
                out_path=out_dir / f"{sample.image_id}.png",
                title=sample.image_path.name,
                true_label=sample.label,
                method=method,
                batch_size=batch_size,
            )
        except ITEM_ERRORS as e:
            if on_error == "raise":
                raise with_skip_hint(e, name, "in a warning") from e
            failed.append((name, str(item_error(e, name))))
            continue
        paths.append(path)
    log_failures(failed, len(samples), f"no PNG in {out_dir}")
    return paths
