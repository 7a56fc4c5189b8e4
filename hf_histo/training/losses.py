"""Classification losses for imbalanced patch data: (class-weighted) cross-entropy, focal loss, soft targets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("ce", "weighted_ce", "focal")
WEIGHT_SCHEMES = ("inverse", "effective")


def class_weights_from_counts(
    counts: Sequence[int] | np.ndarray | torch.Tensor, scheme: str = "inverse", beta: float = 0.999
) -> torch.Tensor:
    """Per-class loss weights from per-class training counts, normalised to mean 1.

    Args:
        counts: Number of training samples (patches or images) per class, in label-index order.
        scheme: ``"inverse"``: ``1 / count``. ``"effective"``: inverse effective number of samples,
            ``(1 - beta) / (1 - beta**count)`` (Cui et al., CVPR 2019), which is gentler for large counts.
        beta: Hyper-parameter of ``"effective"`` in ``[0, 1)``; 0 gives equal weights, values close to 1
            approach ``"inverse"``.

    Returns:
        Float32 tensor ``[C]``. Classes with a count of 0 get weight 0 (they have no targets anyway);
        the other weights have mean 1, so the loss keeps the scale of unweighted cross-entropy.
    """
    counts_np = np.asarray(counts.detach().cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    if counts_np.ndim != 1 or counts_np.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence (one count per class), got shape {counts_np.shape}")
    if not np.all(np.isfinite(counts_np)) or np.any(counts_np < 0):
        raise ValueError(f"counts must be finite and non-negative, got {counts_np.tolist()}")
    present = counts_np > 0
    if not present.any():
        raise ValueError("counts are all zero: no class has training samples")
    if scheme == "inverse":
        raw = 1.0 / np.where(present, counts_np, 1.0)
    elif scheme == "effective":
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        raw = (1.0 - beta) / (1.0 - np.power(beta, np.where(present, counts_np, 1.0)))
    else:
        raise ValueError(f"unknown weighting scheme {scheme!r}; choose one of {WEIGHT_SCHEMES}")
    weights = np.where(present, raw, 0.0)
    weights = weights / weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)


def _soft_targets_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None,
    label_smoothing: float,
    gamma: float,
    reduction: str,
) -> torch.Tensor:
    """Cross-entropy (``gamma=0``) or focal loss against probability targets ``[B, C]``.

    Per sample: ``-sum_c w_c * q'_c * (1 - p_c)**gamma * log p_c`` with ``q' = (1 - eps) * q + eps / C``.
    The ``"mean"`` reduction divides by ``sum_i sum_c w_c * q_ic`` (the unsmoothed targets), i.e. by the
    batch size without weights and by ``sum_i w_{y_i}`` for one-hot targets: the convention of
    ``F.cross_entropy`` with class-index targets, so one-hot soft targets give exactly the hard-target loss.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    targets = targets.float()
    n_classes = logits.shape[-1]
    smoothed = targets * (1.0 - label_smoothing) + label_smoothing / n_classes if label_smoothing else targets
    w = torch.ones(n_classes, device=logits.device) if weight is None else weight.to(logits.device, torch.float32)
    terms = smoothed * w * log_probs
    if gamma:
        terms = terms * (1.0 - log_probs.exp()).pow(gamma)
    per_sample = -terms.sum(dim=-1)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / (targets * w).sum()


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, n_classes], got shape {tuple(logits.shape)}")
    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise ValueError(
                f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(targets.shape)}"
            )
    elif targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"class-index targets must be [batch] = [{logits.shape[0]}] integers, got shape {tuple(targets.shape)}"
        )


def _as_probability_targets(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(logits, soft_targets)``; class-index targets become one-hot, ``ignore_index`` rows are dropped."""
    _check_targets(logits, targets)
    if targets.is_floating_point():
        return logits, targets
    keep = targets != ignore_index
    logits, targets = logits[keep], targets[keep]
    return logits, F.one_hot(targets.long(), logits.shape[-1]).float()


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy that accepts class-index targets ``[B]`` or probability targets ``[B, C]``.

    Probability targets are what ``torchvision.transforms.v2.CutMix`` / ``MixUp`` return (float
    rows summing to 1). Class-index targets go straight to ``F.cross_entropy``; probability targets
    use the same weighting and smoothing, and a ``"mean"`` normalised by the targets' total class
    weight, so that one-hot probability targets give exactly the class-index loss (also with
    ``weight`` and ``label_smoothing``).

    Args:
        weight: Optional per-class weights ``[C]`` (see :func:`class_weights_from_counts`).
        label_smoothing: Mass in ``[0, 1)`` spread uniformly over the classes, as in ``nn.CrossEntropyLoss``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        ignore_index: Class-index targets equal to this are ignored (``nn.CrossEntropyLoss`` default).
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
    ):
        super().__init__()
        _check_reduction(reduction)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``[B, C]`` against class indices ``[B]`` or probabilities ``[B, C]``."""
        if not targets.is_floating_point():
            _check_targets(logits, targets)
            weight = None if self.weight is None else self.weight.to(logits.device, logits.dtype)
            return F.cross_entropy(
                logits,
                targets.long(),
                weight=weight,
                label_smoothing=self.label_smoothing,
                reduction=self.reduction,
                ignore_index=self.ignore_index,
            )
        logits, soft = _as_probability_targets(logits, targets, self.ignore_index)
        return _soft_targets_loss(logits, soft, self.weight, self.label_smoothing, 0.0, self.reduction)

    def extra_repr(self) -> str:
        return f"weighted={self.weight is not None}, label_smoothing={self.label_smoothing}"


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., ICCV 2017) that down-weights easy, confidently classified patches.

    Per sample ``-sum_c w_c * q_c * (1 - p_c)**gamma * log p_c`` where ``q`` is the (smoothed) target
    distribution; with class-index targets and no smoothing this is ``-w_y (1 - p_y)**gamma log p_y``.
    ``gamma=0`` gives exactly :class:`SoftTargetCrossEntropy` (and ``F.cross_entropy``). Accepts
    class-index targets ``[B]`` or probability targets ``[B, C]`` (CutMix / MixUp).

    Args:
        gamma: Focusing parameter >= 0; 2 is the usual choice.
        weight: Optional per-class weights ``[C]`` (the ``alpha`` of the paper).
        label_smoothing: Mass in ``[0, 1)`` spread uniformly over the classes.
        reduction: ``"mean"`` (weighted like ``F.cross_entropy``), ``"sum"`` or ``"none"``.
        ignore_index: Class-index targets equal to this are ignored.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
    ):
        super().__init__()
        _check_reduction(reduction)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.gamma = float(gamma)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``[B, C]`` against class indices ``[B]`` or probabilities ``[B, C]``."""
        logits, soft = _as_probability_targets(logits, targets, self.ignore_index)
        return _soft_targets_loss(logits, soft, self.weight, self.label_smoothing, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, weighted={self.weight is not None}, label_smoothing={self.label_smoothing}"


def build_loss(
    name: str = "ce",
    class_weights: torch.Tensor | Sequence[float] | None = None,
    gamma: float = 2.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Build the training loss by name; its ``forward(logits, targets)`` takes class indices or soft targets.

    Args:
        name: ``"ce"`` (plain cross-entropy), ``"weighted_ce"`` (needs ``class_weights``) or ``"focal"``
            (``class_weights`` optional).
        class_weights: Per-class weights ``[C]``, e.g. from :func:`class_weights_from_counts`.
        gamma: Focusing parameter of ``"focal"``.
        label_smoothing: Label smoothing for all losses.

    Returns:
        A :class:`SoftTargetCrossEntropy` or :class:`FocalLoss` module.
    """
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
    if name == "ce":
        if weight is not None:
            raise ValueError('loss "ce" is unweighted: use loss "weighted_ce" to pass class_weights')
        return SoftTargetCrossEntropy(label_smoothing=label_smoothing)
    if name == "weighted_ce":
        if weight is None:
            raise ValueError('loss "weighted_ce" needs class_weights (see class_weights_from_counts)')
        return SoftTargetCrossEntropy(weight=weight, label_smoothing=label_smoothing)
    if name == "focal":
        return FocalLoss(gamma=gamma, weight=weight, label_smoothing=label_smoothing)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
