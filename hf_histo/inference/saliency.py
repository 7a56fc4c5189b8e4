"""Saliency of one patch: attention rollout (ViT) or Grad-CAM (CNN), and per-pixel maps of patch values."""

# This module ships with model checkpoints (flattened next to the modeling code) so that the web app of a model
# folder (app.py, a Gradio Space) explains patches without hf_histo: torch and numpy only, no relative imports.

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

METHODS = ("auto", "rollout", "gradcam")


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


def patch_map(boxes: np.ndarray, values: np.ndarray, scale: float, size: tuple[int, int]) -> np.ndarray:
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
