"""Every recipe runs through its real entry point (runpy, patched argv) for a few steps on a tiny backbone."""

import ast
import json
import runpy
import sys
from pathlib import Path

import pytest

from hf_histo.data.synthetic import make_synthetic_dataset
from hf_histo.hub import REQUIRED_FILES, HubUnavailableError, hub_upload_files
from hf_histo.inference.calibration import uncalibrated
from hf_histo.inference.evaluate import evaluate_model
from hf_histo.inference.pipeline import TASK
from hf_histo.inference.results import ImageLevelResult
from hf_histo.models.ensemble import FoldEnsemble

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.py") if p.name != "__init__.py")
CLASSIFIERS = [r for r in RECIPES if r != "roi_segmentation"]  # roi_segmentation: tests/test_segmentation.py
KEYS = {"macro_f1", "balanced_accuracy", "accuracy", "auroc", "kappa", "per_class_f1"}
# Small inputs and few steps: the recipes' own settings stay (strategy, losses, freezing, unfreezing, ...).
FAST = [
    "--max_steps",
    "2",
    "--use_cpu",
    "--image_size",
    "32",
    "--per_device_train_batch_size",
    "8",
    "--dataloader_num_workers",
    "0",
    "--n_bootstrap",
    "20",
    "--disable_tqdm",
    "true",
]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    make_synthetic_dataset(root / "data", n_train=12, n_test=2, size_range=(160, 240), seed=0)
    return root / "data", root / "cache"


def run_recipe(name: str, *argv: str) -> None:
    old = sys.argv
    sys.argv = [str(RECIPES_DIR / f"{name}.py"), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = old


def test_the_recipes_exist():
    assert RECIPES == sorted(
        [
            "convnext_progressive",
            "efficientnet_frozen_norm",
            "phikon_frozen",
            "phikon_lora",
            "resnet_scratch",
            "roi_segmentation",
            "vit_differential_lr",
        ]
    )


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_reads_top_to_bottom(name):
    source = (RECIPES_DIR / f"{name}.py").read_text()
    tree = ast.parse(source)
    doc = ast.get_docstring(tree)
    assert doc and f"recipes/{name}.py --data_dir" in doc and "launch" in doc
    names = {n.targets[0].id for n in tree.body if isinstance(n, ast.Assign)}
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "RECIPE_DEFAULTS" in names and "main" in functions
    assert "__main__" in source and len(source.splitlines()) <= 120


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_recipe_runs_on_demo_data(name, demo_data, tmp_path):
    data_dir, cache = demo_data
    out = tmp_path / name
    run_recipe(name, "--demo", "--data_dir", str(data_dir), "--cache_dir", str(cache), "--output_dir", str(out), *FAST)
    metrics = json.loads((out / "metrics.json").read_text())
    assert KEYS <= set(metrics["metrics"]) and KEYS <= set(metrics["patch_metrics"])
    assert metrics["run"]["recipe"] == name and len(metrics["ci"]["macro_f1"]) == 2
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(metrics["image_ids"]) == splits["validation"] and not set(splits["train"]) & set(
        splits["validation"]
    )
    assert (out / "confusion_matrix.png").is_file() and (out / "training_curves.png").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "histo_classifier" and config["patching"]["strategy"]
    assert "lora" not in (out / "model.safetensors").read_bytes()[:20000].decode("latin-1")  # merged at save
    # Hub-ready: the shipped code, the pipeline declaration, the card with the run's figures, the plots.
    assert set(REQUIRED_FILES) <= set(hub_upload_files(out))
    assert TASK in config["custom_pipelines"] and "AutoModelForImageClassification" in config["auto_map"]
    card = (out / "README.md").read_text()
    assert f"{metrics['metrics']['macro_f1']:.3f}" in card and "training_curves.png" in card
    assert (out / "plots" / "training_curves.png").is_file() and (out / "plots" / "confusion_matrix.png").is_file()


def test_phikon_frozen_trains_from_the_embedding_cache(demo_data, tmp_path):
    data_dir, cache = demo_data
    out = tmp_path / "cached"
    run_recipe(
        "phikon_frozen",
        "--demo",
        "--data_dir",
        str(data_dir),
        "--cache_dir",
        str(cache),
        "--output_dir",
        str(out),
        "--augment",
        "flips",
        "--cutmix_alpha",
        "0",
        *FAST,
    )
    assert list(cache.glob("embeddings-*.arrow")), "the head trained on cached embeddings"
    assert json.loads((out / "metrics.json").read_text())["metrics"]["n"] > 0


def test_cross_validation_and_evaluate_the_fold_ensemble(demo_data, tmp_path):
    data_dir, cache = demo_data
    out = tmp_path / "cv"
    run_recipe(
        "resnet_scratch",
        "--demo",
        "--data_dir",
        str(data_dir),
        "--cache_dir",
        str(cache),
        "--output_dir",
        str(out),
        "--n_folds",
        "2",
        "--patch_size",
        "64",
        "--stride",
        "64",
        *FAST,
    )
    summary = json.loads((out / "cv_metrics.json").read_text())
    assert summary["n_folds"] == 2 and "±" in summary["image_macro_f1"]
    assert summary["oof"]["metrics"]["n"] == 12  # every labelled image scored once, out of fold
    assert {"macro_f1", "accuracy"} <= set(summary["mean"]) and (out / "oof_image_predictions.csv").is_file()
    assert len(FoldEnsemble.from_pretrained(out).models) == 2
    result = evaluate_model(out, data_dir, tmp_path / "ensemble.json", progress=False)
    assert KEYS <= set(result.metrics) and result.n_images == 12
    # The model to ship: all labelled images, no checkpoint selection; its card reports the CV figures.
    final = tmp_path / "final"
    data = ("--demo", "--data_dir", str(data_dir), "--cache_dir", str(cache), "--patch_size", "64", "--stride", "64")
    run_recipe(
        "resnet_scratch", *data, "--output_dir", str(final), "--val_fraction", "0", "--cv_results", str(out), *FAST
    )
    card = (final / "README.md").read_text()
    splits = json.loads((final / "splits.json").read_text())
    assert len(splits["train"]) == 12 and not splits.get("validation") and not (final / "metrics.json").exists()
    oof = ImageLevelResult.from_dict(summary["oof"])
    assert "out-of-fold figures of the cross-validation run `cv`" in card and summary["image_macro_f1"] in card
    assert f"{uncalibrated(oof).metrics['macro_f1']:.3f}" in card and "out_of_fold" in card
    bare = tmp_path / "final_without_cv"
    run_recipe("resnet_scratch", *data, "--output_dir", str(bare), "--val_fraction", "0", *FAST)
    assert "no held-out figure of its own" in (bare / "README.md").read_text()
    with pytest.raises(ValueError, match="no cv_metrics.json there"):
        run_recipe("resnet_scratch", *data, "--output_dir", str(bare), "--cv_results", str(tmp_path), *FAST)


class Killed(Exception):
    """A kill of the run, at the end of a fold's training."""


@pytest.mark.slow
def test_a_killed_cross_validation_resumes_where_it_stopped(demo_data, tmp_path, monkeypatch):
    from hf_histo.training import finalize

    data_dir, cache = demo_data
    out = tmp_path / "cv"
    argv = ["--demo", "--data_dir", str(data_dir), "--cache_dir", str(cache), "--output_dir", str(out)]
    argv += ["--n_folds", "3", "--patch_size", "64", "--stride", "64", *FAST]
    argv += ["--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "no"]
    real, seen = finalize.finalize_run, []

    def finalize_run(trainer, *args, **kwargs):
        seen.append((Path(trainer.args.output_dir).name, trainer.args.resume_from_checkpoint))
        if seen[-1][0] == "fold_1" and len(seen) == 2:
            raise Killed  # fold 1 trained and saved its checkpoints, but never published its model
        return real(trainer, *args, **kwargs)

    monkeypatch.setattr(finalize, "finalize_run", finalize_run)
    with pytest.raises(Killed):
        run_recipe("resnet_scratch", *argv)
    assert (out / "fold_0" / "metrics.json").is_file() and not (out / "fold_1" / "metrics.json").exists()
    assert (out / "fold_1" / "checkpoint-2").is_dir() and (out / "cv_run.json").is_file()
    with pytest.raises(ValueError, match="holds another run.*--resume_folds"):
        run_recipe("resnet_scratch", *argv)
    with pytest.raises(ValueError, match=r"other settings \(training\.learning_rate\)"):
        run_recipe("resnet_scratch", *argv, "--resume_folds", "true", "--learning_rate", "0.5")
    record = json.loads((out / "cv_run.json").read_text())
    del record["settings"]["training"]["ema_decay"]  # as a version without the argument wrote it
    (out / "cv_run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"other settings \(training\.ema_decay\)"):  # its default, 0, is not 0.5
        run_recipe("resnet_scratch", *argv, "--resume_folds", "true", "--ema_decay", "0.5")
    kept = (out / "fold_0" / "model.safetensors").stat().st_mtime_ns
    seen.clear()
    run_recipe("resnet_scratch", *argv, "--resume_folds", "true")
    assert (out / "fold_0" / "model.safetensors").stat().st_mtime_ns == kept  # finished: not trained again
    assert seen == [("fold_1", str(out / "fold_1" / "checkpoint-2")), ("fold_2", None)]
    summary = json.loads((out / "cv_metrics.json").read_text())
    assert summary["n_folds"] == 3 and summary["oof"]["metrics"]["n"] == 12
    assert sorted(summary["wall_seconds"]) == ["0", "1", "2"]  # the earlier run's fold 0 included
    assert json.loads((out / "cv_run.json").read_text())["settings"]["training"]["ema_decay"] == 0.0


def test_whole_image_strategy(demo_data, tmp_path):
    data_dir, cache = demo_data
    out = tmp_path / "whole"
    run_recipe(
        "resnet_scratch",
        "--demo",
        "--data_dir",
        str(data_dir),
        "--cache_dir",
        str(cache),
        "--output_dir",
        str(out),
        "--strategy",
        "whole",
        *FAST,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["patch_metrics"]["n"] == metrics["metrics"]["n"]  # one input per image


def test_push_to_hub_offline_keeps_the_complete_folder(demo_data, tmp_path):
    """`--push_to_hub` uploads once at the end through hf_histo.hub; offline it fails with one clear error after the
    folder is complete (Trainer's own per-checkpoint push, which would fail at start-up, stays off)."""
    data_dir, cache = demo_data
    out = tmp_path / "pushed"
    argv = ["--demo", "--data_dir", str(data_dir), "--cache_dir", str(cache), "--output_dir", str(out), *FAST]
    with pytest.raises(ValueError, match="--hub_model_id"):
        run_recipe("vit_differential_lr", *argv, "--push_to_hub")
    with pytest.raises(HubUnavailableError, match="me/histo-vit") as error:
        run_recipe("vit_differential_lr", *argv, "--push_to_hub", "--hub_model_id", "me/histo-vit")
    assert "offline" in str(error.value) and str(out.resolve()) in str(error.value)
    assert set(REQUIRED_FILES) <= set(hub_upload_files(out))
    assert "me/histo-vit" in (out / "README.md").read_text()  # the card's snippet names the target repo
