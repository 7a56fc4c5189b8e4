"""Bad inputs around training, cleaning and upload: each row a case of the reliability issue and what it must produce.

Rows: 8 one-class training data, 9 test images that copy training images, 10 ties of the best checkpoint,
17 the offline push, 19 formula-like image ids in the cleaning CSVs.
"""

from __future__ import annotations

import csv
import logging
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetInfo
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from transformers import TrainingArguments

from hf_histo.data.builder import load_patch_dataset
from hf_histo.data.cleaning import clean_dataset
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.sources import read_samples
from hf_histo.data.synthetic import make_synthetic_dataset, make_synthetic_image
from hf_histo.hub import upload as hub_upload
from hf_histo.hub.upload import HubUnavailableError, hub_upload_files, push_folder_to_hub
from hf_histo.models import HistoClassifierConfig, HistoClassifierForImageClassification, tiny_backbone_config
from hf_histo.training.trainer import HistoTrainer

LEAK = "test_duplicate_of_train"
LABELS = ("benign", "malignant")


# ---- helpers ------------------------------------------------------------------------------------------------------
def tiny_model(labels: tuple[str, ...] = LABELS) -> HistoClassifierForImageClassification:
    torch.manual_seed(0)
    config = HistoClassifierConfig(
        backbone_config=tiny_backbone_config("vit"),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        patching={"strategy": "grid", "patch_size": 32, "min_foreground": 100},
    )
    return HistoClassifierForImageClassification(config)


def pixel_rows(labels: list[int], description: str = "", seed: int = 0) -> Dataset:
    """Rows of random 32x32 patches, one image per row."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(len(labels), 3, 32, 32)).astype(np.float32)
    data = {"pixel_values": pixels.tolist(), "label": labels, "image_id": [f"img{i}" for i in range(len(labels))]}
    return Dataset.from_dict(data, info=DatasetInfo(description=description))


def training_args(out: Path, **changes: Any) -> TrainingArguments:
    kw = dict(output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", seed=0)
    return TrainingArguments(**{**kw, **changes})


def trainer_on(train: Dataset, out: Path, model=None, eval_dataset=None, **changes: Any) -> HistoTrainer:
    args = training_args(out, **changes)
    return HistoTrainer(model=model or tiny_model(), args=args, train_dataset=train, eval_dataset=eval_dataset)


def save_image(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def table_folder(root: Path, rows: list[tuple[str, str, str]], copies: dict[str, str]) -> Path:
    """A table-layout folder: ``rows`` of (image_id, label, split) drawn from distinct seeds, ``copies`` byte-copied."""
    for k, (image_id, _, _) in enumerate(rows):
        if image_id not in copies:
            rng = np.random.default_rng([7, k])
            save_image(make_synthetic_image(rng, k % 4, (160, 128))[0], root / "images" / f"{image_id}.png")
    for copy, source in copies.items():
        shutil.copyfile(root / "images" / f"{source}.png", root / "images" / f"{copy}.png")
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("filename", "label", "patient_id", "split")])
        csv.writer(f).writerows((f"{i}.png", label, i, split) for i, label, split in rows)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def hub_folder(root: Path) -> Path:
    """A complete Hub folder plus the training leftovers an upload must never take."""
    shipped = [
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "model.safetensors",
        "plots/confusion_matrix.png",
    ]
    shipped += ["configuration_histo.py", "modeling_histo.py", "pipeline.py"]
    leftovers = ["training_args.bin", "checkpoint-5/optimizer.pt", "demo_data/img_0000.png", "metrics.json"]
    for name in shipped + leftovers:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("{}")
    return root


# ---- case 8: one-class training data ------------------------------------------------------------------------------
def one_class_rows(tmp_path: Path, caplog) -> None:
    trainer_on(pixel_rows([1, 1, 1, 1], "hf-histo patches (grid-32) of /data/glas_one_class"), tmp_path)


def one_class_folder(tmp_path: Path, caplog) -> None:
    """Two classes in the data, but every image of one class is in the test split: training sees one class."""
    rows = [(f"img_{k}", "benign", "train") for k in range(4)] + [("img_t", "malignant", "test")]
    data = table_folder(tmp_path / "one_class", rows, {})
    splits = load_patch_dataset(
        data,
        PatchingConfig(strategy="grid", patch_size=32, min_foreground=100),
        val_fraction=0.0,
        cache_dir=tmp_path / "cache",
    )
    trainer_on(splits["train"], tmp_path / "run", model=tiny_model(tuple(splits["train"].features["label"].names)))


def unlabelled_rows(tmp_path: Path, caplog) -> None:
    trainer_on(pixel_rows([-1, -1, -1]), tmp_path)


# ---- case 9: test images that copy training images ----------------------------------------------------------------
def challenge_leak(tmp_path: Path, caplog) -> dict:
    data = make_synthetic_dataset(tmp_path / "challenge", n_train=8, n_test=2, size_range=(128, 160), seed=0)
    for k, source in ((10, 1), (11, 4), (12, 6)):  # three test images byte-identical to training images
        shutil.copyfile(data / "train_data" / f"img_{source:04d}.png", data / "test_data" / f"img_{k:04d}.png")
    result = clean_dataset(data, tmp_path / "out", progress=False)
    expected = {"img_0010": "img_0001", "img_0011": "img_0004", "img_0012": "img_0006"}
    return {"result": result, "expected": expected, "test_ids": {"img_0008", "img_0009", *expected}}


def table_leak(tmp_path: Path, caplog) -> dict:
    rows = [(f"img_{k}", "ab"[k % 2], "train") for k in range(6)] + [("t_new", "a", "test"), ("t_copy", "b", "test")]
    data = table_folder(tmp_path / "table", rows, {"t_copy": "img_3"})
    result = clean_dataset(data, tmp_path / "out", progress=False)
    return {"result": result, "expected": {"t_copy": "img_3"}, "test_ids": {"t_new", "t_copy"}}


def check_leak(outcome: dict) -> None:
    result, expected = outcome["result"], outcome["expected"]
    report = read_csv(result.files["report"])
    assert {r["image_id"]: (r["reason"], r["related_to"]) for r in report if r["reason"] == LEAK} == {
        test: (LEAK, train) for test, train in expected.items()
    }
    assert all(float(r["score"]) == 1.0 for r in report if r["reason"] == LEAK)
    summary = result.summary()
    assert f"test images that duplicate a training image: {len(expected)}" in summary
    assert all(f"{test} = {train}" in summary for test, train in expected.items())
    # Kept: a submission needs a prediction for every test image; training loses nothing either.
    manifest = read_csv(result.files["manifest"])
    assert {r["image_id"] for r in manifest if r["split"] == "test"} == outcome["test_ids"]
    assert set(expected.values()) <= {r["image_id"] for r in manifest if r["split"] == "train"}
    assert not set(expected) & set(result.files["exclusions"].read_text().split())
    assert (result.out_dir / f"contact_sheet_{LEAK}.png").is_file()


# ---- case 10: ties of the best checkpoint -------------------------------------------------------------------------
def feed_evaluations(tmp_path: Path, caplog) -> int:
    """Call the best-checkpoint decision with a fake sequence of evaluations; return the step it keeps."""
    trainer = trainer_on(
        pixel_rows([0, 1, 0, 1]),
        tmp_path,
        eval_dataset=pixel_rows([0, 1]),
        eval_strategy="epoch",
        save_strategy="epoch",
        metric_for_best_model="image_macro_f1",
        greater_is_better=True,
    )
    # (epoch, image_macro_f1, eval_loss): F1 1.0 reached at epoch 2; epoch 4 has the lowest loss among the ties.
    evaluations = [(1, 0.5, 0.9), (2, 1.0, 0.6), (3, 1.0, 0.7), (4, 1.0, 0.3), (5, 1.0, 0.3), (6, 0.9, 0.1)]
    for epoch, f1, loss in evaluations:
        metrics = {"eval_loss": loss, "eval_image_macro_f1": f1, "epoch": float(epoch)}
        trainer.state.global_step, trainer.state.epoch = 10 * epoch, float(epoch)
        trainer.state.log_history.append({**metrics, "step": 10 * epoch})
        trainer._determine_best_metric(metrics=metrics, trial=None)
    return trainer.state.best_global_step


def train_with_tied_metric(tmp_path: Path, caplog) -> dict:
    """A real 4-epoch run whose metric is always 1.0: the kept checkpoint is the one of lowest eval loss."""
    trainer = HistoTrainer(
        model=tiny_model(),
        args=training_args(
            tmp_path,
            eval_strategy="epoch",
            save_strategy="epoch",
            load_best_model_at_end=True,
            metric_for_best_model="image_macro_f1",
            num_train_epochs=4,
            learning_rate=3e-3,
            per_device_train_batch_size=4,
        ),
        train_dataset=pixel_rows([0, 1] * 4),
        eval_dataset=pixel_rows([0, 1] * 2, seed=1),
        compute_metrics=lambda prediction: {"image_macro_f1": 1.0},
    )
    with caplog.at_level(logging.INFO, logger="hf_histo"):
        trainer.train()
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    best = min(evaluations, key=lambda e: (e["eval_loss"], e["step"]))
    return {"trainer": trainer, "best": best, "log": caplog.text}


def check_tied_run(outcome: dict) -> None:
    trainer, best = outcome["trainer"], outcome["best"]
    assert trainer.state.best_global_step == best["step"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    epoch = int(round(best["epoch"]))
    assert f"kept the checkpoint of epoch {epoch} (step {best['step']})" in outcome["log"]
    assert "image_macro_f1=1.0000" in outcome["log"] and f"eval_loss={best['eval_loss']:.4f}" in outcome["log"]


# ---- case 17: the offline push ------------------------------------------------------------------------------------
def push_offline(tmp_path: Path, monkeypatch) -> tuple[Path, Exception]:
    folder = hub_folder(tmp_path / "out dir")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as info:
        push_folder_to_hub(folder, "user/name", is_main_process=True)
    return folder, info.value


def push_refused(error: Exception) -> Callable[[Path, Any], tuple[Path, Exception]]:
    def push(tmp_path: Path, monkeypatch) -> tuple[Path, Exception]:
        folder = hub_folder(tmp_path / "out")

        def create_repo(self, repo_id, **kwargs):
            raise error

        monkeypatch.setattr(hub_upload, "_offline", lambda: False)
        monkeypatch.setattr(hub_upload.HfApi, "create_repo", create_repo)
        with pytest.raises(HubUnavailableError) as info:
            push_folder_to_hub(folder, "user/name", is_main_process=True)
        return folder, info.value

    return push


def check_push_message(folder: Path, error: Exception) -> None:
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    message = str(error)
    assert "\n" not in message and str(folder.resolve()) in message
    command = message.split("`hf upload ", 1)[1].split("`", 1)[0]
    argv = shlex.split(f"hf upload {command}")
    assert argv[:5] == ["hf", "upload", "user/name", str(folder.resolve()), "."]
    includes = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--include"]
    assert len(argv) == 5 + 2 * len(includes)
    every_file = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(filter_repo_objects(every_file, allow_patterns=includes)) == hub_upload_files(folder)
    assert "checkpoint-5/optimizer.pt" in every_file and not {"metrics.json", "training_args.bin"} & set(includes)


# ---- case 19: formula-like image ids in the cleaning CSVs ---------------------------------------------------------
def formula_ids(tmp_path: Path, caplog) -> dict:
    rows = [("=HYPERLINK(x)", "a", "train"), ("+1", "b", "train"), ("@SUM(1)", "a", "train"), ("plain", "b", "train")]
    rows += [("-2", "a", "train")]
    data = table_folder(tmp_path / "formula", rows, {"-2": "@SUM(1)"})
    result = clean_dataset(data, tmp_path / "out", progress=False)
    return {
        "result": result,
        "report": read_csv(result.files["report"]),
        "manifest": read_csv(result.files["manifest"]),
    }


def check_formula_ids(outcome: dict) -> None:
    # The report is for people (spreadsheets): text cells that start like a formula get a leading '.
    assert [(r["image_id"], r["reason"], r["related_to"]) for r in outcome["report"]] == [
        ("'-2", "duplicate", "'@SUM(1)")
    ]
    assert float(outcome["report"][0]["score"]) == 1.0  # numbers stay numbers
    # The manifest is data read back by the library: ids stay exact, so predictions keep the real ids.
    assert {r["image_id"] for r in outcome["manifest"]} == {"=HYPERLINK(x)", "+1", "@SUM(1)", "plain"}
    reread = read_samples(outcome["result"].files["manifest"])
    assert {s.image_id for s in reread.samples} == {"=HYPERLINK(x)", "+1", "@SUM(1)", "plain"}


# ---- the table ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One bad input: what to run and what it must produce (an error matching ``raises``, or ``check`` passing)."""

    run: Callable[..., Any]
    raises: tuple[type[Exception], str] | None = None
    check: Callable[[Any], None] | None = None
    fixture: str = "caplog"


ONE_CLASS_FIX = r"at least 2 classes among the training images.*add images of another class"
ROWS = {
    "8-one-class-rows": Row(
        one_class_rows,
        raises=(
            ValueError,
            r"glas_one_class.*only one class \('malignant': 4 patches of 4 images\).*" + ONE_CLASS_FIX,
        ),
    ),
    "8-one-class-after-split": Row(
        one_class_folder, raises=(ValueError, r"one_class.*only one class \('benign'.*" + ONE_CLASS_FIX)
    ),
    "8-no-labelled-rows": Row(unlabelled_rows, raises=(ValueError, r"no labelled.*" + ONE_CLASS_FIX)),
    "9-challenge-test-copies-train": Row(challenge_leak, check=check_leak),
    "9-table-split-test-copies-train": Row(table_leak, check=check_leak),
    "10-tie-broken-by-eval-loss": Row(feed_evaluations, check=lambda step: step == 40 or pytest.fail(f"kept {step}")),
    "10-tie-in-a-real-run-logged": Row(train_with_tied_metric, check=check_tied_run),
    "17-offline-mode": Row(push_offline, check=lambda out: check_push_message(*out), fixture="monkeypatch"),
    "17-hub-offline-error": Row(
        push_refused(OfflineModeIsEnabled("offline")),
        check=lambda out: check_push_message(*out),
        fixture="monkeypatch",
    ),
    "17-no-network": Row(
        push_refused(ConnectionError("Name or service not known")),
        check=lambda out: check_push_message(*out),
        fixture="monkeypatch",
    ),
    "19-formula-ids-in-cleaning-csvs": Row(formula_ids, check=check_formula_ids),
}


@pytest.mark.parametrize("case", list(ROWS))
def test_bad_input(case: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    row = ROWS[case]
    extra = request.getfixturevalue(row.fixture)
    if row.raises is not None:
        error, match = row.raises
        with pytest.raises(error, match=match):
            row.run(tmp_path, extra)
    else:
        outcome = row.run(tmp_path, extra)
        assert row.check is not None
        row.check(outcome)
