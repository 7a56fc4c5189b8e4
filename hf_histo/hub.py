"""Hub-ready checkpoint folders: shipped code, model card and upload from the main process.

Public API (called by the training code at the end of a run, by recipes for `--push_to_hub`, and by users):

- `save_for_hub(model, output_dir, *, image_processor, metrics=None, training_args=None, data_info=None,
  plots=None, repo_id=None, license=None) -> Path`: write the complete folder: `config.json` (labels, patching,
  aggregation, `auto_map`, `custom_pipelines`), `model.safetensors`, `preprocessor_config.json`, the flattened
  model/pipeline code (`bundle_code`), `plots/*.png` and `README.md` (`write_model_card`).
- `inference_image_processor(processor)`: the `ViTImageProcessor` saved as preprocessor_config.json: square
  resize + normalisation, i.e. exactly training's eval transform (no centre crop).
- `bundle_code(output_dir, model=None) -> list[Path]`: copy the code that ships with a checkpoint
  (configuration_histo.py, modeling_histo.py, backbones.py, aggregation.py, patching.py, masks.py, pipeline.py)
  flat into the folder with flat relative imports, and record `auto_map` / `custom_pipelines` in its config.json,
  so `pipeline("histo-image-classification", model=DIR, trust_remote_code=True)` works without hf_histo.
- `build_model_card(config, ...) -> huggingface_hub.ModelCard` and `write_model_card(output_dir, ...) -> Path`:
  the card: YAML metadata (library_name, pipeline_tag, tags, base_model, datasets, metrics, model-index) and the
  sections intended use and limitations, data and patching, training procedure, image-level results (bootstrap
  CI, confusion matrix image), how to use.
- `push_folder_to_hub(output_dir, repo_id, *, token=None, private=False, commit_message=None,
  is_main_process=None) -> str | None`: create the repo and upload the folder's model files, code, card and
  plots; does nothing on non-main processes; raises `HubUnavailableError` (one message saying the folder is
  complete on disk and how to upload it later) when offline or the Hub cannot be reached.

`metrics` is the image-level `hf_histo.training.metrics.classification_metrics` dict (or `{"image": ..., "patch":
...}` as `PatchPredictionAccumulator.compute` and `finalize_run`'s metrics.json hold), optionally with
`"ci": {metric: [low, high]}` or `"<metric>_ci": [low, high]` keys, or `"y_true"`/`"y_pred"` (image class indices)
from which 95% bootstrap intervals are computed, `"split"` and `"aggregation"`. `data_info` is a free dict; keys read: `name`, `datasets` (Hub dataset ids), `layout`,
`n_images`, `n_patches`, `class_counts`, `cleaning`, `notes`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .inference.pipeline import TASK, remote_code_fields, set_remote_code_config, write_code_bundle
from .utils import atomic_write_text

__all__ = [
    "REQUIRED_FILES",
    "HubUnavailableError",
    "build_model_card",
    "bundle_code",
    "hub_upload_files",
    "inference_image_processor",
    "push_folder_to_hub",
    "run_data_info",
    "save_for_hub",
    "save_run",
    "write_model_card",
]

# Files a Hub-ready folder must hold (weights may also be sharded: model.safetensors.index.json).
REQUIRED_FILES = (
    "config.json",
    "preprocessor_config.json",
    "README.md",
    "configuration_histo.py",
    "modeling_histo.py",
    "pipeline.py",
)
CARD_TAGS = ["histopathology", "hf-histo", "image-classification", "medical-imaging", "pathology"]
_UPLOAD_NAMES = {"config.json", "preprocessor_config.json", "README.md", "model.safetensors.index.json"}
_UPLOAD_SUFFIXES = {".safetensors", ".py", ".png"}
_PLOTS_DIR = "plots"
_HUB_METRICS = {  # our metric key -> (Hub metric id, display name, args)
    "macro_f1": ("f1", "Image-level macro F1", {"average": "macro"}),
    "accuracy": ("accuracy", "Image-level accuracy", None),
    "balanced_accuracy": ("balanced_accuracy", "Image-level balanced accuracy", None),
    "auroc": ("roc_auc", "Image-level macro one-vs-rest AUROC", {"multi_class": "ovr", "average": "macro"}),
    "kappa": ("cohen_kappa", "Image-level Cohen's kappa", None),
}
_HYPERPARAMETERS = (
    "learning_rate",
    "head_learning_rate",
    "frozen_head_learning_rate",
    "layer_decay",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "optim_name",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "label_smoothing_factor",
    "loss",
    "focal_gamma",
    "class_weights",
    "mixup_alpha",
    "cutmix_alpha",
    "unfreeze_every_epochs",
    "unfreeze_blocks",
    "tta",
    "freeze",
    "lora_r",
    "bf16",
    "fp16",
    "seed",
)


class HubUnavailableError(RuntimeError):
    """The Hub cannot be reached (offline mode, no network, no login); the local folder is complete."""


# ---- the folder ------------------------------------------------------------------------------------------------------
def bundle_code(output_dir: str | os.PathLike, model: Any | None = None) -> list[Path]:
    """Copy the shipped modules flat into `output_dir` and record `auto_map`/`custom_pipelines` in its config.json.

    `PreTrainedModel.save_pretrained` already copies configuration_histo.py, modeling_histo.py and backbones.py
    (transformers' `custom_object_save`); this adds the pipeline and its helpers (patching.py, masks.py,
    aggregation.py) and rewrites every `from ..pkg.module import` into `from .module import`, overwriting
    transformers' copies with identical-or-flattened versions so all files agree.

    Args:
        output_dir: A folder holding a saved model (`config.json`).
        model: The model whose classes ship; defaults to `HistoClassifierForImageClassification`.

    Returns:
        The code files written.

    Raises:
        FileNotFoundError: `output_dir` has no config.json.
        ValueError: A shipped file imports a sibling that is not in the bundle.
    """
    from .inference.pipeline import HistoImageClassificationPipeline

    output_dir = Path(output_dir)
    config_path = output_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: save the model (model.save_pretrained) before bundling its code.")
    if model is None:
        from .models import HistoClassifierForImageClassification

        model_cls, config_cls = (
            HistoClassifierForImageClassification,
            HistoClassifierForImageClassification.config_class,
        )
    else:
        model_cls, config_cls = type(model), type(model.config)
    written = write_code_bundle(output_dir, [HistoImageClassificationPipeline, model_cls, config_cls])

    from transformers.dynamic_module_utils import get_relative_imports

    names = {p.stem for p in written}
    for path in written:  # the check transformers' dynamic loader will make, done now with a clear message
        missing = sorted(set(get_relative_imports(path)) - names)
        if missing:
            raise ValueError(f"{path.name} imports {missing}, which are not in the bundle {sorted(names)}.")

    data = json.loads(config_path.read_text(encoding="utf-8"))
    fields = remote_code_fields(config_cls, model_cls)
    data["auto_map"] = {**(data.get("auto_map") or {}), **fields["auto_map"]}
    data["custom_pipelines"] = fields["custom_pipelines"]
    atomic_write_text(config_path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return written


def inference_image_processor(image_processor: Any) -> Any:
    """The image processor saved with a checkpoint: the training eval transform, as a transformers processor.

    Training resizes each patch to a square side and normalises it (`hf_histo.data.transforms.build_transforms(
    train=False)`); a `ViTImageProcessor` with that side, mean and std does the same (same resize backend), so
    the histo pipeline and the plain image-classification pipeline see what the model saw in training. Backbone
    processors that centre-crop (ConvNeXt's `crop_pct`, timm's eval crop) would not.

    Args:
        image_processor: The backbone's processor, an `InputSpec` or an int side.
    """
    from transformers import ViTImageProcessor

    from .data.transforms import input_spec

    spec = input_spec(image_processor)
    return ViTImageProcessor(
        do_resize=True,
        size={"height": spec.size, "width": spec.size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
    )


def save_for_hub(
    model: Any,
    output_dir: str | os.PathLike,
    *,
    image_processor: Any,
    metrics: Mapping[str, Any] | None = None,
    training_args: Any | None = None,
    data_info: Mapping[str, Any] | None = None,
    plots: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """Write a complete, Hub-ready checkpoint folder (weights, processor, code, plots, model card).

    Args:
        model: The trained `HistoClassifierForImageClassification` (unwrapped: no DDP/peft wrapper; merge LoRA
            first).
        output_dir: Folder to write (created; existing files of the same names are replaced).
        image_processor: The backbone's image processor (or an int side) used for training; what is saved is
            `inference_image_processor(image_processor)`: the training eval transform.
        metrics: Image-level results (see the module docstring).
        training_args: `TrainingArguments` (or a dict) whose hyperparameters go into the card.
        data_info: Facts about the data (see the module docstring).
        plots: PNG files to ship under `plots/` (a list, or `{name: path}`); a confusion matrix is drawn from
            `metrics` when none is given.
        repo_id: The Hub repo the folder is meant for (used in the card's snippet and model-index name).
        license: A Hub license id for the card metadata (e.g. `"apache-2.0"`, `"other"`).

    Returns:
        `output_dir` as a `Path`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_remote_code_config(model.config, model)
    model.save_pretrained(output_dir, safe_serialization=True)
    inference_image_processor(image_processor).save_pretrained(output_dir)
    bundle_code(output_dir, model)
    shipped = _copy_plots(output_dir, plots)
    cm_plot = _confusion_plot(output_dir, model.config, metrics, shipped)
    if cm_plot is not None:
        shipped.append(cm_plot)
    write_model_card(
        output_dir,
        config=model.config,
        metrics=metrics,
        training_args=training_args,
        data_info=data_info,
        plots=shipped,
        repo_id=repo_id,
        license=license,
    )
    return output_dir


def save_run(
    trainer: Any,
    metrics: Mapping[str, Any],
    output_dir: str | os.PathLike | None = None,
    data_info: Mapping[str, Any] | None = None,
    license: str | None = None,
) -> Path:
    """Write a finished run's model as a Hub-ready folder and upload it when the run asked for `--push_to_hub`.

    Called by every recipe after `finalize_run(..., save_model=False)`: the final model (unwrapped, LoRA merged)
    goes through `save_for_hub` with the run's metrics, hyperparameters, data facts and plots
    (`confusion_matrix.png`, `training_curves.png`), on the main process only. With `--push_to_hub` the folder is
    then uploaded once by `push_folder_to_hub` (rank 0) to `--hub_model_id`; Trainer's own checkpoint pushing stays
    off (`HistoTrainingArguments` moves the flag to `push_final_to_hub`).

    Args:
        trainer: The trained `HistoTrainer`.
        metrics: What `finalize_run` returned (the content of `metrics.json`).
        output_dir: Folder to write (default: `trainer.args.output_dir`).
        data_info: Facts about the data for the card (default: derived from the training split and `metrics["run"]`).
        license: A Hub license id for the card metadata.

    Returns:
        The folder.

    Raises:
        HubUnavailableError: `--push_to_hub` was given but the Hub cannot be reached; the folder is complete on disk.
    """
    from .training.trainer import final_model

    args = trainer.args
    output_dir = Path(output_dir or args.output_dir)
    repo_id = getattr(args, "hub_model_id", None)
    model = final_model(trainer)
    if trainer.is_world_process_zero():
        save_for_hub(
            model,
            output_dir,
            image_processor=trainer.processing_class,
            metrics=metrics,
            training_args=args,
            data_info=data_info if data_info is not None else run_data_info(trainer.train_dataset, metrics),
            plots=[
                p for p in (output_dir / "confusion_matrix.png", output_dir / "training_curves.png") if p.is_file()
            ],
            repo_id=repo_id,
            license=license,
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


def run_data_info(train_dataset: Any, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Card facts about a run's training data: name, layout, images, patches and images per class.

    Args:
        train_dataset: The training patch dataset (`image_id` and `label` columns; a `with_transform` view works).
        metrics: `finalize_run`'s payload; its `run.data` arguments give the data folder and patching.
    """
    data_args = ((metrics or {}).get("run") or {}).get("data") or {}
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


def _copy_plots(output_dir: Path, plots: Sequence | Mapping | None) -> list[Path]:
    if not plots:
        return []
    items = plots.items() if isinstance(plots, Mapping) else ((Path(p).name, p) for p in plots)
    target_dir = output_dir / _PLOTS_DIR
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


def _image_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    if not metrics:
        return {}
    image = dict(metrics.get("image", metrics))
    for key in ("ci", "split", "aggregation", "y_true", "y_pred"):
        if key in metrics and key not in image:
            image[key] = metrics[key]
    for key, value in metrics.items():  # top-level "image_macro_f1_ci" (finalize_run's metrics.json)
        if key.startswith("image_") and key.endswith("_ci"):
            image.setdefault(key[len("image_") :], value)
    return image


def _confusion_plot(output_dir: Path, config: Any, metrics: Mapping | None, shipped: list[Path]) -> Path | None:
    image = _image_metrics(metrics)
    if not image.get("confusion_matrix") or any("confusion" in p.name for p in shipped):
        return None
    from .training.metrics import plot_confusion_matrix

    labels = [config.id2label[i] for i in range(config.num_labels)]
    path = output_dir / _PLOTS_DIR / "confusion_matrix.png"
    path.parent.mkdir(exist_ok=True)
    return plot_confusion_matrix(image["confusion_matrix"], labels, path, title="Image-level confusion matrix")


# ---- the model card --------------------------------------------------------------------------------------------------
def _base_model(config: Any) -> str | None:
    name = getattr(config, "backbone_name", None)
    if not name:
        return None
    from .models.backbones import BACKBONES

    if name in BACKBONES:
        return BACKBONES[name].hub_id
    if os.path.exists(name) or name.count("/") != 1:
        return None  # a local folder is not a Hub id
    return name


def _ci(image: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    cis: dict[str, tuple[float, float]] = {}
    given = dict(image.get("ci") or {})
    for key, value in image.items():  # finalize_run's style: "macro_f1_ci": [low, high]
        if key.endswith("_ci") and key != "ci":
            given.setdefault(key[: -len("_ci")], value)
    for key, value in given.items():
        if isinstance(value, Mapping):
            value = (value.get("low"), value.get("high"))
        if value is not None and len(value) == 2 and None not in value:
            cis[key] = (float(value[0]), float(value[1]))
    if not cis and image.get("y_true") is not None and image.get("y_pred") is not None and len(image["y_true"]):
        from .training.metrics import BOOTSTRAP_METRICS, bootstrap_ci

        for key in BOOTSTRAP_METRICS:
            low, high = bootstrap_ci(image["y_true"], image["y_pred"], key)
            if math.isfinite(low) and math.isfinite(high):
                cis[key] = (low, high)
    return cis


def _hyperparameters(training_args: Any | None) -> dict[str, Any]:
    if training_args is None:
        return {}
    raw = training_args.to_dict() if hasattr(training_args, "to_dict") else dict(training_args)
    if isinstance(training_args, Mapping):
        keys = list(raw)
    else:
        keys = [k for k in _HYPERPARAMETERS if k in raw]
    out = {}
    for key in keys:
        value = raw[key]
        if value is None or value == "" or (key in ("max_steps", "warmup_steps") and value in (-1, 0)):
            continue
        out[key] = value.value if hasattr(value, "value") else value
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _snippet(model_ref: str) -> str:
    return f"""```python
from transformers import pipeline

# Whole image (+ optional mask): the training patches, batched, aggregated into one label per image.
classifier = pipeline("{TASK}", model="{model_ref}", trust_remote_code=True)
print(classifier("image.png"))  # [{{'label': ..., 'score': ...}}, ...] sorted by score
result = classifier("image.png", mask="mask.png", tta=True, return_patches=True)
print(result["predictions"][0], len(result["patches"]), "patches")

# One patch at a time, with the standard image-classification pipeline.
patch_classifier = pipeline("image-classification", model="{model_ref}", trust_remote_code=True)
print(patch_classifier("image.png"))
```"""


def build_model_card(
    config: Any,
    *,
    metrics: Mapping[str, Any] | None = None,
    training_args: Any | None = None,
    data_info: Mapping[str, Any] | None = None,
    plots: Sequence[str | os.PathLike] | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """Render the model card of a trained classifier.

    Args:
        config: The model's `HistoClassifierConfig`.
        metrics: Image-level results (see the module docstring).
        training_args: `TrainingArguments` or a dict of hyperparameters.
        data_info: Facts about the data (see the module docstring).
        plots: Image files inside the folder (under `plots/`) to show; the confusion matrix is the one whose name
            contains "confusion".
        repo_id: Hub repo id used in the snippet (`"user/name"`); `"path/to/this/folder"` when None.
        model_name: Name in model-index; defaults to the repo name.
        license: Hub license id for the metadata.

    Returns:
        A `huggingface_hub.ModelCard` (`str(card)` is the README.md text).
    """
    data_info = dict(data_info or {})
    image = _image_metrics(metrics)
    cis = _ci(image)
    labels = [config.id2label[i] for i in range(config.num_labels)]
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else "hf-histo-classifier")
    dataset_name = str(data_info.get("name") or "private histopathology dataset")
    datasets = data_info.get("datasets") or None
    datasets = [datasets] if isinstance(datasets, str) else datasets
    split = str(image.get("split") or "validation")
    aggregation = image.get("aggregation") or getattr(config, "aggregation", "soft")

    eval_results = []
    for key, (metric_type, metric_name, args) in _HUB_METRICS.items():
        value = image.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            eval_results.append(
                EvalResult(
                    task_type="image-classification",
                    task_name="Image classification (image level)",
                    dataset_type=datasets[0] if datasets else "imagefolder",
                    dataset_name=dataset_name,
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_value=round(float(value), 4),
                    metric_name=metric_name,
                    metric_args=args,
                )
            )
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=list(CARD_TAGS),
        base_model=_base_model(config),
        datasets=datasets,
        metrics=sorted({r.metric_type for r in eval_results}) or None,
        model_name=model_name,
        eval_results=eval_results or None,
        license=license,
    )

    patching = dict(getattr(config, "patching", None) or {})
    backbone = getattr(config, "backbone_name", None) or config.backbone_config.model_type
    lines = [
        f"# {model_name}",
        "",
        f"Image-level classifier of histopathology images into {len(labels)} classes ({', '.join(labels)}), "
        f"fine-tuned with hf-histo from `{backbone}`. Each image is cut into "
        "mask-guided patches, every patch is classified, and the patch probabilities are aggregated into one "
        f"label per image (`{aggregation}` aggregation).",
        "",
        "## Intended use and limitations",
        "",
        "- **Research use only.** This model is not a medical device, has not been clinically validated, and must "
        "not be used for diagnosis, prognosis or treatment decisions.",
        "- It was trained on a small dataset from a limited number of sources; expect lower performance on other "
        "scanners, stains, magnifications, tissue types and populations. Validate on your own data first.",
        "- Predictions depend on the patching: give the region-of-interest mask when you have one; without it, "
        "tissue detection selects the patches (inspect them with `hf-histo explain`).",
        "",
        "## Data and patching",
        "",
        f"- Dataset: {dataset_name}" + (f" ({', '.join(datasets)})" if datasets else ""),
        f"- Classes: {', '.join(f'`{label}`' for label in labels)}",
    ]
    for key, title in (
        ("layout", "Layout"),
        ("n_images", "Images"),
        ("n_patches", "Patches"),
        ("class_counts", "Images per class"),
        ("cleaning", "Cleaning"),
        ("notes", "Notes"),
    ):
        if data_info.get(key) not in (None, "", {}):
            value = data_info[key]
            if isinstance(value, Mapping):
                value = ", ".join(f"{k}: {v}" for k, v in value.items())
            lines.append(f"- {title}: {value}")
    if patching:
        lines.append(
            "- Patching (stored in `config.json`, reused by the pipeline): "
            + ", ".join(f"{k}={v}" for k, v in patching.items() if v is not None)
        )
    lines.append(f"- Aggregation of patch predictions: `{aggregation}`")

    lines += ["", "## Training procedure", ""]
    lines.append(
        f"Backbone `{backbone}` ({config.backbone_config.model_type}), pooling `{config.pooling}`, head "
        f"`{config.head}`, freezing policy `{config.freeze}`."
    )
    hyper = _hyperparameters(training_args)
    if hyper:
        lines += ["", "| hyperparameter | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in hyper.items()]

    lines += ["", "## Image-level results", ""]
    if image:
        n = image.get("n")
        lines.append(
            f"On the {split} split" + (f" ({n} images)" if n else "") + f", `{aggregation}` aggregation; "
            "95% bootstrap confidence intervals (images resampled with replacement)."
        )
        lines += ["", "| metric | value | 95% CI |", "|---|---|---|"]
        for key in ("macro_f1", "accuracy", "balanced_accuracy", "auroc", "kappa"):
            value = image.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                ci = cis.get(key)
                ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a"
                lines.append(f"| {key} | {value:.3f} | {ci_text} |")
        per_class = image.get("per_class_f1") or {}
        if per_class:
            lines += [
                "",
                "Per-class F1: "
                + ", ".join(
                    f"{k}: {v:.3f}" if isinstance(v, (int, float)) else f"{k}: n/a" for k, v in per_class.items()
                ),
            ]
    else:
        lines.append("No evaluation results were recorded for this checkpoint.")
    plot_paths = [Path(p) for p in plots or []]
    for path in plot_paths:
        rel = f"{_PLOTS_DIR}/{path.name}"
        title = "Confusion matrix (image level)" if "confusion" in path.name else path.stem.replace("_", " ")
        lines += ["", f"![{title}]({rel})"]

    lines += [
        "",
        "## How to use",
        "",
        "Needs `transformers>=5`, `torch`, `pillow`, `numpy` and `scipy` (hf-histo itself is not required: the "
        "code ships with the model).",
        "",
        _snippet(repo_id or "path/to/this/folder"),
        "",
        "Results are sorted by score; `return_patches=True` adds each patch's box, foreground fraction and "
        "probabilities; a `fallback` entry says when an image could not be patched normally.",
        "",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    config: Any | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_args: Any | None = None,
    data_info: Mapping[str, Any] | None = None,
    plots: Sequence[str | os.PathLike] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """Write `output_dir/README.md` (atomically); see `build_model_card` for the arguments.

    Args:
        output_dir: The checkpoint folder.
        config: The model config; read from `output_dir/config.json` when None.
        metrics: Image-level results.
        training_args: Training hyperparameters.
        data_info: Facts about the data.
        plots: Image files to show; defaults to the PNGs already under `output_dir/plots/`.
        repo_id: Hub repo id for the snippet.
        license: Hub license id.

    Returns:
        The README.md path.
    """
    output_dir = Path(output_dir)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(output_dir)
    if plots is None:
        plots = sorted((output_dir / _PLOTS_DIR).glob("*.png")) if (output_dir / _PLOTS_DIR).is_dir() else []
    card = build_model_card(
        config,
        metrics=metrics,
        training_args=training_args,
        data_info=data_info,
        plots=plots,
        repo_id=repo_id,
        license=license,
    )
    return atomic_write_text(output_dir / "README.md", str(card))


# ---- upload ----------------------------------------------------------------------------------------------------------
def hub_upload_files(output_dir: str | os.PathLike) -> list[str]:
    """Relative paths that `push_folder_to_hub` uploads: weights, configs, card, code and plots.

    Top level: config.json, preprocessor_config.json, README.md, `*.safetensors` (+ index), `*.py`, `*.png`;
    plus everything under `plots/`. Training leftovers stay local: checkpoint-*/, runs/, hidden and temporary
    files, and metrics.json / image_predictions.json / trainer_state.json (they may hold local paths and image ids).
    """
    output_dir = Path(output_dir)
    files = [
        p.name
        for p in output_dir.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and ".tmp" not in p.name
        and (p.name in _UPLOAD_NAMES or p.suffix in _UPLOAD_SUFFIXES)
    ]
    plots_dir = output_dir / _PLOTS_DIR
    if plots_dir.is_dir():
        files += [
            f"{_PLOTS_DIR}/{p.relative_to(plots_dir).as_posix()}"
            for p in plots_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        ]
    return sorted(files)


def _is_main_process() -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("RANK", "0") or 0) == 0


def _offline() -> bool:
    from huggingface_hub import is_offline_mode

    return is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _unavailable(folder: Path, repo_id: str, reason: str) -> HubUnavailableError:
    return HubUnavailableError(
        f"Could not push to https://huggingface.co/{repo_id}: {reason}. The checkpoint folder is complete at "
        f"{folder}; upload it later with `hf upload {repo_id} {folder} .` "
        f"(or `huggingface-cli upload {repo_id} {folder} .`) after `hf auth login`."
    )


def push_folder_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    is_main_process: bool | None = None,
) -> str | None:
    """Create `repo_id` (if needed) and upload the folder's model, processor, card, code and plots.

    Args:
        output_dir: A folder written by `save_for_hub`.
        repo_id: `"user/name"` on the Hub.
        token: Hub token; the logged-in token by default.
        private: Create the repo as private.
        commit_message: Commit message of the upload.
        is_main_process: Whether this process uploads; by default rank 0 of `torch.distributed` (or `RANK`).

    Returns:
        The commit URL, or None on non-main processes (which do nothing).

    Raises:
        FileNotFoundError: The folder lacks a required file (it would not load from the Hub).
        HubUnavailableError: Offline mode, no network, or no valid login; the folder is left as it was.
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if is_main_process is None:
        is_main_process = _is_main_process()
    if not is_main_process:
        return None
    folder = Path(output_dir).resolve()
    files = hub_upload_files(folder) if folder.is_dir() else []
    missing = [name for name in REQUIRED_FILES if name not in files]
    if not any(name.startswith("model") and name.endswith(".safetensors") for name in files):
        missing.append("model.safetensors")
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete checkpoint (missing {missing}); write it with save_for_hub."
        )
    if _offline():
        raise _unavailable(folder, repo_id, "offline mode is on (HF_HUB_OFFLINE=1)")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=files,
            commit_message=commit_message or "Upload hf-histo model, processor, code, card and plots",
        )
    except OfflineModeIsEnabled as error:
        raise _unavailable(folder, repo_id, "offline mode is on (HF_HUB_OFFLINE=1)") from error
    except LocalTokenNotFoundError as error:
        raise _unavailable(folder, repo_id, "not logged in (no Hub token found)") from error
    except HfHubHTTPError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _unavailable(folder, repo_id, f"the Hub refused the upload ({reason})") from error
    except (ConnectionError, TimeoutError, OSError) as error:
        raise _unavailable(folder, repo_id, f"the Hub is unreachable ({type(error).__name__}: {error})") from error
    except Exception as error:  # httpx transport errors (no network) do not derive from OSError
        if type(error).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise _unavailable(folder, repo_id, f"the Hub is unreachable ({type(error).__name__})") from error
        raise
    return str(getattr(commit, "commit_url", commit))
