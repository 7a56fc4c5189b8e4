"""Tests for patch/image metrics, bootstrap intervals, the streaming accumulator and plots."""

import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from hf_histo.models.aggregation import aggregate_by_image
from hf_histo.training.metrics import (
    PatchPredictionAccumulator,
    bootstrap_ci,
    classification_metrics,
    image_level_metrics,
    make_compute_metrics,
    plot_confusion_matrix,
    plot_training_curves,
)

LABELS = ["HER2(+)", "Luminal A", "Luminal B", "Triple negative"]


def _patch_data(n_images=12, seed=0, n_classes=4):
    rng = np.random.default_rng(seed)
    image_labels = rng.integers(0, n_classes, size=n_images)
    ids, labels, probs, fg = [], [], [], []
    for i, y in enumerate(image_labels):
        for _ in range(rng.integers(1, 6)):
            ids.append(f"img_{i:03d}")
            labels.append(y)
            p = rng.dirichlet(np.ones(n_classes))
            p[y] += rng.random()  # informative but noisy
            probs.append(p / p.sum())
            fg.append(rng.random())
    order = rng.permutation(len(ids))  # patches of one image need not be contiguous
    return (
        [ids[i] for i in order],
        np.array(probs)[order],
        np.array(labels)[order],
        np.array(fg)[order],
    )


def test_classification_metrics_hand_computed():
    y_true = [0, 0, 1, 1, 2, 3]
    probs = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],  # 0 ok
            [0.1, 0.6, 0.2, 0.1],  # 0 -> 1
            [0.2, 0.5, 0.2, 0.1],  # 1 ok
            [0.1, 0.7, 0.1, 0.1],  # 1 ok
            [0.1, 0.1, 0.7, 0.1],  # 2 ok
            [0.1, 0.1, 0.6, 0.2],  # 3 -> 2
        ]
    )
    m = classification_metrics(y_true, probs, LABELS)
    assert set(m) == {
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "per_class_f1",
        "auroc",
        "kappa",
        "confusion_matrix",
        "n",
    }
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recalls 1/2, 1, 1, 0 -> 0.625
    assert m["balanced_accuracy"] == pytest.approx(0.625)
    # f1: class0 2/3, class1 0.8, class2 2/3, class3 0
    assert m["per_class_f1"] == pytest.approx(
        {"HER2(+)": 2 / 3, "Luminal A": 0.8, "Luminal B": 2 / 3, "Triple negative": 0.0}
    )
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 2 / 3) / 4)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]]
    y_pred = probs.argmax(1)
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y_true, y_pred))
    assert m["auroc"] == pytest.approx(roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))


def test_classification_metrics_match_sklearn_random():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4), 200)
    y_pred = probs.argmax(1)
    m = classification_metrics(y_true, probs, LABELS)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y_true, y_pred))
    assert m["auroc"] == pytest.approx(roc_auc_score(y_true, probs, multi_class="ovr"))


def test_classification_metrics_accepts_label_names():
    probs = np.eye(4)[[0, 1, 3]]
    m = classification_metrics(["HER2(+)", "Luminal A", "Triple negative"], probs, LABELS)
    assert m["accuracy"] == 1.0


def test_auroc_over_present_classes_and_none_for_one_class():
    probs = np.array([[0.6, 0.4, 0.0, 0.0], [0.3, 0.7, 0.0, 0.0], [0.8, 0.2, 0.0, 0.0]])
    m = classification_metrics([0, 1, 0], probs, LABELS)
    assert m["auroc"] == pytest.approx(1.0)  # classes 2 and 3 are absent: computed over 0 and 1
    single = classification_metrics([2, 2], np.array([[0, 0, 1, 0], [0, 1, 0, 0.0]]), LABELS)
    assert single["auroc"] is None
    assert single["macro_f1"] == pytest.approx(f1_score([2, 2], [2, 1], average="macro", zero_division=0))


def test_classification_metrics_empty_and_invalid():
    empty = classification_metrics([], np.zeros((0, 4)), LABELS)
    assert empty["n"] == 0 and empty["macro_f1"] is None
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        classification_metrics([0], np.zeros((1, 3)), LABELS)
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([7], np.zeros((1, 4)), LABELS)
    with pytest.raises(ValueError, match="not in labels"):
        classification_metrics(["Basal"], np.zeros((1, 4)), LABELS)


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy", "balanced_accuracy", "kappa"])
def test_bootstrap_ci_contains_point_estimate_and_is_deterministic(metric):
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 100)
    y_pred = np.where(rng.random(100) < 0.6, y_true, rng.integers(0, 4, 100))
    point = {
        "macro_f1": f1_score(y_true, y_pred, average="macro"),
        "accuracy": np.mean(y_true == y_pred),
        "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
        "kappa": cohen_kappa_score(y_true, y_pred),
    }[metric]
    low, high = bootstrap_ci(y_true, y_pred, metric=metric, seed=3)
    assert low < point < high
    assert high - low < 0.35
    assert bootstrap_ci(y_true, y_pred, metric=metric, seed=3) == (low, high)
    assert bootstrap_ci(y_true, y_pred, metric=metric, seed=4) != (low, high)


def test_bootstrap_vectorised_matches_callable_and_is_fast():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 100)
    y_pred = np.where(rng.random(100) < 0.6, y_true, rng.integers(0, 4, 100))
    start = time.perf_counter()
    fast = bootstrap_ci(y_true, y_pred, "macro_f1", n_boot=1000)
    assert time.perf_counter() - start < 1.0
    slow = bootstrap_ci(y_true, y_pred, lambda t, p: f1_score(t, p, average="macro", zero_division=0), n_boot=200)
    fast200 = bootstrap_ci(y_true, y_pred, "macro_f1", n_boot=200)
    assert fast200 == pytest.approx(slow)
    assert fast[0] < fast[1]


def test_bootstrap_invalid():
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        bootstrap_ci([0, 1], [0, 1], metric="auc")
    with pytest.raises(ValueError, match="equal length"):
        bootstrap_ci([0, 1], [0])


@pytest.mark.parametrize("aggregation", ["soft", "hard", "mask_weighted"])
def test_image_level_metrics_uses_aggregation(aggregation):
    ids, probs, labels, fg = _patch_data()
    m = image_level_metrics(ids, probs, labels, LABELS, aggregation, foreground=fg)
    image_ids, image_probs = aggregate_by_image(ids, probs, aggregation, fg)
    y_img = np.array([labels[ids.index(i)] for i in image_ids])
    assert m == classification_metrics(y_img, image_probs, LABELS)
    assert m["n"] == 12


def test_image_level_metrics_rejects_inconsistent_labels():
    with pytest.raises(ValueError, match="different labels"):
        image_level_metrics(["a", "a"], np.eye(2), [0, 1], ["x", "y"])


@pytest.mark.parametrize("aggregation", ["soft", "hard", "mask_weighted"])
@pytest.mark.parametrize("keep_patch_probs", [True, False])
def test_accumulator_equals_batch_computation(aggregation, keep_patch_probs):
    ids, probs, labels, fg = _patch_data(n_images=20, seed=2)
    acc = PatchPredictionAccumulator(4, keep_patch_probs=keep_patch_probs)
    for start in range(0, len(ids), 7):
        sl = slice(start, start + 7)
        acc.add(ids[sl], probs[sl], labels[sl], fg[sl])
    assert len(acc) == len(ids)
    out = acc.compute(LABELS, aggregation)
    expected_image = image_level_metrics(ids, probs, labels, LABELS, aggregation, foreground=fg)
    expected_patch = classification_metrics(labels, probs, LABELS)
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "kappa", "n"):
        assert out["image"][key] == pytest.approx(expected_image[key])
        assert out["patch"][key] == pytest.approx(expected_patch[key])
    assert out["image"]["confusion_matrix"] == expected_image["confusion_matrix"]
    assert out["patch"]["confusion_matrix"] == expected_patch["confusion_matrix"]
    assert out["image"]["auroc"] == pytest.approx(expected_image["auroc"])
    if keep_patch_probs:
        assert out["patch"]["auroc"] == pytest.approx(expected_patch["auroc"], abs=1e-6)
    else:
        assert out["patch"]["auroc"] is None
    _, image_probs = acc.image_probs(aggregation)
    np.testing.assert_allclose(image_probs, aggregate_by_image(ids, probs, aggregation, fg)[1], atol=1e-9)


def test_accumulator_unlabelled_patches_and_errors():
    acc = PatchPredictionAccumulator(2)
    acc.add(["a", "b"], np.array([[0.9, 0.1], [0.2, 0.8]]), [0, -1])
    out = acc.compute(["x", "y"])
    assert out["image"]["n"] == 1 and out["patch"]["n"] == 1
    with pytest.raises(ValueError, match="different labels"):
        acc.add(["a"], np.array([[0.5, 0.5]]), [1])
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        acc.add(["c"], np.array([[0.5, 0.3, 0.2]]), [1])


def test_make_compute_metrics_for_trainer():
    ids, probs, labels, fg = _patch_data(n_images=15, seed=4)
    logits = np.log(probs) + 3.0  # softmax(logits) == probs
    fn = make_compute_metrics(LABELS, ids, foreground_eval=fg, aggregation="hard")
    out = fn(SimpleNamespace(predictions=(logits, None), label_ids=labels))
    image = image_level_metrics(ids, probs, labels, LABELS, "hard", fg)
    patch = classification_metrics(labels, probs, LABELS)
    assert out["image_macro_f1"] == pytest.approx(image["macro_f1"])
    assert out["image_balanced_accuracy"] == pytest.approx(image["balanced_accuracy"])
    assert out["image_kappa"] == pytest.approx(image["kappa"])
    assert out["patch_accuracy"] == pytest.approx(patch["accuracy"])
    assert out["patch_auroc"] == pytest.approx(patch["auroc"])
    assert out["image_n"] == 15
    assert {"image_accuracy", "image_auroc", "patch_macro_f1", "patch_balanced_accuracy", "patch_kappa"} <= set(out)
    assert all(isinstance(v, float) for v in out.values())
    with pytest.raises(ValueError, match="eval predictions"):
        fn(SimpleNamespace(predictions=logits[:-1], label_ids=labels[:-1]))


def test_make_compute_metrics_nan_when_undefined():
    fn = make_compute_metrics(["x", "y"], ["a", "a"])
    out = fn(SimpleNamespace(predictions=np.array([[2.0, 0.0], [1.0, 0.0]]), label_ids=np.array([0, 0])))
    assert np.isnan(out["image_auroc"]) and out["image_accuracy"] == 1.0
    with pytest.raises(ValueError, match="needs foreground_eval"):
        make_compute_metrics(["x", "y"], ["a"], aggregation="mask_weighted")


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_confusion_matrix(tmp_path):
    path = plot_confusion_matrix(
        [[5, 1, 0, 0], [2, 7, 1, 0], [0, 0, 4, 0], [0, 0, 0, 0]], LABELS, tmp_path / "cm.png", title="val"
    )
    assert _is_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temp files left behind
    with pytest.raises(ValueError, match="4x4"):
        plot_confusion_matrix([[1, 2], [3, 4]], LABELS, tmp_path / "bad.png")


def test_plot_training_curves(tmp_path):
    history = [
        {"loss": 1.4 - 0.1 * s, "learning_rate": 1e-4 * (1 - s / 10), "epoch": s / 5, "step": s} for s in range(1, 10)
    ]
    history += [
        {
            "eval_loss": 1.2,
            "eval_image_macro_f1": 0.4,
            "eval_patch_macro_f1": 0.35,
            "eval_runtime": 1.0,
            "eval_image_n": 20.0,
            "step": 5,
        },
        {"eval_loss": 1.0, "eval_image_macro_f1": 0.5, "eval_patch_macro_f1": float("nan"), "step": 9},
        {"train_runtime": 12.0, "train_loss": 1.0, "step": 9},
    ]
    assert _is_png(plot_training_curves(history, tmp_path / "curves.png"))
    assert _is_png(plot_training_curves([], tmp_path / "empty.png"))


@pytest.mark.parametrize(
    ("metric", "reference"),
    [
        ("accuracy", lambda t, p: np.mean(t == p)),
        ("balanced_accuracy", balanced_accuracy_score),
        ("macro_f1", lambda t, p: f1_score(t, p, average="macro", zero_division=0)),
        ("kappa", cohen_kappa_score),
    ],
)
def test_bootstrap_named_metrics_equal_sklearn_per_resample(metric, reference):
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, 4, 40)
    y_pred = np.where(rng.random(40) < 0.5, y_true, rng.integers(0, 4, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = bootstrap_ci(y_true, y_pred, reference, n_boot=100, seed=1)
    assert bootstrap_ci(y_true, y_pred, metric, n_boot=100, seed=1) == pytest.approx(expected)
