"""End-to-end test of `hf-histo demo --quick` (generate, inspect, clean, train, evaluate, predict, explain)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hf_histo.demo import run_demo


@pytest.mark.slow
def test_quick_demo_writes_everything(tmp_path: Path) -> None:
    summary = run_demo(tmp_path / "demo", quick=True)

    paths = {name: Path(path) for name, path in summary["paths"].items()}
    data = paths["data"]
    assert (data / "train_labels.csv").is_file() and (data / "test_labels.csv").is_file()
    assert len(list((data / "train_data").glob("img_*.png"))) == summary["n_train"]
    assert paths["clean_manifest"].is_file()

    model = paths["model"]
    assert (model / "config.json").is_file()
    assert (model / "model.safetensors").is_file()
    card = (model / "README.md").read_text(encoding="utf-8")
    assert "macro" in card.lower()

    with open(data / "test_labels.csv", newline="", encoding="utf-8") as f:
        test_ids = sorted(row["sample_index"] for row in csv.DictReader(f))
    with open(paths["submission"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["sample_index"] for row in rows) == test_ids
    labels = json.loads((model / "config.json").read_text(encoding="utf-8"))["id2label"].values()
    assert {row["label"] for row in rows} <= set(labels)

    metrics = json.loads(paths["test_metrics"].read_text(encoding="utf-8"))
    assert isinstance(summary["image_macro_f1"], float)
    assert 0.0 <= summary["image_macro_f1"] <= 1.0
    assert metrics["image"]["macro_f1"] == pytest.approx(summary["image_macro_f1"])
    assert isinstance(summary["val_image_macro_f1"], float)

    if "explain" in paths:
        assert len(list(paths["explain"].glob("*.png"))) >= 1
    assert summary["wall_time_s"] > 0
    assert json.loads(paths["summary"].read_text(encoding="utf-8"))["image_macro_f1"] == summary["image_macro_f1"]
