"""Tests for the training losses (checked against torch's own cross-entropy)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from hf_histo.training.losses import (
    FocalLoss,
    SoftTargetCrossEntropy,
    build_loss,
    class_weights_from_counts,
)

torch.manual_seed(0)
LOGITS = torch.randn(16, 4)
TARGETS = torch.randint(0, 4, (16,))
WEIGHTS = torch.tensor([0.5, 1.0, 2.0, 0.5])


def test_inverse_weights_hand_computed():
    w = class_weights_from_counts([100, 50, 25, 0])
    # 1/100, 1/50, 1/25 -> 1, 2, 4 (x 1/100) -> mean over present classes 7/3
    expected = torch.tensor([3 / 7, 6 / 7, 12 / 7, 0.0])
    torch.testing.assert_close(w, expected)
    assert w.dtype == torch.float32
    assert w[:3].mean().item() == pytest.approx(1.0)


def test_effective_weights():
    counts = [189, 205, 220, 77]
    w = class_weights_from_counts(counts, scheme="effective", beta=0.99)
    raw = torch.tensor([(1 - 0.99) / (1 - 0.99**n) for n in counts], dtype=torch.float64)
    torch.testing.assert_close(w, (raw / raw.mean()).float())
    assert torch.argmax(w).item() == 3  # rarest class gets the largest weight
    # beta=0: every class counts as one sample -> equal weights
    torch.testing.assert_close(class_weights_from_counts(counts, "effective", beta=0.0), torch.ones(4))


@pytest.mark.parametrize(
    ("counts", "kwargs", "match"),
    [
        ([], {}, "non-empty"),
        ([1, -2], {}, "non-negative"),
        ([0, 0], {}, "all zero"),
        ([1, 2], {"scheme": "sqrt"}, "unknown weighting scheme 'sqrt'"),
        ([1, 2], {"scheme": "effective", "beta": 1.0}, r"beta must be in \[0, 1\)"),
    ],
)
def test_class_weights_invalid(counts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        class_weights_from_counts(counts, **kwargs)


@pytest.mark.parametrize("weight", [None, WEIGHTS])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_gamma_zero_equals_cross_entropy(weight, smoothing):
    loss = FocalLoss(gamma=0.0, weight=weight, label_smoothing=smoothing)(LOGITS, TARGETS)
    expected = F.cross_entropy(LOGITS, TARGETS, weight=weight, label_smoothing=smoothing)
    torch.testing.assert_close(loss, expected)


def test_focal_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0])
    p = torch.softmax(logits, dim=-1)[:, 0]
    expected = (-((1 - p) ** 2) * torch.log(p)).mean()
    torch.testing.assert_close(FocalLoss(gamma=2.0)(logits, targets), expected)
    # focal < CE: easy examples are down-weighted
    assert FocalLoss(gamma=2.0)(LOGITS, TARGETS) < F.cross_entropy(LOGITS, TARGETS)


def test_focal_weighted_mean_normalised_like_torch():
    per = FocalLoss(gamma=2.0, weight=WEIGHTS, reduction="none")(LOGITS, TARGETS)
    mean = FocalLoss(gamma=2.0, weight=WEIGHTS)(LOGITS, TARGETS)
    torch.testing.assert_close(mean, per.sum() / WEIGHTS[TARGETS].sum())


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_weighted_ce_matches_torch(smoothing):
    loss_fn = build_loss("weighted_ce", class_weights=WEIGHTS, label_smoothing=smoothing)
    expected = F.cross_entropy(LOGITS, TARGETS, weight=WEIGHTS, label_smoothing=smoothing)
    torch.testing.assert_close(loss_fn(LOGITS, TARGETS), expected)


@pytest.mark.parametrize("name", ["ce", "weighted_ce", "focal"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_one_hot_soft_targets_equal_hard_targets(name, smoothing):
    weights = None if name == "ce" else WEIGHTS
    loss_fn = build_loss(name, class_weights=weights, label_smoothing=smoothing)
    one_hot = F.one_hot(TARGETS, 4).float()
    torch.testing.assert_close(loss_fn(LOGITS, one_hot), loss_fn(LOGITS, TARGETS))


def test_label_smoothing_matches_torch():
    loss_fn = build_loss("ce", label_smoothing=0.1)
    torch.testing.assert_close(loss_fn(LOGITS, TARGETS), F.cross_entropy(LOGITS, TARGETS, label_smoothing=0.1))
    # smoothing the one-hot targets by hand and passing them as probabilities gives the same value
    smoothed = F.one_hot(TARGETS, 4).float() * 0.9 + 0.1 / 4
    torch.testing.assert_close(build_loss("ce")(LOGITS, smoothed), loss_fn(LOGITS, TARGETS))


def test_soft_targets_match_torch_probability_targets():
    probs = torch.softmax(torch.randn(16, 4), dim=-1)
    expected = F.cross_entropy(LOGITS, probs)
    torch.testing.assert_close(SoftTargetCrossEntropy()(LOGITS, probs), expected)
    torch.testing.assert_close(SoftTargetCrossEntropy(reduction="sum")(LOGITS, probs), expected * 16)


def test_cutmix_targets_are_accepted():
    images = torch.rand(8, 3, 16, 16)
    labels = torch.randint(0, 4, (8,))
    _, mixed = v2.CutMix(num_classes=4)(images, labels)
    assert mixed.shape == (8, 4) and mixed.is_floating_point()
    logits = torch.randn(8, 4, requires_grad=True)
    for name in ("ce", "weighted_ce", "focal"):
        loss = build_loss(name, class_weights=None if name == "ce" else WEIGHTS)(logits, mixed)
        assert math.isfinite(loss.item())
        loss.backward()
    assert logits.grad is not None


def test_ignore_index():
    targets = TARGETS.clone()
    targets[:4] = -100
    expected = F.cross_entropy(LOGITS, targets, weight=WEIGHTS)
    torch.testing.assert_close(build_loss("weighted_ce", WEIGHTS)(LOGITS, targets), expected)
    torch.testing.assert_close(build_loss("focal", WEIGHTS, gamma=0.0)(LOGITS, targets), expected)


def test_weight_buffer_follows_module_dtype_and_device():
    loss_fn = build_loss("focal", class_weights=[1.0, 2.0, 3.0, 4.0])
    assert "weight" in dict(loss_fn.named_buffers())
    assert loss_fn.to(torch.float64)(LOGITS.double(), TARGETS).dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "hinge"}, "unknown loss 'hinge'"),
        ({"name": "weighted_ce"}, "needs class_weights"),
        ({"name": "ce", "class_weights": [1.0, 2.0]}, "weighted_ce"),
    ],
)
def test_build_loss_invalid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_loss(**kwargs)


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        (torch.zeros(16, 3), "soft targets must have the logits' shape"),
        (torch.zeros(15, dtype=torch.long), "class-index targets"),
    ],
)
def test_bad_target_shapes(targets, match):
    for loss_fn in (build_loss("ce"), build_loss("focal")):
        with pytest.raises(ValueError, match=match):
            loss_fn(LOGITS, targets)
