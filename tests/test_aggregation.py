"""Tests for patch-to-image aggregation (hand-computed cases)."""

import ast
from pathlib import Path

import numpy as np
import pytest

from hf_histo.models import aggregation
from hf_histo.models.aggregation import AGGREGATIONS, TIE_EPSILON, VOTES, aggregate, aggregate_by_image

PROBS = np.array(
    [
        [0.6, 0.3, 0.1],
        [0.5, 0.4, 0.1],
        [0.1, 0.8, 0.1],
    ]
)


def test_aggregations_tuple():
    assert AGGREGATIONS == ("soft", "hard", "mask_weighted", "attention")
    assert VOTES == ("soft", "hard", "mask_weighted")


def test_attention_needs_the_model():
    with pytest.raises(ValueError, match="MIL head.*InferenceEngine"):
        aggregate(PROBS, "attention")
    with pytest.raises(ValueError, match="MIL head.*InferenceEngine"):
        aggregate_by_image(["a", "a", "b"], PROBS, "attention")


def test_soft_is_mean():
    np.testing.assert_allclose(aggregate(PROBS, "soft"), [0.4, 0.5, 0.1])


def test_hard_majority_vote_fractions():
    # argmax per patch: 0, 0, 1 -> class 0 wins although the soft mean favours class 1
    out = aggregate(PROBS, "hard")
    np.testing.assert_allclose(out, [2 / 3, 1 / 3, 0.0])
    assert np.argmax(out) == 0
    assert np.argmax(aggregate(PROBS, "soft")) == 1


def test_hard_tie_broken_by_mean_probability():
    probs = np.array([[0.55, 0.45, 0.0], [0.05, 0.95, 0.0]])  # one vote each; mean prob 0.3 vs 0.7
    out = aggregate(probs, "hard")
    assert np.argmax(out) == 1
    expected = np.array([0.5, 0.5 + TIE_EPSILON, 0.0]) / (1 + TIE_EPSILON)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    assert out.sum() == pytest.approx(1.0)


def test_hard_tie_with_equal_means_picks_lowest_index():
    probs = np.array([[0.0, 0.6, 0.4], [0.0, 0.4, 0.6]])
    out = aggregate(probs, "hard")
    assert np.argmax(out) == 1
    assert out[1] > out[2]


def test_hard_no_tie_has_exact_fractions():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    np.testing.assert_array_equal(aggregate(probs, "hard"), [0.75, 0.25])


def test_mask_weighted():
    weights = np.array([1.0, 1.0, 2.0])
    # (1*[.6,.3,.1] + 1*[.5,.4,.1] + 2*[.1,.8,.1]) / 4
    np.testing.assert_allclose(aggregate(PROBS, "mask_weighted", weights), [0.325, 0.575, 0.1])
    # scale invariance: pixel counts and fractions give the same answer
    np.testing.assert_allclose(aggregate(PROBS, "mask_weighted", weights * 500), [0.325, 0.575, 0.1])


def test_mask_weighted_zero_weight_patch_ignored():
    out = aggregate(PROBS, "mask_weighted", [0.0, 0.0, 3.0])
    np.testing.assert_allclose(out, PROBS[2])


def test_mask_weighted_all_zero_falls_back_to_soft():
    np.testing.assert_allclose(aggregate(PROBS, "mask_weighted", [0, 0, 0]), aggregate(PROBS, "soft"))


@pytest.mark.parametrize("method", VOTES)
def test_single_patch_returns_its_probabilities_or_one_hot(method):
    probs = np.array([[0.2, 0.7, 0.1]])
    out = aggregate(probs, method, weights=[5.0])
    if method == "hard":
        np.testing.assert_array_equal(out, [0.0, 1.0, 0.0])
    else:
        np.testing.assert_allclose(out, probs[0])


@pytest.mark.parametrize(
    ("probs", "method", "weights", "match"),
    [
        (PROBS, "median", None, "unknown aggregation 'median'"),
        (PROBS[0], "soft", None, "2-D array"),
        (np.zeros((0, 3)), "soft", None, "at least one patch"),
        (np.array([[np.nan, 1.0]]), "soft", None, "NaN"),
        (PROBS, "mask_weighted", None, "needs weights"),
        (PROBS, "mask_weighted", [1.0, 2.0], r"shape \(3,\)"),
        (PROBS, "mask_weighted", [1.0, -1.0, 2.0], "non-negative"),
    ],
)
def test_invalid_inputs(probs, method, weights, match):
    with pytest.raises(ValueError, match=match):
        aggregate(probs, method, weights)


def test_aggregate_by_image_first_appearance_order_and_non_contiguous():
    ids = ["b", "a", "b", "a", "c"]
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6], [0.5, 0.5]])
    out_ids, out = aggregate_by_image(ids, probs, "soft")
    assert out_ids == ["b", "a", "c"]
    np.testing.assert_allclose(out, [[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])


@pytest.mark.parametrize("method", VOTES)
def test_aggregate_by_image_matches_per_image_aggregate(method):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=60)
    ids = [f"img_{i}" for i in rng.integers(0, 7, size=60)]
    weights = rng.integers(0, 3, size=60).astype(float)
    weights[[i for i, x in enumerate(ids) if x == ids[0]]] = 0.0  # one image with all-zero weights
    out_ids, out = aggregate_by_image(ids, probs, method, weights)
    for row, image_id in zip(out, out_ids):
        sel = np.array([x == image_id for x in ids])
        np.testing.assert_allclose(row, aggregate(probs[sel], method, weights[sel]), atol=1e-12)
        assert np.argmax(row) == np.argmax(aggregate(probs[sel], method, weights[sel]))


def test_aggregate_by_image_hard_tie():
    ids = ["x", "x", "y"]
    probs = np.array([[0.55, 0.45], [0.05, 0.95], [0.9, 0.1]])
    out_ids, out = aggregate_by_image(ids, probs, "hard")
    assert out_ids == ["x", "y"]
    assert list(np.argmax(out, axis=1)) == [1, 0]


def test_aggregate_by_image_length_mismatch():
    with pytest.raises(ValueError, match="2 image_ids for 3"):
        aggregate_by_image(["a", "b"], PROBS)


def test_module_imports_only_stdlib_and_numpy():
    tree = ast.parse(Path(aggregation.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "aggregation.py ships alone: no relative imports"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "collections", "numpy"}
