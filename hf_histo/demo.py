"""`hf-histo demo`: the whole product (data -> inspect -> clean -> train -> evaluate -> predict -> explain) offline."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from .inference.results import ImageLevelResult
from .training.summary import macro_f1_text, next_commands
from .utils import atomic_write_text

# Sizes of the generated data and of the training run; `quick` is for tests.
FULL = {"n_train": 64, "n_test": 24, "size_range": (256, 448), "epochs": 20, "explain": 6}
QUICK = {"n_train": 16, "n_test": 8, "size_range": (192, 288), "epochs": 2, "explain": 2}


def _say(message: str) -> None:
    """Print a demo step, once: the demo is an interactive command, its steps are its output (not log records)."""
    print(f"[hf-histo demo] {message}", flush=True)


def local_phikon() -> str | None:
    """The local folder of `owkin/phikon` when it is already in the HF cache (never downloads).

    Returns:
        The snapshot folder, or None when the weights are not cached.
    """
    try:
        from huggingface_hub import snapshot_download, try_to_load_from_cache

        config = try_to_load_from_cache("owkin/phikon", "config.json")
        if not isinstance(config, str):
            return None
        folder = snapshot_download("owkin/phikon", local_files_only=True)
    except Exception:  # noqa: BLE001 - any cache miss or offline error means "not available"
        return None
    folder_path = Path(folder)
    has_weights = any((folder_path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))
    return str(folder_path) if has_weights else None


def write_test_manifest(data_dir: Path) -> Path:
    """Write a manifest of the test images with their held-out labels (from `test_labels.csv`).

    Args:
        data_dir: A folder written by `make_synthetic_dataset`.

    Returns:
        The manifest path (`data_dir/test_manifest.csv`).
    """
    labels_csv = data_dir / "test_labels.csv"
    with open(labels_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image_id", "image_path", "mask_path", "label", "group_id", "split"])
    for row in rows:
        name = row["sample_index"]
        mask = name.replace("img_", "mask_", 1)
        image_id = Path(name).stem
        writer.writerow([image_id, f"test_data/{name}", f"test_data/{mask}", row["label"], image_id, "train"])
    path = data_dir / "test_manifest.csv"
    atomic_write_text(path, out.getvalue())
    return path


def _train(
    manifest: Path, model_dir: Path, backbone: str, epochs: int, seed: int
) -> tuple[ImageLevelResult | None, Any]:
    """Train the `phikon_frozen` recipe (its own `main` and defaults) on the clean manifest.

    Returns:
        The recipe's validation `ImageLevelResult` (what its `metrics.json` holds) and its training arguments.
    """
    # The repository's recipes/ folder is installed as `hf_histo.recipes` (pyproject.toml: package-dir), in a wheel
    # and in an editable install alike.
    from .recipes import phikon_frozen as recipe
    from .training.arguments import parse_args

    argv = [
        "--data_dir", str(manifest),
        "--output_dir", str(model_dir),
        "--overwrite_output_dir", "true",  # the demo regenerates everything it writes
        "--model_name_or_path", backbone,
        "--augment", "flips",  # a finite set of views + no CutMix: the head trains on cached embeddings
        "--cutmix_alpha", "0",
        "--tta", "none",
        "--num_train_epochs", str(epochs),
        "--per_device_train_batch_size", "32",
        "--per_device_eval_batch_size", "64",
        "--learning_rate", "1e-3",
        "--val_fraction", "0.2",
        "--n_bootstrap", "200",
        "--seed", str(seed),
        "--save_total_limit", "1",
        "--dataloader_num_workers", "0",
        "--use_cpu", "true",
        "--cache_dir", str(model_dir.parent / "cache"),
    ]  # fmt: skip
    data_args, model_args, training_args = parse_args(recipe.RECIPE_DEFAULTS, argv=argv)
    return recipe.main(data_args, model_args, training_args), training_args


def run_demo(out_dir: str | Path = "hf_histo_demo", quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the whole product on generated data and report what it wrote.

    Steps: generate synthetic H&E-like images (challenge layout), inspect them, clean them (clean manifest),
    train the `phikon_frozen` recipe (a tiny random ViT, or owkin/phikon when already cached locally; the
    patch dataset is built by `load_patch_dataset` inside the recipe), evaluate at image level on the
    held-out test images, predict `submission.csv`, write explanation PNGs, print a summary table.

    Args:
        out_dir: Folder for everything the demo writes.
        quick: Smaller data and 2 epochs (for tests, well under a minute).
        seed: Seed of the data and the run.

    Returns:
        Summary dict: `paths` (name -> path), `image_macro_f1` (test), `val_image_macro_f1`, `backbone`,
        `notes` (e.g. which backbone stood in for Phikon), `wall_time_s`.
    """
    start = time.perf_counter()
    sizes = QUICK if quick else FULL
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    notes: list[str] = []

    from .data.synthetic import make_synthetic_dataset

    data_dir = out / "data"
    _say(f"1/7 generating {sizes['n_train']} train + {sizes['n_test']} test synthetic images in {data_dir}")
    make_synthetic_dataset(
        data_dir, n_train=sizes["n_train"], n_test=sizes["n_test"], seed=seed, size_range=sizes["size_range"],
        overwrite=True,
    )  # fmt: skip
    paths["data"] = str(data_dir)

    from .data.inspect import inspect_dataset
    from .data.patching import PatchingConfig

    _say("2/7 inspecting the data")
    patching = PatchingConfig(patch_size=128, stride=64)
    report = inspect_dataset(
        data_dir, out / "inspection", patching, strategies=("grid", "components", "topk"), n_contact=3
    )
    print(report.table(), flush=True)
    paths["inspection"] = str(out / "inspection")

    from .data.cleaning import clean_dataset

    _say("3/7 cleaning (duplicates, non-tissue, artifacts)")
    cleaning = clean_dataset(data_dir, out / "cleaning")
    manifest = out / "cleaning" / "clean_manifest.csv"
    paths["clean_manifest"] = str(manifest)
    _say(f"    flagged {len(cleaning.flagged_ids)} image(s)")

    phikon = local_phikon()
    backbone = phikon or "tiny-vit"
    if phikon is None:  # said once, in the summary; the step names the stand-in
        notes.append("owkin/phikon is not in the local HF cache: a tiny randomly initialised ViT stands in for it")
    model_dir = out / "model"
    shown = f"{backbone} (owkin/phikon is not cached locally)" if phikon is None else backbone
    _say(f"4/7 patches (load_patch_dataset) + training phikon_frozen on {shown} for {sizes['epochs']} epochs")
    val_result, training_args = _train(manifest, model_dir, backbone, sizes["epochs"], seed)
    paths["model"] = str(model_dir)
    paths["val_metrics"] = str(model_dir / "metrics.json")

    from .hub import write_model_card
    from .hub.card import PLOTS_DIR
    from .inference.evaluate import evaluate_model
    from .inference.explain import explain_folder
    from .inference.plots import plot_confusion_matrix
    from .inference.predict import predict_folder

    test_manifest = write_test_manifest(data_dir)
    _say("5/7 evaluating at image level on the held-out test images")
    test_metrics_path = out / "test_metrics.json"
    test_result = evaluate_model(model_dir, test_manifest, test_metrics_path, progress=False)
    paths["test_metrics"] = str(test_metrics_path)

    plot_confusion_matrix(  # the card's plot goes with its figures: the test images'
        test_result.metrics["confusion_matrix"],
        test_result.labels,
        model_dir / PLOTS_DIR / "confusion_matrix.png",
        title=f"test images ({test_result.aggregation}, TTA {test_result.tta}), "
        f"macro-F1 {test_result.metrics['macro_f1']:.3f}",
    )
    card = write_model_card(  # the card shows the held-out test figures (with their CI), named as such
        model_dir, result=test_result, split="test", training_args=training_args, data_info=_data_info(model_dir)
    )
    paths["model_card"] = str(card)

    _say("6/7 predicting submission.csv for the test images")
    submission = out / "submission.csv"
    predict_folder(model_dir, test_manifest, submission)
    paths["submission"] = str(submission)

    _say("7/7 writing explanation PNGs")
    explain_folder(model_dir, test_manifest, out / "explain", max_images=sizes["explain"])
    paths["explain"] = str(out / "explain")

    summary = {
        "backbone": backbone,
        "image_macro_f1": test_result.metrics["macro_f1"],
        "image_macro_f1_ci": test_result.ci.get("macro_f1"),
        "image_accuracy": test_result.metrics["accuracy"],
        "val_image_macro_f1": val_result.metrics["macro_f1"] if val_result is not None else None,
        "n_train": sizes["n_train"],
        "n_test": sizes["n_test"],
        "paths": paths,
        "notes": notes,
        "next_commands": next_commands(model_dir, data_dir, test_data=test_manifest),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    paths["summary"] = str(out / "demo_summary.json")
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
    print(_table(summary, test_result), flush=True)
    return summary


def _data_info(model_dir: Path) -> dict[str, Any]:
    """The card's facts about the demo data, counted from the run's `splits.json`."""
    splits = json.loads((model_dir / "splits.json").read_text(encoding="utf-8"))
    n = {name: len(ids) for name, ids in splits.items()}
    return {
        "name": "hf-histo synthetic demo data (generated H&E-like images, not real tissue)",
        "layout": "challenge",
        "n_images": f"{n.get('train', 0)} training, {n.get('validation', 0)} validation (chose the checkpoint), "
        f"{n.get('test', 0)} test (held out, scored below)",
    }


def _table(summary: dict[str, Any], test_result: ImageLevelResult) -> str:
    """The summary table printed at the end of the demo, then the commands to try next."""

    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    rows = [
        ("backbone", summary["backbone"]),
        ("images (train / test)", f"{summary['n_train']} / {summary['n_test']}"),
        ("validation image macro-F1", fmt(summary["val_image_macro_f1"])),
        ("test image macro-F1", macro_f1_text(test_result)),
        ("test image accuracy", fmt(summary["image_accuracy"])),
        ("time of the 7 steps (s)", fmt(summary["wall_time_s"])),  # after the imports (~10 s on 2 cores)
    ]
    rows += [(name, path) for name, path in summary["paths"].items()]
    rows += [("note", note) for note in summary["notes"]]
    width = max(len(name) for name, _ in rows)
    lines = ["", "hf-histo demo summary", "-" * (width + 40)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    lines += ["", "next:"] + [f"  {command}" for command in summary["next_commands"]]
    return "\n".join(lines)
