"""Recipe building blocks: patch datasets, model + image processor, transforms, embedding-cache switch."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..data.patching import FIXED_SIZE_STRATEGIES, PatchingConfig
from ..data.transforms import (
    AugmentationSeed,
    InputSpec,
    build_patch_augment,
    build_transforms,
    input_spec,
    make_image_processor,
    patch_transform_fn,
)
from .arguments import TINY_PREFIX, DataArguments, HistoTrainingArguments, ModelArguments

logger = logging.getLogger(__name__)

DEMO_IMAGES = {"n_train": 36, "n_test": 8, "size_range": (256, 448)}


def setup_logging(training_args: HistoTrainingArguments | None = None) -> None:
    """Show hf-histo's INFO messages (unfreezing steps, param groups) on the main process."""
    level = logging.INFO
    if training_args is not None and not training_args.should_log:
        level = logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hf_histo").setLevel(level)


def build_datasets(data_args: DataArguments, seed: int = 0):
    """Cut (or load from cache) the patch dataset; with `--demo`, generate the sample images first.

    Logs the build report once (splits, patches per image, where the patch cache is).

    Returns:
        The `datasets.DatasetDict` of `load_patch_dataset` ("train", "validation", maybe "test").
    """
    from ..data.builder import build_patch_dataset

    data_dir = Path(data_args.data_dir)
    if data_args.demo and not (data_dir / "train_labels.csv").exists():
        from ..data.synthetic import make_synthetic_dataset

        make_synthetic_dataset(data_dir, seed=seed, overwrite=True, **DEMO_IMAGES)
    data, report = build_patch_dataset(
        data_dir,
        data_args.patching(),
        val_fraction=data_args.val_fraction,
        seed=seed,
        n_folds=data_args.n_folds,
        fold=data_args.fold,
        cache_dir=data_args.cache_dir,
        layout=data_args.layout,
        exclude=data_args.exclude,
        on_error=data_args.on_error,
        resize_masks=data_args.resize_masks,
        max_image_pixels=data_args.max_image_pixels,
        num_proc=data_args.num_proc,
    )
    logger.info("patch dataset %s", report.summary())
    return data


def _processor_for(name: str, revision: str | None, fallback_size: int):
    """The backbone's own image processor (read for size/mean/std), or ImageNet defaults when it has none."""
    if name.startswith(TINY_PREFIX):
        return InputSpec(fallback_size)
    from transformers import AutoImageProcessor

    from ..models import BACKBONES

    entry = BACKBONES.get(name)
    if entry is not None and entry.hub_id is None:
        return InputSpec(fallback_size)
    source = entry.hub_id if entry is not None else name
    try:
        return AutoImageProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        logger.warning(
            "no image processor for %s (%s); using %d px and ImageNet statistics", source, error, fallback_size
        )
        return InputSpec(fallback_size)


def _is_histo_checkpoint(path: str) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and '"histo_classifier"' in config.read_text(encoding="utf-8")


def build_model(
    model_args: ModelArguments,
    labels: list[str],
    patching: PatchingConfig | None = None,
    image_size: int | None = None,
):
    """Build the classifier and its image processor.

    `model_name_or_path` may be a backbone table name / Hub id / local folder (pretrained backbone + new head), a
    trained hf-histo checkpoint (fine-tuned further; labels must match), or `tiny-<family>` (a tiny random
    backbone for tests and `--demo`). LoRA is applied when `--lora_r > 0`.

    Args:
        model_args: Model arguments.
        labels: Class names in index order (the patch dataset's `ClassLabel` names).
        patching: How the training patches were cut; stored in the model config as `patching.to_dict()` (JSON), which
            inference reads back with `PatchingConfig.from_dict`. None keeps a trained checkpoint's own (a new
            model then has none, and inference refuses it until one is set).
        image_size: Input side override (default: the backbone processor's).

    Returns:
        `(model, image_processor)`.
    """
    from transformers import AutoModelForImageClassification

    from ..models import (
        HistoClassifierConfig,
        HistoClassifierForImageClassification,
        apply_lora,
        get_backbone_spec,
        tiny_backbone_config,
    )

    id2label = dict(enumerate(labels))
    name = model_args.model_name_or_path
    head_kw = {
        "head": model_args.head,
        "head_hidden": model_args.head_hidden,
        "head_layers": model_args.head_layers,
        "head_activation": model_args.head_activation,
        "dropout": model_args.dropout,
        "freeze": model_args.freeze,
        "trainable_blocks": model_args.trainable_blocks,
        "aggregation": model_args.aggregation,
        "mil_hidden": model_args.mil_hidden,
        "mil_dropout": model_args.mil_dropout,
        "patching": None if patching is None else patching.to_dict(),
    }
    if model_args.pooling is not None:
        head_kw["pooling"] = model_args.pooling
    if name.startswith(TINY_PREFIX):
        backbone_config = tiny_backbone_config(name[len(TINY_PREFIX) :])
        config = HistoClassifierConfig(
            backbone_config=backbone_config,
            backbone_name=name,
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            **head_kw,
        )
        model = HistoClassifierForImageClassification(config)
        native = getattr(backbone_config, "image_size", None)
        processor_source: Any = InputSpec(int(native) if isinstance(native, int) else 32)
    elif os.path.isdir(name) and _is_histo_checkpoint(name):
        from ..models import register_auto_classes

        register_auto_classes()  # idempotent; the package registers lazily, the checkpoint loads by Auto class
        model = AutoModelForImageClassification.from_pretrained(name)
        if [model.config.id2label[i] for i in range(len(labels))] != labels:
            raise ValueError(f"checkpoint {name} has labels {model.config.id2label}, the data has {labels}")
        if patching is not None:
            model.config.patching = patching.to_dict()
        model.config.aggregation = model_args.aggregation
        if model_args.aggregation == "attention":  # its patch model trains further: a new MIL head follows it
            model.reset_mil_head(model_args.mil_hidden, model_args.mil_dropout)
        model.apply_freeze(model_args.freeze, model_args.trainable_blocks)
        from transformers import AutoImageProcessor

        processor_source = AutoImageProcessor.from_pretrained(name)
    else:
        model = HistoClassifierForImageClassification.from_backbone(
            name, id2label=id2label, revision=model_args.model_revision, **head_kw
        )
        processor_source = _processor_for(name, model_args.model_revision, 224)
    if not get_backbone_spec(model.config.backbone_config).tokens:
        # Convolutions in channels-last layout run 2-20x faster on CPU (oneDNN) and use tensor cores on GPU.
        model = model.to(memory_format=torch.channels_last)
    spec = input_spec(processor_source)
    if image_size:
        spec = InputSpec(image_size, spec.mean, spec.std)
    if model_args.lora_r:
        targets = model_args.lora_targets.split(",") if model_args.lora_targets else None
        model = apply_lora(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=targets,
        )
    return model, make_image_processor(spec)


def with_patch_transforms(
    data, processor, data_args: DataArguments, eval_split: str = "validation", seed: int = 0, device: Any = None
):
    """Attach the train (augmenting) and eval (deterministic) transforms to the splits.

    Training rows carry uint8 patches, cropped, flipped and turned in the DataLoader workers, and their colour /
    stain jitter parameters; `HistoTrainer` jitters and normalises each batch on the training device (the
    dataset's `batch_augment`, see `build_patch_augment`). When that device is a GPU and the patches have one
    size, the crop, resize, flips and turns move to the batch too, leaving the workers only the decode. The draws
    are seeded per patch and epoch (`AugmentationSeed`), so resumed runs augment like uninterrupted ones, with any
    number of workers, and both placements draw the same augmentation.

    Args:
        device: The training device (`training_args.device`); None counts as the CPU.

    Returns:
        `(train_dataset, eval_dataset)`: `with_transform` views producing `pixel_values` and `labels` (and
        `augment_params` for training); the other columns (`image_id`, `foreground`) stay readable for
        image-level metrics.
    """
    spec = input_spec(processor)
    train_tf = build_patch_augment(
        spec,
        augment=data_args.augment,
        crop_scale=(data_args.crop_scale_min, 1.0),
        color_jitter=data_args.color_jitter,
        hed_jitter=data_args.hed_jitter,
        geometry_on_batch=device is not None
        and torch.device(device).type == "cuda"
        and data_args.strategy in FIXED_SIZE_STRATEGIES,
    )
    eval_tf = build_transforms(spec, train=False)
    train = data["train"].with_transform(patch_transform_fn(train_tf, seed=AugmentationSeed(seed)))
    evaluation = data[eval_split].with_transform(patch_transform_fn(eval_tf)) if eval_split in data else None
    return train, evaluation


def embedding_cache_applies(model, data_args: DataArguments, training_args: HistoTrainingArguments) -> bool:
    """Whether the head can train on cached backbone embeddings (`--use_embedding_cache auto|yes|no`).

    It applies when no backbone parameter is trainable and the training augmentation is a finite set of views
    that can be cached (`none`, or `flips` = the 8 flips/quarter turns) without CutMix/MixUp.
    """
    mode = training_args.use_embedding_cache
    if mode == "no":
        return False
    frozen = not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("classifier."))
    cacheable = data_args.augment in ("none", "flips") and not (data_args.cutmix_alpha or data_args.mixup_alpha)
    if mode == "yes" and not (frozen and cacheable):
        raise ValueError(
            "--use_embedding_cache yes needs a frozen backbone (--freeze backbone) and --augment none|flips without "
            "CutMix/MixUp"
        )
    return frozen and cacheable


def run_info(recipe: str, data_args: DataArguments, model_args: ModelArguments, training_args) -> dict[str, Any]:
    """Facts about a run for `metrics.json` and the model card."""
    keys = (
        "learning_rate",
        "head_learning_rate",
        "optim_name",
        "num_train_epochs",
        "per_device_train_batch_size",
        "weight_decay",
        "loss",
        "layer_decay",
        "unfreeze_every_epochs",
        "unfreeze_blocks",
        "seed",
        "tta",
    )
    return {
        "recipe": recipe,
        "data": {k: v for k, v in vars(data_args).items() if not k.startswith("_")},
        "model": {k: v for k, v in vars(model_args).items() if not k.startswith("_")},
        "training": {k: getattr(training_args, k, None) for k in keys},
    }
