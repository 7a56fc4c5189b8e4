"""Temperature scaling: ECE / Brier / NLL, the fit, the engine and pipeline, evaluate, finalize and CV."""

import importlib
import json
import math

import numpy as np
import pytest
from tiny_models import tiny_model, tissue_image

from hf_histo.cli import main
from hf_histo.data.synthetic import CLASS_NAMES, make_synthetic_dataset
from hf_histo.data.transforms import make_image_processor
from hf_histo.hub import save_for_hub
from hf_histo.inference.calibration import (
    calibrate_result,
    calibration_record,
    fit_temperature,
    uncalibrated,
    with_temperature,
)
from hf_histo.inference.engine import InferenceEngine
from hf_histo.inference.evaluate import evaluate_model
from hf_histo.inference.loading import load_engine
from hf_histo.inference.metrics import calibration_metrics, classification_metrics
from hf_histo.inference.pipeline import HistoImageClassificationPipeline, register_pipeline_task
from hf_histo.inference.plots import plot_reliability_diagram
from hf_histo.inference.results import ImageLevelResult
from hf_histo.models import HistoClassifierConfig, HistoClassifierForImageClassification
from hf_histo.models.aggregation import apply_temperature
from hf_histo.training.arguments import parse_args
from hf_histo.training.cross_validation import run_cross_validation, summarize_folds


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sampled(n: int, n_classes: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits, and labels drawn from softmax(logits / temperature): the calibrated model is logits / T."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, n_classes)) * 3.0
    truth = softmax(logits / temperature)
    y = (rng.random(n)[:, None] > truth.cumsum(axis=1)).sum(axis=1)
    return logits, y


# ---- metrics ------------------------------------------------------------------------------------------------------
def test_calibration_metrics_by_hand():
    # confidences 0.7 (bin 10 of 15, correct) and 0.6 (bin 8, correct): ECE = (0.3 + 0.4) / 2
    out = calibration_metrics([0, 1], [[0.7, 0.3], [0.4, 0.6]])
    assert out["ece"] == pytest.approx(0.35)
    assert out["brier"] == pytest.approx((0.09 + 0.09 + 0.16 + 0.16) / 2)
    assert out["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.6)) / 2)


def test_ece_pools_a_bin_and_weights_bins_by_size():
    # three images at confidence 0.9 (bin 13), two right: |2/3 - 0.9|; one at 0.5 (bin 7), wrong: |0 - 0.5|
    probs = [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2]]
    y = [0, 1, 2, 1]
    out = calibration_metrics(y, probs)
    assert out["ece"] == pytest.approx(0.75 * abs(2 / 3 - 0.9) + 0.25 * 0.5)
    onehot = np.eye(3)[y]
    assert out["brier"] == pytest.approx(np.mean(np.sum((np.array(probs) - onehot) ** 2, axis=1)))
    assert out["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.9, 0.05, 0.3])))
    assert calibration_metrics([0], [[1.0, 0.0]])["ece"] == pytest.approx(0.0)  # confidence 1: the last bin


def test_classification_metrics_report_ece_brier_nll():
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    out = classification_metrics([0, 1, 1], probs, ["a", "b"])
    assert out["ece"] == pytest.approx(calibration_metrics([0, 1, 1], probs)["ece"])
    assert {"brier", "nll", "macro_f1", "auroc"} <= set(out)
    empty = classification_metrics([], np.zeros((0, 2)), ["a", "b"])
    assert empty["ece"] is None and empty["brier"] is None and empty["nll"] is None


# ---- fit and apply ------------------------------------------------------------------------------------------------
def test_fit_temperature_recovers_the_temperature_of_synthetic_logits():
    for true_t in (0.5, 2.0):
        logits, y = sampled(6000, 4, true_t, seed=1)
        fitted = fit_temperature(softmax(logits), y)
        assert fitted == pytest.approx(true_t, rel=0.1)


def test_temperature_scaling_lowers_nll_of_an_over_confident_model():
    logits, y = sampled(3000, 4, 1.0, seed=2)
    over = softmax(logits / 0.3)  # sharpened: a model that believes itself far more than it should
    t = fit_temperature(over, y)
    assert t == pytest.approx(1 / 0.3, rel=0.15)
    before, after = calibration_metrics(y, over), calibration_metrics(y, apply_temperature(over, t))
    assert after["nll"] < before["nll"] - 0.1 and after["ece"] < before["ece"] and after["brier"] < before["brier"]
    record, crossed = calibration_record(over, y, t, "validation")
    assert record["after"]["nll"] < record["before"]["nll"] and record["cross_fit_folds"] == 5
    assert record["after_in_sample"]["nll"] <= record["after"]["nll"] + 1e-3  # in-sample is the optimistic one
    assert crossed.shape == over.shape and (crossed.argmax(1) == over.argmax(1)).all()


def test_apply_temperature_keeps_argmax_and_rows_sum_to_one():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(size=(50, 5)) * 4)
    probs[0] = [1.0, 0.0, 0.0, 0.0, 0.0]  # a unanimous hard vote: zeros are clipped, not NaN
    for t in (0.1, 0.7, 3.0, 20.0):
        scaled = apply_temperature(probs, t)
        assert np.isfinite(scaled).all() and np.allclose(scaled.sum(1), 1)
        assert (scaled.argmax(1) == probs.argmax(1)).all()
    assert np.array_equal(apply_temperature(probs, None), probs)
    assert apply_temperature(probs[1], 2.0).shape == (5,)
    assert (apply_temperature(probs, 3.0).max(1) < probs.max(1) + 1e-12).all()  # T > 1 softens
    with pytest.raises(ValueError, match="temperature must be > 0"):
        apply_temperature(probs, 0.0)


def test_config_temperature_is_validated_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="calibration_temperature must be > 0"):
        HistoClassifierConfig(calibration_temperature=0.0)
    config = HistoClassifierConfig(calibration_temperature=1.5)
    config.save_pretrained(tmp_path)
    assert HistoClassifierConfig.from_pretrained(tmp_path).calibration_temperature == 1.5
    assert HistoClassifierConfig().calibration_temperature is None


def test_calibrate_result_scales_probs_and_keeps_the_raw_ones():
    logits, y = sampled(40, 3, 1.0, seed=3)
    raw = ImageLevelResult.from_predictions(
        ["a", "b", "c"],
        [f"i{k}" for k in range(40)],
        y,
        softmax(logits / 0.3),
        aggregation="soft",
        tta="none",
        n_bootstrap=10,
    )
    calibrated, t, crossed = calibrate_result(raw, "validation")
    assert t > 1 and calibrated.temperature == t and crossed.shape == (40, 3)
    np.testing.assert_allclose(calibrated.probs_array, apply_temperature(raw.probs_array, t))
    assert calibrated.metrics["macro_f1"] == raw.metrics["macro_f1"] and calibrated.ci == raw.ci
    assert calibrated.metrics["nll"] < raw.metrics["nll"]
    record = calibrated.calibration
    assert record["fitted_on"] == "validation" and record["n_images"] == 40 and record["temperature"] == t
    assert record["before"]["nll"] == pytest.approx(raw.metrics["nll"])
    back = uncalibrated(ImageLevelResult.from_dict(json.loads(json.dumps(calibrated.to_dict()))))
    np.testing.assert_allclose(back.probs_array, raw.probs_array)
    assert back.temperature is None and calibrate_result(with_temperature(raw, None, None), "x")[1] is not None
    one = ImageLevelResult.from_predictions(["a", "b"], ["i"], [0], [[0.6, 0.4]], aggregation="soft", tta="none")
    assert calibrate_result(one, "validation")[1] is None  # fewer than 2 labelled images: nothing fitted


def test_reliability_diagram_is_written(tmp_path):
    logits, y = sampled(200, 3, 1.0, seed=4)
    over = softmax(logits / 0.3)
    path = plot_reliability_diagram(y, over, apply_temperature(over, 3.0), tmp_path / "reliability_diagram.png")
    assert path.stat().st_size > 5000
    assert plot_reliability_diagram(y, over, None, tmp_path / "before.png").is_file()


# ---- engine, pipeline, evaluate -----------------------------------------------------------------------------------
def test_engine_and_pipeline_apply_the_config_temperature_unless_told_not_to():
    model, processor, image = tiny_model(calibration_temperature=0.25), make_image_processor(32), tissue_image()
    engine = InferenceEngine(model, processor)
    calibrated, raw = engine.predict(image), InferenceEngine(model, processor, calibrate=False).predict(image)
    assert calibrated.temperature == 0.25 and raw.temperature is None
    np.testing.assert_allclose(calibrated.probs, apply_temperature(raw.probs, 0.25))
    assert calibrated.probs.argmax() == raw.probs.argmax() and not np.allclose(calibrated.probs, raw.probs)

    register_pipeline_task()
    pipe = HistoImageClassificationPipeline(model=model, image_processor=processor)
    labels = engine.labels
    scores = {s["label"]: s["score"] for s in pipe(image, top_k=10)}
    np.testing.assert_allclose([scores[k] for k in labels], calibrated.probs, atol=1e-6)
    plain = {s["label"]: s["score"] for s in pipe(image, top_k=10, calibrate=False)}
    np.testing.assert_allclose([plain[k] for k in labels], raw.probs, atol=1e-6)
    assert pipe(image, return_patches=True)["temperature"] == 0.25
    assert pipe(image, return_patches=True, calibrate=False)["temperature"] is None


FOUR = {i: name for i, name in enumerate(CLASS_NAMES)}


def four_class_model(temperature: float) -> HistoClassifierForImageClassification:
    """A tiny classifier with the synthetic data's 4 classes and a temperature."""
    config = tiny_model().config.to_dict()
    config.update(calibration_temperature=temperature, id2label=FOUR, label2id={v: k for k, v in FOUR.items()})
    return HistoClassifierForImageClassification(HistoClassifierConfig.from_dict(config)).eval()


@pytest.fixture(scope="module")
def labelled_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    data = make_synthetic_dataset(root / "data", n_train=6, n_test=0, size_range=(96, 128), seed=5)
    folder = root / "model"
    save_for_hub(four_class_model(0.5), folder, image_processor=make_image_processor(32))
    return data, folder, root


def test_hf_histo_evaluate_prints_and_writes_ece_brier_nll(labelled_model, capsys):
    data, model, root = labelled_model
    common = [str(data), "--model", str(model), "--n_bootstrap", "10", "--num_workers", "0"]
    assert main(["evaluate", *common, "--out", str(root / "metrics.json")]) == 0
    printed = capsys.readouterr().out
    written = json.loads((root / "metrics.json").read_text())
    assert {"ece", "brier", "nll"} <= set(written["metrics"]) and written["temperature"] == 0.5
    assert "ECE / Brier / NLL" in printed and f"{written['metrics']['nll']:.3f}" in printed
    assert "temperature 0.5" in printed

    assert main(["evaluate", *common, "--out", str(root / "raw.json"), "--no_calibration"]) == 0
    assert "uncalibrated" in capsys.readouterr().out
    raw = json.loads((root / "raw.json").read_text())
    assert raw["temperature"] is None
    np.testing.assert_allclose(apply_temperature(raw["probs"], 0.5), written["probs"], atol=1e-6)


def test_load_engine_refuses_folds_with_different_temperatures(labelled_model, tmp_path):
    _, model, _ = labelled_model
    other = tmp_path / "other"
    save_for_hub(four_class_model(2.0), other, image_processor=make_image_processor(32))
    with pytest.raises(ValueError, match="different temperatures"):
        load_engine([model, other], device="cpu")
    assert load_engine([model, other], device="cpu", calibrate=False).calibrate is False
    assert load_engine([model, model], device="cpu").temperature == 0.5


# ---- cross-validation ---------------------------------------------------------------------------------------------
def _fake_folds(root, n_folds=3, per_fold=20):
    logits, y = sampled(n_folds * per_fold, 3, 1.0, seed=6)
    probs = softmax(logits / 0.3)
    dirs = []
    for k in range(n_folds):
        rows = slice(k * per_fold, (k + 1) * per_fold)
        fold = root / f"fold_{k}"
        fold.mkdir(parents=True)
        ids = [f"img{i}" for i in range(rows.start, rows.stop)]
        result = ImageLevelResult.from_predictions(
            ["a", "b", "c"], ids, y[rows], probs[rows], aggregation="soft", tta="none", n_bootstrap=10
        )
        result.save(fold / "metrics.json", run={"recipe": "x"}, global_step=2)
        (fold / "config.json").write_text(json.dumps({"model_type": "histo_classifier", "tta": "none"}))
        dirs.append(fold)
    return dirs, probs, y


def test_summarize_folds_fits_one_oof_temperature_and_rewrites_every_fold(tmp_path):
    dirs, probs, y = _fake_folds(tmp_path)
    summary = summarize_folds(dirs, tmp_path, n_bootstrap=10)
    t = summary["temperature"]
    assert t == pytest.approx(fit_temperature(probs, y)) and t > 1
    assert summary["oof"]["calibration"]["fitted_on"] == "out_of_fold"
    assert summary["oof"]["calibration"]["after"]["nll"] < summary["oof"]["calibration"]["before"]["nll"]
    assert {"ece", "brier", "nll"} <= set(summary["mean"]) and (tmp_path / "reliability_diagram.png").is_file()
    for k, fold in enumerate(dirs):
        assert json.loads((fold / "config.json").read_text())["calibration_temperature"] == t
        metrics = json.loads((fold / "metrics.json").read_text())
        assert metrics["run"] == {"recipe": "x"} and metrics["temperature"] == t
        np.testing.assert_allclose(metrics["probs"], apply_temperature(probs[k * 20 : (k + 1) * 20], t))
        assert metrics["metrics"]["nll"] == pytest.approx(summary["folds"][k]["image"]["nll"])
    # summarizing again starts from the uncalibrated probabilities: the same temperature, not T twice
    again = summarize_folds(dirs, tmp_path, n_bootstrap=10)
    assert again["temperature"] == pytest.approx(t)
    np.testing.assert_allclose(again["oof"]["probs"], summary["oof"]["probs"])
    # --no_calibrate: the folds are uncalibrated again
    plain = summarize_folds(dirs, tmp_path, n_bootstrap=10, calibrate=False)
    assert (
        plain["temperature"] is None
        and json.loads((dirs[0] / "config.json").read_text())["calibration_temperature"] is None
    )
    np.testing.assert_allclose(json.loads((dirs[0] / "metrics.json").read_text())["probs"], probs[:20])


# ---- end of training ----------------------------------------------------------------------------------------------
FAST = ["--max_steps", "2", "--use_cpu", "--image_size", "32", "--per_device_train_batch_size", "8"]
FAST += ["--dataloader_num_workers", "0", "--n_bootstrap", "10", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration_runs")
    data = make_synthetic_dataset(root / "data", n_train=16, n_test=0, size_range=(96, 160), seed=3)
    return data, root


def _train(recipe_name: str, data, out, *argv: str):
    recipe = importlib.import_module(f"hf_histo.recipes.{recipe_name}")
    args = ["--demo", "--data_dir", str(data), "--output_dir", str(out), "--cache_dir", str(out.parent / "cache")]
    parsed = parse_args(recipe.RECIPE_DEFAULTS, argv=[*args, "--patch_size", "64", *argv, *FAST])
    if parsed[0].n_folds:
        return run_cross_validation(recipe.main, *parsed)
    return recipe.main(*parsed)


@pytest.mark.slow
def test_a_run_fits_the_temperature_on_its_validation_images(demo):
    data, root = demo
    out = root / "run"
    returned = _train("vit_differential_lr", data, out, "--val_fraction", "0.5")
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    record, t = metrics["calibration"], config["calibration_temperature"]
    assert t is not None and metrics["temperature"] == t == record["temperature"] == returned.temperature
    assert record["fitted_on"] == "validation" and record["n_images"] == metrics["metrics"]["n"]
    assert {"before", "after", "after_in_sample"} <= set(record) and set(record["after"]) == {"ece", "brier", "nll"}
    np.testing.assert_allclose(metrics["probs"], apply_temperature(record["uncalibrated_probs"], t))
    assert (out / "reliability_diagram.png").is_file() and (out / "plots" / "reliability_diagram.png").is_file()
    card = (out / "README.md").read_text()
    assert "reliability_diagram.png" in card and f"T = {t:.4g}" in card and "| ece |" in card
    # the engine with the saved model gives the figures of metrics.json
    evaluated = evaluate_model(out, data, None, progress=False, n_bootstrap=10)
    got = dict(zip(evaluated.image_ids, evaluated.probs_array))
    for image_id, probs in zip(metrics["image_ids"], metrics["probs"]):
        np.testing.assert_allclose(got[image_id], probs, atol=1e-5)

    off = root / "uncalibrated"
    _train("vit_differential_lr", data, off, "--val_fraction", "0.5", "--no_calibrate")
    assert json.loads((off / "config.json").read_text())["calibration_temperature"] is None
    assert json.loads((off / "metrics.json").read_text())["calibration"] is None
    assert not (off / "reliability_diagram.png").exists()


@pytest.mark.slow
def test_cross_validation_writes_one_oof_temperature_that_the_folds_and_ensemble_reproduce(demo):
    data, root = demo
    out = root / "cv"
    summary = _train("resnet_scratch", data, out, "--n_folds", "2", "--stride", "64")
    t = summary["temperature"]
    assert t is not None and summary["oof"]["calibration"]["fitted_on"] == "out_of_fold"
    saved = json.loads((out / "cv_metrics.json").read_text())
    assert saved["temperature"] == t and (out / "reliability_diagram.png").is_file()
    for k in range(2):
        fold = out / f"fold_{k}"
        assert json.loads((fold / "config.json").read_text())["calibration_temperature"] == t
        metrics = json.loads((fold / "metrics.json").read_text())
        assert metrics["temperature"] == t
        # a one-fold "ensemble" is the fold model: it reproduces the fold's rewritten figures
        engine = load_engine([fold], device="cpu")
        assert engine.temperature == t
        evaluated = evaluate_model([fold], data, None, progress=False, n_bootstrap=10)
        got = dict(zip(evaluated.image_ids, evaluated.probs_array))
        for image_id, probs in zip(metrics["image_ids"], metrics["probs"]):
            np.testing.assert_allclose(got[image_id], probs, atol=1e-5)
    assert load_engine(out, device="cpu").temperature == t  # the CV root's ensemble applies the OOF temperature
