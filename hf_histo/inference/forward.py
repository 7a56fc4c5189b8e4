"""The engine's forward stage: TTA views, patch probabilities, patch embeddings, the attention-MIL vote; checks."""

# Ships with checkpoints next to engine.py: numpy, torch and siblings, relatively.

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..models.aggregation import AGGREGATIONS, TTA_MODES


def check_aggregation(method: str) -> str:
    """Return ``method`` if it is an aggregation name; raise a clear error otherwise."""
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {list(AGGREGATIONS)}")
    return method


def check_num_workers(num_workers: int) -> int:
    """Return ``num_workers`` (read-ahead threads) as an int if it is >= 0; raise a clear error otherwise."""
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return int(num_workers)


def check_tta(mode: str) -> str:
    """Return ``mode`` if it is a TTA name (``none``, ``flips``, ``d4``); raise a clear error otherwise."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA {mode!r}; choose one of {list(TTA_MODES)}")
    return mode


def tta_views(pixel_values: torch.Tensor, mode: str = "none") -> list[torch.Tensor]:
    """Test-time augmentation views of a ``[B, C, H, W]`` batch, the identity first.

    ``"none"``: the batch itself; ``"flips"``: identity, horizontal and vertical flips; ``"d4"``: the 8 flips and
    quarter turns (square inputs only: every backbone input here is square).
    """
    check_tta(mode)
    if mode == "none":
        return [pixel_values]
    if mode == "flips":
        return [pixel_values, pixel_values.flip(-1), pixel_values.flip(-2)]
    turns = [torch.rot90(pixel_values, k, dims=(-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def patch_probabilities(model: torch.nn.Module, pixel_values: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Class probabilities ``[B, C]`` (float32) of processed patches: softmax averaged over the TTA views.

    All views go through the model in one forward pass. The caller puts the model in eval mode.
    """
    views = tta_views(pixel_values, tta)
    with torch.no_grad():
        outputs = model(pixel_values=torch.cat(views) if len(views) > 1 else views[0])
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    probs = logits.float().softmax(dim=-1)
    return probs.view(len(views), pixel_values.shape[0], -1).mean(dim=0)


def has_mil_head(model: Any) -> bool:
    """Whether a model (a classifier or a `FoldEnsemble`) has an attention-MIL head."""
    return bool(getattr(model, "has_mil_head", False))


def check_attention(model: Any, aggregation: str) -> str:
    """Return ``aggregation``; ``"attention"`` on a model without an attention-MIL head raises a clear error."""
    if aggregation == "attention" and not has_mil_head(model):
        raise ValueError(
            'aggregation "attention" needs a model with an attention-MIL head: train one with --aggregation '
            "attention, or choose aggregation soft, hard or mask_weighted"
        )
    return aggregation


def patch_probabilities_and_embeddings(
    model: torch.nn.Module, pixel_values: torch.Tensor, tta: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`patch_probabilities` and the pooled patch embeddings ``[B, D]`` (float32, mean over the TTA views).

    One backbone pass: ``model.classify_embeddings(model.embed(x))`` is the model's forward, so the probabilities
    are those of `patch_probabilities`. The caller puts the model in eval mode.
    """
    views = tta_views(pixel_values, tta)
    with torch.no_grad():
        embeddings = model.embed(torch.cat(views) if len(views) > 1 else views[0])
        probs = model.classify_embeddings(embeddings).float().softmax(dim=-1)
    batch = pixel_values.shape[0]
    mean_embedding = embeddings.float().view(len(views), batch, -1).mean(dim=0)
    return probs.view(len(views), batch, -1).mean(dim=0), mean_embedding


def attention_vote(model: torch.nn.Module, embeddings: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Image probabilities ``[C]`` and patch attention ``[N]`` (float64) of the MIL head over one image's patches.

    Args:
        model: A model with `image_logits` (see `check_attention`).
        embeddings: The image's patch embeddings ``[N, D]`` (`patch_probabilities_and_embeddings`).
    """
    if embeddings is None:
        raise ValueError(
            'aggregation "attention" needs the patch embeddings of the image: compute its patch probabilities with '
            "InferenceEngine.patch_probs or predict (an engine of a model with a MIL head keeps them)"
        )
    parameter = next(model.parameters())
    bag = torch.as_tensor(np.asarray(embeddings), device=parameter.device).to(parameter.dtype)[None]
    with torch.no_grad():
        logits, attention = model.image_logits(bag)
    probs = logits.float().softmax(dim=-1)[0].cpu().numpy().astype(np.float64)
    return probs, attention[0].float().cpu().numpy().astype(np.float64)
