"""Hub-ready checkpoint folders: weights, processor, shipped code, plots and model card, published at once."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..data.stain import TORCHSTAIN_REQUIREMENT
from ..data.transforms import make_image_processor
from ..inference.plots import plot_confusion_matrix
from ..inference.results import ImageLevelResult
from .bundle import bundle_code, set_remote_code_config
from .card import PLOTS_DIR, write_model_card
from .upload import push_folder_to_hub

logger = logging.getLogger(__name__)

# What a Space running the folder's app.py installs; floors as in pyproject.toml (tests/test_app.py checks they agree).
SPACE_REQUIREMENTS = (
    "gradio>=6.0",
    "torch>=2.4",
    "torchvision>=0.19",  # the fast image processors, as in training
    "transformers>=5.0,<6",
    "numpy>=2.0",
    "pillow>=10.0",
    "scipy>=1.10",
)
TIMM_REQUIREMENT = "timm>=1.0"  # backbones run through transformers' TimmWrapperModel


def write_space_files(output_dir: str | os.PathLike, config: Any) -> list[Path]:
    """Write `app.py` (hf_histo's web app, which runs on the folder's shipped code) and `requirements.txt`.

    With them the folder runs as a Gradio app (`pip install -r requirements.txt && python app.py`) or a Space.

    Args:
        output_dir: The model folder.
        config: The model's config (a timm backbone adds timm to the requirements, stain normalisation torchstain).

    Returns:
        The two files.
    """
    output_dir = Path(output_dir)
    app = output_dir / "app.py"
    app.write_text(resources.files("hf_histo").joinpath("app.py").read_text(encoding="utf-8"), encoding="utf-8")
    requirements = list(SPACE_REQUIREMENTS)
    if getattr(getattr(config, "backbone_config", None), "model_type", None) == "timm_wrapper":
        requirements.append(TIMM_REQUIREMENT)
    if (getattr(config, "patching", None) or {}).get("stain_norm", "none") != "none":
        requirements.append(TORCHSTAIN_REQUIREMENT)  # the shipped engine normalises stain as training did
    (output_dir / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
    return [app, output_dir / "requirements.txt"]


def _copy_plots(output_dir: Path, plots: Sequence | Mapping | None) -> list[Path]:
    if not plots:
        return []
    items = plots.items() if isinstance(plots, Mapping) else ((Path(p).name, p) for p in plots)
    target_dir = output_dir / PLOTS_DIR
    target_dir.mkdir(exist_ok=True)
    copied = []
    for name, path in items:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plot {path} not found; pass existing image files to save_for_hub(plots=...).")
        target = target_dir / (name if Path(name).suffix else f"{name}{path.suffix}")
        if path.resolve() != target.resolve():
            shutil.copyfile(path, target)
        copied.append(target)
    return copied


def _confusion_plot(output_dir: Path, result: ImageLevelResult | None, shipped: list[Path]) -> Path | None:
    """Draw the image-level confusion matrix of `result` under plots/, unless a confusion plot is shipped."""
    cm = result.metrics.get("confusion_matrix") if result is not None else None
    if not cm or not any(any(row) for row in cm) or any("confusion" in p.name for p in shipped):
        return None
    path = output_dir / PLOTS_DIR / "confusion_matrix.png"
    path.parent.mkdir(exist_ok=True)
    title = f"Image-level confusion matrix ({result.aggregation} aggregation, TTA {result.tta})"
    return plot_confusion_matrix(result.metrics["confusion_matrix"], result.labels, path, title=title)


def save_for_hub(
    model: Any,
    output_dir: str | os.PathLike,
    *,
    image_processor: Any,
    result: ImageLevelResult | None = None,
    training_args: Any | None = None,
    data_info: Mapping[str, Any] | None = None,
    plots: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    split: str | None = None,
) -> Path:
    """Write a complete, Hub-ready checkpoint folder (weights, processor, code, plots, model card).

    `config.json` is written once, by `model.save_pretrained`, after `auto_map` and `custom_pipelines` were set on
    the config; `bundle_code` then adds the flattened pipeline code next to it.

    Args:
        model: The trained `HistoClassifierForImageClassification` (unwrapped: no DDP/peft wrapper; merge LoRA
            first).
        output_dir: Folder to write (created; the files of an earlier save there are replaced or removed).
        image_processor: The backbone's image processor (or an int side) used for training; what is saved is
            `make_image_processor(image_processor)`: the training eval transform.
        result: The image-level evaluation shown in the card (figures, CI, TTA, aggregation).
        training_args: `TrainingArguments` (or a dict) whose hyperparameters go into the card.
        data_info: Facts about the data (see `build_model_card`).
        plots: PNG files to ship under `plots/` (a list, or `{name: path}`); a confusion matrix is drawn from
            `result.metrics["confusion_matrix"]` when none is given.
        repo_id: The Hub repo the folder is meant for (used in the card's snippet and model-index name).
        license: A Hub license id for the card metadata (e.g. `"apache-2.0"`, `"other"`).
        split: Name of the images `result` scored, as the card shows it (default: `result.split`), e.g. `"test"`.

    Returns:
        `output_dir` as a `Path`.
    """
    from ..training.finalize import final_files  # lazily: `import hf_histo` does not load Trainer

    output_dir = Path(output_dir)
    with final_files(output_dir) as staging:
        _write_hub_files(
            model, staging, image_processor, result, training_args, data_info, plots, repo_id, license, split
        )
    return output_dir


def _write_hub_files(
    model: Any,
    output_dir: Path,
    image_processor: Any,
    result: ImageLevelResult | None,
    training_args: Any | None,
    data_info: Mapping[str, Any] | None,
    plots: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike] | None,
    repo_id: str | None,
    license: str | None,
    split: str | None = None,
) -> None:
    """What `save_for_hub` writes, straight into `output_dir` (a staging folder)."""
    set_remote_code_config(model.config, model)
    model.save_pretrained(output_dir, safe_serialization=True)
    make_image_processor(image_processor).save_pretrained(output_dir)
    bundle_code(output_dir, model)
    write_space_files(output_dir, model.config)
    shipped = _copy_plots(output_dir, plots)
    cm_plot = _confusion_plot(output_dir, result, shipped)
    if cm_plot is not None:
        shipped.append(cm_plot)
    write_model_card(
        output_dir,
        config=model.config,
        result=result,
        training_args=training_args,
        data_info=data_info,
        plots=shipped,
        repo_id=repo_id,
        license=license,
        split=split,
    )


def save_run(
    trainer: Any,
    result: ImageLevelResult | None,
    output_dir: str | os.PathLike | None = None,
    data_info: Mapping[str, Any] | None = None,
    license: str | None = None,
    run: Mapping[str, Any] | None = None,
) -> Path:
    """Write a finished run's model as a Hub-ready folder and upload it when the run asked for `--push_to_hub`.

    Called by every recipe after `finalize_run(..., save_model=False)`: the final model (unwrapped, LoRA merged)
    is written as by `save_for_hub`, with the run's result, hyperparameters, data facts and plots
    (`confusion_matrix.png`, `reliability_diagram.png` when a temperature was fitted, `training_curves.png`), on the main process only, next to the files `finalize_run`
    staged; then all of them are published at once. With `--push_to_hub` the folder is then uploaded once by
    `push_folder_to_hub` (rank 0) to `--hub_model_id`; Trainer's own checkpoint pushing stays off
    (`HistoTrainingArguments` moves the flag to `push_final_to_hub`).

    Args:
        trainer: The trained `HistoTrainer`.
        result: The run's image-level evaluation.
        output_dir: Folder to write (default: `trainer.args.output_dir`).
        data_info: Facts about the data for the card (default: `run_data_info(trainer.train_dataset, run)`).
        license: A Hub license id for the card metadata.
        run: The run facts (recipe name, `data` and `model` arguments) used for the default `data_info`.

    Returns:
        The folder.

    Raises:
        HubUnavailableError: `--push_to_hub` was given but the Hub cannot be reached; the folder is complete on disk.
    """
    from ..training.finalize import final_files
    from ..training.trainer import final_model

    args = trainer.args
    output_dir = Path(output_dir or args.output_dir)
    repo_id = getattr(args, "hub_model_id", None)
    model = final_model(trainer)
    data_info = dict(data_info if data_info is not None else run_data_info(trainer.train_dataset, run))
    if result is None:  # no validation split: the model to ship, trained on all labelled images (a "final fit")
        result, data_info["final_fit"] = _final_fit(model, getattr(args, "cv_results", None))
    elif getattr(args, "cv_results", None):
        logger.warning("--cv_results %s ignored: the card reports this run's validation images", args.cv_results)
    if trainer.is_world_process_zero():
        # Into the staging folder where finalize_run(save_model=False) left metrics, splits and plots: all are
        # published together.
        with final_files(output_dir) as staging:
            _write_hub_files(
                model,
                staging,
                trainer.processing_class,
                result,
                args,
                data_info,
                [
                    staging / name
                    for name in ("confusion_matrix.png", "reliability_diagram.png", "training_curves.png")
                    if (staging / name).is_file()
                ],
                repo_id,
                license,
                None if result is None else result.split,
            )
    trainer.accelerator.wait_for_everyone()
    if getattr(args, "push_final_to_hub", False):
        push_folder_to_hub(
            output_dir,
            repo_id,
            token=getattr(args, "hub_token", None),
            private=bool(getattr(args, "hub_private_repo", False)),
            is_main_process=trainer.is_world_process_zero(),
        )
    return output_dir


def _final_fit(model: Any, cv_results: str | None) -> tuple[ImageLevelResult | None, str]:
    """The card's result and "Trained on" line for a model trained on all images: the CV's out-of-fold figures."""
    from ..training.cross_validation import load_cv_result

    if cv_results:
        return load_cv_result(cv_results, list(model.config.id2label.values()))
    return None, (
        "all labelled images (no validation split), so this card has no held-out figure of its own: pass "
        "`--cv_results` with the output folder of the same recipe's `--n_folds` run to report its out-of-fold figures"
    )


def run_data_info(train_dataset: Any, run: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Card facts about a run's training data: name, layout, images, patches and images per class.

    Args:
        train_dataset: The training patch dataset (`image_id` and `label` columns; a `with_transform` view works).
        run: The run facts; its `data` arguments give the data folder and layout.
    """
    data_args = (run or {}).get("data") or {}
    info: dict[str, Any] = {}
    if data_args.get("data_dir"):
        info["name"] = Path(str(data_args["data_dir"])).name
    if data_args.get("layout"):
        info["layout"] = data_args["layout"]
    columns = getattr(train_dataset, "column_names", None) or []
    if "image_id" in columns and "label" in columns:
        table = train_dataset.with_format(None).select_columns(["image_id", "label"])
        image_ids, labels = table["image_id"], table["label"]
        names = train_dataset.features["label"].names
        first_label = dict(zip(image_ids, labels))
        counts = {name: 0 for name in names}
        for label in first_label.values():
            counts[names[label]] += 1
        info.update(n_images=f"{len(first_label)} (training split)", n_patches=len(image_ids), class_counts=counts)
    return info
