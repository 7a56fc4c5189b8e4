"""Classification metrics and bootstrap intervals, the Trainer's streaming image-level metrics, and plots."""

import math
import warnings

import datasets
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score
from transformers import EvalPrediction

from hf_histo.inference.metrics import METRIC_KEYS, bootstrap_ci, classification_metrics
from hf_histo.inference.plots import plot_confusion_matrix, plot_training_curves
from hf_histo.models.aggregation import aggregate_by_image
from hf_histo.training.metrics import ImageLevelMetrics, dataset_column

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
        "ece",
        "brier",
        "nll",
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
    low, high = bootstrap_ci(y_true, y_pred, metric=metric, n_boot=100, seed=3)
    assert low < point < high
    assert high - low < 0.35
    assert bootstrap_ci(y_true, y_pred, metric=metric, n_boot=100, seed=3) == (low, high)
    assert bootstrap_ci(y_true, y_pred, metric=metric, n_boot=100, seed=4) != (low, high)
    narrow = bootstrap_ci(y_true, y_pred, metric=metric, n_boot=100, alpha=0.5, seed=3)
    assert low < narrow[0] < narrow[1] < high  # a 50% interval sits inside the 95% one


def test_bootstrap_invalid():
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        bootstrap_ci([0, 1], [0, 1], metric="auc")
    with pytest.raises(ValueError, match="equal length"):
        bootstrap_ci([0, 1], [0])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([], [])
    with pytest.raises(ValueError, match="n_boot >= 1"):
        bootstrap_ci([0, 1], [0, 1], n_boot=0)
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        bootstrap_ci([0, 1], [0, 1], alpha=1.0)


def test_bootstrap_undefined_is_nan():
    assert all(math.isnan(v) for v in bootstrap_ci([1], [1]))  # one image: no interval
    low, high = bootstrap_ci([2, 2, 2, 2], [2, 2, 2, 2], "kappa", n_boot=20)  # kappa of one class is undefined
    assert math.isnan(low) and math.isnan(high)


# ---- ImageLevelMetrics: the Trainer's compute_metrics, fed patch probabilities batch by batch ----------------------
def _rows(ids, foreground=None) -> datasets.Dataset:
    columns = {"image_id": list(ids), "label": [0] * len(ids)}
    if foreground is not None:
        columns["foreground"] = list(foreground)
    return datasets.Dataset.from_dict(columns)


def _stream(metrics, probs, labels, batch=7, as_tuple=False):
    """Feed `metrics` the way Trainer(batch_eval_metrics=True) does; return the last call's output."""
    out = None
    for start in range(0, len(labels), batch):
        stop = min(start + batch, len(labels))
        predictions = torch.tensor(probs[start:stop], dtype=torch.float32)
        eval_prediction = EvalPrediction(
            predictions=(predictions, None) if as_tuple else predictions,
            label_ids=torch.tensor(np.asarray(labels[start:stop])),
        )
        out = metrics(eval_prediction, compute_result=stop == len(labels))
        if stop < len(labels):
            assert out == {}
    return out


@pytest.mark.parametrize("aggregation", ["soft", "hard", "mask_weighted"])
@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_image_level_metrics_equal_the_batch_computation(aggregation, batch):
    ids, probs, labels, fg = _patch_data(n_images=20, seed=2)  # patches of one image are not contiguous
    metrics = ImageLevelMetrics(LABELS, aggregation)
    metrics.start(_rows(ids, fg))
    out = _stream(metrics, probs, labels, batch, as_tuple=batch == 7)
    image_ids, image_probs = aggregate_by_image(
        ids, probs, aggregation, fg if aggregation == "mask_weighted" else None
    )
    image = classification_metrics([labels[ids.index(i)] for i in image_ids], image_probs, LABELS)
    patch = classification_metrics(labels, probs, LABELS)  # the probabilities as given: no second softmax
    for key in METRIC_KEYS:
        assert out[f"image_{key}"] == pytest.approx(image[key], abs=1e-6), key
        assert out[f"patch_{key}"] == pytest.approx(patch[key], abs=1e-6), key
    assert out["image_n"] == 20 and out["patch_n"] == len(ids)
    assert set(out) == {f"{level}_{key}" for level in ("image", "patch") for key in (*METRIC_KEYS, "n")}
    assert all(isinstance(v, float) for v in out.values())


def test_image_level_metrics_reset_between_evaluations():
    ids, probs, labels, fg = _patch_data(n_images=10, seed=3)
    metrics = ImageLevelMetrics(LABELS, "hard")
    metrics.start(_rows(ids, fg))
    first = _stream(metrics, probs, labels)
    metrics.start(_rows(ids, fg))
    assert _stream(metrics, probs, labels) == first  # nothing of the first evaluation is left behind
    half = len(ids) // 2
    metrics.start(_rows(ids[:half]))
    assert _stream(metrics, probs[:half], labels[:half])["patch_n"] == half


def test_image_level_metrics_mask_weighted_uses_the_foreground_column():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    labels = np.array([0, 0, 0])
    weighted = ImageLevelMetrics(["x", "y"], "mask_weighted")
    weighted.start(_rows(["a", "a", "a"], [1.0, 0.0, 0.0]))  # only the first patch counts: class x
    assert _stream(weighted, probs, labels)["image_accuracy"] == 1.0
    soft = ImageLevelMetrics(["x", "y"], "soft")  # mean: [0.47, 0.53] -> class y
    soft.start(_rows(["a", "a", "a"], [1.0, 0.0, 0.0]))
    assert _stream(soft, probs, labels)["image_accuracy"] == 0.0
    no_foreground = ImageLevelMetrics(["x", "y"], "mask_weighted")  # no column: soft vote
    no_foreground.start(_rows(["a", "a", "a"]))
    assert _stream(no_foreground, probs, labels)["image_accuracy"] == 0.0


def test_image_level_metrics_unlabelled_rows_missing_ids_and_errors():
    metrics = ImageLevelMetrics(["x", "y"])
    metrics.start(_rows(["a", "b"]))
    out = _stream(metrics, np.array([[0.9, 0.1], [0.2, 0.8]]), [0, -1])
    assert out["image_n"] == 1 and out["patch_n"] == 1 and out["image_accuracy"] == 1.0
    assert math.isnan(out["image_auroc"]) and math.isnan(out["patch_kappa"])  # one class: undefined, not an error

    metrics.start(datasets.Dataset.from_dict({"label": [0, 1, 1]}))  # no image_id column: one image per row
    out = _stream(metrics, np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), [0, 1, 1])
    assert out["image_n"] == out["patch_n"] == 3 and out["image_accuracy"] == pytest.approx(2 / 3)

    metrics.start(_rows(["a", "b"]))
    with pytest.raises(ValueError, match="eval dataset has 2 rows"):
        _stream(metrics, np.full((3, 2), 0.5), [0, 1, 1])


def test_dataset_column_reads_raw_values_of_a_formatted_dataset():
    ds = _rows(["a", "b"], [0.5, 1.0]).with_transform(lambda batch: {"pixel_values": [0] * len(batch["label"])})
    assert dataset_column(ds, "image_id") == ["a", "b"]
    assert dataset_column(ds, "foreground") == [0.5, 1.0]
    assert dataset_column(ds, "mask") is None and dataset_column(None, "image_id") is None


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
