"""Quiet output: each message once, no needless warnings, runs that end with a summary, honest plots and card."""

import json
import logging
import runpy
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_model

from hf_histo.cli import main as cli_main
from hf_histo.data.sources import Sample
from hf_histo.data.splits import fold_assignments, split_samples
from hf_histo.data.synthetic import make_synthetic_dataset
from hf_histo.hub import build_model_card
from hf_histo.inference.plots import training_curve_points
from hf_histo.inference.results import ImageLevelResult
from hf_histo.training.arguments import parse_args
from hf_histo.training.summary import run_summary

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
# No --use_cpu: on a machine without CUDA, pinned memory must be off by default (else torch warns per loader).
FAST = ["--max_steps", "1", "--image_size", "32", "--per_device_train_batch_size", "8"]
FAST += ["--dataloader_num_workers", "0", "--n_bootstrap", "20", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    make_synthetic_dataset(root / "data", n_train=12, n_test=2, size_range=(160, 240), seed=0)
    return root / "data"


def run_recipe(name: str, *argv: str) -> list[warnings.WarningMessage]:
    """Run a recipe through its real `__main__`; returns every warning it raised (none hidden by earlier tests)."""
    old = sys.argv
    sys.argv = [str(RECIPES_DIR / f"{name}.py"), *argv]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = old
    return caught


def _samples(labels: list[str], groups: list[str]) -> list[Sample]:
    return [Sample(None, None, label, f"im{i:02d}", group) for i, (label, group) in enumerate(zip(labels, groups))]


# ---- each message once ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_prints_each_step_once_without_needless_warnings(tmp_path, capfd):
    out = tmp_path / "demo"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(["demo", "--quick", "--out", str(out)]) == 0
    captured = capfd.readouterr()
    lines = [line.strip() for line in (captured.out + captured.err).splitlines() if line.strip()]
    bars = ("%|", "it/s]", "\x1b[")  # progress bars redraw themselves
    messages = [line for line in lines if not any(bar in line for bar in bars)]
    repeated = {line for line in messages if messages.count(line) > 1}
    assert not repeated, repeated
    said_by_demo = [
        line.removeprefix("[hf-histo demo]").strip() for line in lines if line.startswith("[hf-histo demo]")
    ]
    assert [text.split()[0] for text in said_by_demo if text[0].isdigit()] == [f"{k}/7" for k in range(1, 8)]
    assert all(sum(text in line for line in lines) == 1 for text in said_by_demo)  # not echoed by a log handler
    said = lines + [str(w.message) for w in caught]
    assert not any(word in line for line in said for word in ("pin_memory", "stratify", "--num_processes"))
    assert sum("patches per image" in line for line in lines) == 1  # the build summary, once
    assert any(line.startswith("test image macro-F1") and "95% CI" in line for line in lines)
    assert any(line.startswith("hf-histo predict") and "--model" in line for line in lines)
    card = (out / "model" / "README.md").read_text()
    assert "Image macro-F1 on the test images" in card and "95% CI" in card and "validation split" not in card


# ---- the recipes' end-of-run summary --------------------------------------------------------------------------------
def test_recipe_ends_with_one_summary_naming_the_model_and_the_next_commands(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--demo", "--data_dir", str(demo_data), "--cache_dir", str(tmp_path / "cache"), *FAST]
    caught = run_recipe("phikon_frozen", *common, "--output_dir", str(out))
    text = capsys.readouterr().out
    assert not [w for w in caught if "pin_memory" in str(w.message)]  # on CPU: pinned memory off by default
    assert not [w for w in caught if "stratify" in str(w.message)]  # 12 images in 10 would-be folds: not asked
    assert text.count("hf-histo run summary") == 1
    summary = text[text.index("hf-histo run summary") :]
    assert f"model       {out}" in summary and "kept        epoch" in summary and "checkpoint-1" in summary
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"validation  image macro-F1 {metrics['metrics']['macro_f1']:.3f} (95% CI" in summary
    assert f"hf-histo predict {demo_data} --model {out} --out submission.csv" in summary
    assert f"--model {out}" in summary.split("hf-histo evaluate")[1] and f"hf-histo explain {demo_data}" in summary
    assert f"hf-histo app --model {out}" in summary

    # --val_fraction 0: no validation split, so no evaluation during training and no validation figure.
    flat = tmp_path / "no_validation"
    run_recipe("phikon_frozen", *common, "--val_fraction", "0", "--output_dir", str(flat))
    summary = capsys.readouterr().out.split("hf-histo run summary")[1]
    assert "no validation figure" in summary and "epoch" in summary and f"--model {flat}" in summary
    assert not (flat / "metrics.json").exists()


@pytest.mark.slow
def test_cross_validation_summary_has_mean_and_std_over_folds(demo_data, tmp_path, capsys):
    out = tmp_path / "cv"
    argv = ["--demo", "--data_dir", str(demo_data), "--cache_dir", str(tmp_path / "cache"), "--n_folds", "2"]
    run_recipe("resnet_scratch", *argv, "--patch_size", "64", "--stride", "64", "--output_dir", str(out), *FAST)
    text = capsys.readouterr().out
    assert text.count("hf-histo run summary") == 1  # once at the end, not once per fold
    summary = text.split("hf-histo run summary")[1]
    cv = json.loads((out / "cv_metrics.json").read_text())
    assert f"image macro-F1 {cv['image_macro_f1']} (mean ± std over 2 folds" in summary and "±" in summary
    assert "out-of-fold" in summary and "no model selection on the held-out fold" in summary
    assert f"hf-histo predict {demo_data} --model {out} " in summary and f"--model {out / 'fold_0'}" in summary


def test_run_summary_without_validation_says_so(tmp_path):
    training_args = SimpleNamespace(output_dir=str(tmp_path), load_best_model_at_end=False, process_index=0)
    text = run_summary(training_args, SimpleNamespace(data_dir="DATA_DIR", val_fraction=0.0))
    assert "validation  none (--val_fraction 0): no validation figure" in text
    assert "hf-histo predict DATA_DIR --model" in text and "hf-histo evaluate LABELLED_TEST_DATA" in text


# ---- defaults that keep the output quiet ----------------------------------------------------------------------------
def test_pin_memory_and_eval_strategy_defaults_follow_the_machine_and_the_split(tmp_path):
    base = ["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    args = parse_args({}, argv=base)[2]
    assert args.dataloader_pin_memory is torch.cuda.is_available() and args.eval_strategy == "epoch"
    assert parse_args({}, argv=[*base, "--dataloader_pin_memory", "true"])[2].dataloader_pin_memory is True
    assert parse_args({"dataloader_pin_memory": True}, argv=base)[2].dataloader_pin_memory is True
    flat = parse_args({}, argv=[*base, "--val_fraction", "0"])[2]
    assert flat.eval_strategy == "no" and not flat.load_best_model_at_end
    assert parse_args({}, argv=[*base, "--val_fraction", "0", "--n_folds", "3"])[2].eval_strategy == "epoch"


def test_a_plain_split_does_not_warn_about_folds_but_says_which_classes_it_misses(caplog):
    samples = _samples(["a"] * 3 + ["b"] * 3 + ["c"], ["g1"] * 3 + ["g2"] * 3 + ["g3"])  # cannot be stratified
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="hf_histo"):
        warnings.simplefilter("error")
        train, validation = split_samples(samples, val_fraction=0.1)
    assert validation and not {s.group_id for s in train} & {s.group_id for s in validation}
    missing = sorted({s.label for s in train} - {s.label for s in validation})
    assert f"has no image of {', '.join(missing)}" in caplog.text and "fold" not in caplog.text
    # Folds the user asked for still warn, once per process however many folds ask.
    folds = _samples(["a"] * 4 + ["b"] * 4, ["g1", "g1", "g2", "g2", "g3", "g3", "g4", "g4"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            fold_assignments(folds, n_folds=3, seed=7)
    assert len([w for w in caught if "cannot stratify" in str(w.message)]) == 1


# ---- plots and card -------------------------------------------------------------------------------------------------
def test_training_curves_leave_out_what_was_logged_after_training():
    history = [
        {"loss": 1.2, "learning_rate": 1e-3, "epoch": 1.0, "step": 5},
        {"eval_loss": 1.0, "eval_image_macro_f1": 0.4, "eval_runtime": 0.1, "epoch": 1.0, "step": 5},
        {"loss": 0.8, "learning_rate": 5e-4, "epoch": 2.0, "step": 10},
        {"eval_loss": 0.9, "eval_image_macro_f1": 0.6, "epoch": 2.0, "step": 10},
        {"eval_loss": 2.5, "eval_image_macro_f1": 0.1, "epoch": 2.0, "step": 10},  # a second evaluation, same step
        {"train_runtime": 3.0, "train_loss": 1.0, "epoch": 2.0, "step": 10},
        {"eval_loss": 0.95, "eval_image_macro_f1": 0.55, "epoch": 2.0, "step": 10},  # the reloaded best checkpoint
        {"loss": 9.0, "epoch": 2.0, "step": 10},
    ]
    points = training_curve_points(history)
    assert points["loss"] == [(5, 1.2), (10, 0.8)] and points["learning_rate"] == [(5, 1e-3), (10, 5e-4)]
    assert points["eval_loss"] == [(5, 1.0), (10, 0.9)] and points["eval_image_macro_f1"] == [(5, 0.4), (10, 0.6)]
    assert "eval_runtime" not in points and "train_loss" not in points


def test_card_of_held_out_images_says_test_and_shows_the_ci():
    result = ImageLevelResult.from_predictions(
        ["HER2(+)", "Luminal A", "Luminal B"],
        [f"img_{i}" for i in range(6)],
        [0, 1, 2, 0, 1, 2],
        [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.3, 0.6, 0.1], [0.1, 0.7, 0.2], [0.1, 0.1, 0.8]],
        aggregation="soft",
        tta="none",
        split="test_manifest.csv",
        n_bootstrap=50,
    )
    text = str(build_model_card(tiny_model().config, result=result, split="test"))
    low, high = result.ci["macro_f1"]
    headline = f"Image macro-F1 on the test images: {result.metrics['macro_f1']:.3f} (95% CI {low:.3f} to {high:.3f}"
    assert headline in text and "On the test split (6 labelled images)" in text
    assert "split: test\n" in text and "test_manifest.csv" not in text and "validation" not in text
    assert "used neither for training nor for choosing the checkpoint" in text
    validation = str(build_model_card(tiny_model().config, result=result, split="validation",
                                      training_args={"load_best_model_at_end": True}))  # fmt: skip
    assert "they also chose the best checkpoint: the figures are optimistic" in validation
