"""The model card of a trained classifier, rendered from `model_card_template.md` and one `ImageLevelResult`."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..inference.pipeline import TASK
from ..inference.results import ImageLevelResult
from ..training.summary import macro_f1_text
from ..utils import atomic_write_text

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
PLOTS_DIR = "plots"
CARD_TAGS = ["histopathology", "hf-histo", "image-classification", "medical-imaging", "pathology"]
_HUB_METRICS = {  # our metric key -> (Hub metric id, display name, args)
    "macro_f1": ("f1", "Image-level macro F1", {"average": "macro"}),
    "accuracy": ("accuracy", "Image-level accuracy", None),
    "balanced_accuracy": ("balanced_accuracy", "Image-level balanced accuracy", None),
    "auroc": ("roc_auc", "Image-level macro one-vs-rest AUROC", {"multi_class": "ovr", "average": "macro"}),
    "kappa": ("cohen_kappa", "Image-level Cohen's kappa", None),
}
_DATA_FACTS = (
    ("layout", "Layout"),
    ("n_images", "Images"),
    ("n_patches", "Patches"),
    ("class_counts", "Images per class"),
    ("final_fit", "Trained on"),
    ("cleaning", "Cleaning"),
    ("notes", "Notes"),
)
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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


def _base_model(config: Any) -> str | None:
    name = getattr(config, "backbone_name", None)
    if not name:
        return None
    from ..models.backbones import BACKBONES

    if name in BACKBONES:
        return BACKBONES[name].hub_id
    if os.path.exists(name) or name.count("/") != 1:
        return None  # a local folder is not a Hub id
    return name


def _hyperparameters(training_args: Any | None) -> list[tuple[str, str]]:
    if training_args is None:
        return []
    raw = training_args.to_dict() if hasattr(training_args, "to_dict") else dict(training_args)
    keys = list(raw) if isinstance(training_args, Mapping) else [k for k in _HYPERPARAMETERS if k in raw]
    rows = []
    for key in keys:
        value = raw[key]
        if value is None or value == "" or (key in ("max_steps", "warmup_steps") and value in (-1, 0)):
            continue
        rows.append((key, _fmt(value.value if hasattr(value, "value") else value)))
    return rows


def _eval_results(result: ImageLevelResult, dataset_name: str, dataset_type: str, split: str) -> list[EvalResult]:
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image classification (image level)",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=metric_type,
            metric_value=round(float(result.metrics[key]), 4),
            metric_name=metric_name,
            metric_args=args,
        )
        for key, (metric_type, metric_name, args) in _HUB_METRICS.items()
        if _finite(result.metrics.get(key))
    ]


def _split_note(split: str, training_args: Any | None) -> str:
    """What the evaluated images were to the run, so that a reader knows how far the figures generalise."""
    if split == "test":
        return "held out: used neither for training nor for choosing the checkpoint"
    if split == "out_of_fold":
        return "each scored by the fold model that did not train on it"
    reloaded = training_args is not None and _setting(training_args, "load_best_model_at_end")
    if split == "validation" and reloaded:
        return "held out from training, but they also chose the best checkpoint: the figures are optimistic"
    return ""


def _setting(training_args: Any, key: str) -> Any:
    return training_args.get(key) if isinstance(training_args, Mapping) else getattr(training_args, key, None)


def _calibration_vars(result: ImageLevelResult | None) -> dict[str, Any]:
    """Template variables of the calibration table: ECE, Brier and NLL before and after temperature scaling."""
    record = (result.calibration if result is not None else None) or {}
    before, after = record.get("before") or {}, record.get("after") or {}
    rows = [
        (key, f"{before[key]:.3f}", f"{after[key]:.3f}")
        for key in ("ece", "brier", "nll")
        if _finite(before.get(key)) and _finite(after.get(key))
    ]
    return {
        "calibration_rows": rows,
        "calibration_fitted_on": str(record.get("fitted_on", "")).replace("_", "-"),
        "calibration_n": record.get("n_images"),
    }


def _result_vars(result: ImageLevelResult | None, split: str, training_args: Any | None) -> dict[str, Any]:
    """Template variables of the results section: figures, CI, per-class F1, TTA and aggregation."""
    if result is None or not any(_finite(result.metrics.get(key)) for key in _HUB_METRICS):
        return {"results": []}
    rows = []
    for key in _HUB_METRICS:
        value = result.metrics.get(key)
        if _finite(value):
            ci = (result.ci or {}).get(key)
            ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and all(_finite(v) for v in ci) else "n/a"
            rows.append((key, f"{value:.3f}", ci_text))
    per_class = result.metrics.get("per_class_f1") or {}
    n = result.metrics.get("n")
    n_images = f"{n} labelled images" if n else f"{len(result.image_ids)} images"
    if result.n_patches:
        n_images += f", {result.n_patches} patches"
    patch = result.patch_metrics or {}
    return {
        "results": rows,
        "split": split,
        "split_note": _split_note(split, training_args),
        "headline": macro_f1_text(result) if _finite(result.metrics.get("macro_f1")) else "",
        "n_images": n_images,
        "result_aggregation": result.aggregation,
        "tta": result.tta,
        "per_class_f1": ", ".join(f"{k}: {v:.3f}" if _finite(v) else f"{k}: n/a" for k, v in per_class.items()),
        "patch_results": ", ".join(f"{k} {patch[k]:.3f}" for k in ("macro_f1", "accuracy") if _finite(patch.get(k))),
        **_calibration_vars(result),
    }


def build_model_card(
    config: Any,
    *,
    result: ImageLevelResult | None = None,
    training_args: Any | None = None,
    data_info: Mapping[str, Any] | None = None,
    plots: Sequence[str | os.PathLike] | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    split: str | None = None,
) -> ModelCard:
    """Render the model card of a trained classifier.

    Args:
        config: The model's `HistoClassifierConfig`.
        result: The image-level evaluation (figures, bootstrap CI, TTA and aggregation used); None for a card
            without results.
        training_args: `TrainingArguments` or a dict of hyperparameters for the hyperparameter table.
        data_info: Facts about the data; keys read: `name`, `datasets` (Hub dataset ids), `layout`, `n_images`,
            `n_patches`, `class_counts`, `cleaning`, `notes`.
        plots: Image files inside the folder (under `plots/`) to show; the confusion matrix is the one whose name
            contains "confusion".
        repo_id: Hub repo id used in the snippet (`"user/name"`); `"path/to/this/folder"` when None.
        model_name: Name in model-index; defaults to the repo name.
        license: Hub license id for the metadata.
        split: Name of the evaluated images in the card (default: `result.split`), e.g. `"test"` for held-out
            images that chose nothing; the card states it with the macro-F1 and its 95% CI.

    Returns:
        A `huggingface_hub.ModelCard` (`str(card)` is the README.md text).
    """
    split = split or (result.split if result is not None else "")
    data_info = dict(data_info or {})
    labels = [config.id2label[i] for i in range(config.num_labels)]
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else "hf-histo-classifier")
    dataset_name = str(data_info.get("name") or "private histopathology dataset")
    datasets = data_info.get("datasets") or None
    datasets = [datasets] if isinstance(datasets, str) else datasets
    dataset_type = datasets[0] if datasets else "imagefolder"
    eval_results = _eval_results(result, dataset_name, dataset_type, split) if result else []
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
    temperature = getattr(config, "calibration_temperature", None)
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        labels=labels,
        backbone=getattr(config, "backbone_name", None) or config.backbone_config.model_type,
        backbone_type=config.backbone_config.model_type,
        pooling=config.pooling,
        head=config.head,
        freeze=config.freeze,
        aggregation=getattr(config, "aggregation", "soft"),
        temperature=f"{temperature:.4g}" if _finite(temperature) else None,
        roi_model=getattr(config, "roi_model", None),
        dataset_name=dataset_name,
        dataset_ids=datasets or [],
        data_facts=[
            (title, _fmt(data_info[key])) for key, title in _DATA_FACTS if data_info.get(key) not in (None, "", {})
        ],
        patching=", ".join(f"{k}={v}" for k, v in patching.items() if v is not None),
        hyperparameters=_hyperparameters(training_args),
        plots=[
            (
                "Confusion matrix (image level)" if "confusion" in Path(p).name else Path(p).stem.replace("_", " "),
                f"{PLOTS_DIR}/{Path(p).name}",
            )
            for p in plots or []
        ],
        task=TASK,
        model_ref=repo_id or "path/to/this/folder",
        **_result_vars(result, split, training_args),
    )


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    config: Any | None = None,
    result: ImageLevelResult | None = None,
    training_args: Any | None = None,
    data_info: Mapping[str, Any] | None = None,
    plots: Sequence[str | os.PathLike] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    split: str | None = None,
) -> Path:
    """Write `output_dir/README.md` (atomically); see `build_model_card` for the arguments.

    Args:
        output_dir: The checkpoint folder.
        config: The model config; read from `output_dir/config.json` when None.
        result: The image-level evaluation.
        training_args: Training hyperparameters.
        data_info: Facts about the data.
        plots: Image files to show; defaults to the PNGs already under `output_dir/plots/`.
        repo_id: Hub repo id for the snippet.
        license: Hub license id.
        split: Name of the evaluated images (default: `result.split`), e.g. `"test"`.

    Returns:
        The README.md path.
    """
    output_dir = Path(output_dir)
    if config is None:
        from transformers import AutoConfig

        from ..models import register_auto_classes

        register_auto_classes()  # idempotent; the package registers lazily, the config loads by Auto class
        config = AutoConfig.from_pretrained(output_dir)
    if plots is None:
        plots = sorted((output_dir / PLOTS_DIR).glob("*.png")) if (output_dir / PLOTS_DIR).is_dir() else []
    card = build_model_card(
        config,
        result=result,
        training_args=training_args,
        data_info=data_info,
        plots=plots,
        repo_id=repo_id,
        license=license,
        split=split,
    )
    return atomic_write_text(output_dir / "README.md", str(card))
