"""Dataclasses for `HfArgumentParser`: data, model and training arguments, with `--config file.yaml|json`."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments

from ..data.patching import EMPTY_FALLBACKS, STAIN_NORMS, STRATEGIES, PatchingConfig
from ..data.transforms import AUGMENTATIONS
from ..data.workers import default_num_proc, default_num_workers
from ..models.aggregation import AGGREGATIONS
from ..models.configuration_histo import FREEZE_POLICIES, HEADS, TTA_MODES
from .config_file import bool_flag, given, load_config_file, pop_config
from .launch import exit_on_data_error, relaunch_for_cpu_ddp

OPTIMIZERS = ("adamw", "lion", "sgd")
LOSSES = ("ce", "weighted_ce", "focal")
TINY_PREFIX = "tiny-"

# Applied under --demo before the config file and the command line, so that explicit flags still win.
DEMO_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 3,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "logging_steps": 5,
}


def _check(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"--{name}={value!r} is not supported; choose one of {list(allowed)}")


def _patching_field(name: str) -> Any:
    """A `DataArguments` field for `PatchingConfig.<name>`: the same default and help (one source for both)."""
    source = PatchingConfig.__dataclass_fields__[name]
    return field(default=source.default, metadata={"help": source.metadata["help"]})


@dataclass
class DataArguments:
    """Where the images are and how patches are cut and augmented."""

    data_dir: str | None = field(
        default=None,
        metadata={"help": "Labelled image folder (challenge, table or class-folder layout) or a clean_manifest.csv."},
    )
    layout: str | None = field(
        default=None, metadata={"help": "Force the folder layout: challenge, table, class_folders or manifest."}
    )
    on_error: str = field(
        default="raise", metadata={"help": "A bad image or data row: stop, naming it (raise), or leave it out (skip)."}
    )
    resize_masks: bool = field(
        default=False, metadata={"help": "Resize masks whose size differs from their image (else an error)."}
    )
    max_image_pixels: int | None = field(
        default=None,
        metadata={"help": "Pixel limit of PIL's decompression-bomb check; raise it for trusted large images."},
    )
    demo: bool = field(
        default=False,
        metadata={"help": "Generate H&E-like sample data (output_dir/demo_data) and use a tiny random backbone."},
    )
    # Every PatchingConfig field, same name, default and help (see hf_histo/data/patching.py); `patching()` builds it.
    strategy: str = _patching_field("strategy")
    patch_size: int = _patching_field("patch_size")
    stride: int | None = _patching_field("stride")
    min_foreground: int = _patching_field("min_foreground")
    min_fraction: float | None = _patching_field("min_fraction")
    top_k: int = _patching_field("top_k")
    min_area: int = _patching_field("min_area")
    pad: int = _patching_field("pad")
    paint_background: bool = _patching_field("paint_background")
    empty_fallback: str = _patching_field("empty_fallback")
    stain_norm: str = _patching_field("stain_norm")
    val_fraction: float = field(default=0.1, metadata={"help": "Fraction of images (by group) held out for eval."})
    n_folds: int | None = field(
        default=None, metadata={"help": "Grouped k-fold cross-validation: train one model per fold (e.g. 5)."}
    )
    fold: int | None = field(
        default=None, metadata={"help": "Run only this fold of --n_folds (0-based), as --n_folds alone trains it."}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Model input side in pixels (default: the backbone image processor's)."}
    )
    augment: str = field(
        default="histo",
        metadata={
            "help": "Training augmentation: none, flips (flips + 90-degree rotations) or histo (+ random "
            "resized crop, colour jitter, HED stain jitter)."
        },
    )
    crop_scale_min: float = field(default=0.6, metadata={"help": "Smallest area fraction of RandomResizedCrop."})
    color_jitter: float = field(default=0.1, metadata={"help": "Brightness/contrast/saturation jitter (histo)."})
    hed_jitter: float = field(default=0.05, metadata={"help": "HED stain jitter sigma and bias (histo)."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix Beta alpha (0 disables; seed 002 used 1.0)."})
    mixup_alpha: float = field(default=0.0, metadata={"help": "MixUp Beta alpha (0 disables)."})
    mix_prob: float = field(default=1.0, metadata={"help": "Probability that a training batch is mixed."})
    exclude: str | None = field(
        default=None, metadata={"help": "File of image ids to leave out (e.g. `hf-histo clean`'s exclusion list)."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "datasets cache folder for the patch dataset (and its embedding cache)."}
    )
    num_proc: int = field(
        default_factory=default_num_proc,
        metadata={"help": "Processes cutting patches into the cache (default: the available CPUs, at most 8)."},
    )

    def __post_init__(self) -> None:
        for name, allowed in (
            ("strategy", STRATEGIES),
            ("empty_fallback", EMPTY_FALLBACKS),
            ("stain_norm", STAIN_NORMS),
        ):
            _check(name, getattr(self, name), allowed)
        _check("augment", self.augment, AUGMENTATIONS)
        _check("on_error", self.on_error, ("raise", "skip"))
        if self.data_dir is None and not self.demo:
            raise ValueError("--data_dir is required (or pass --demo to generate sample data)")
        self.patching()  # PatchingConfig's own checks (sizes, fractions, counts), before any file is read
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.n_folds is not None and self.n_folds < 2:
            raise ValueError(f"--n_folds must be >= 2, got {self.n_folds}")
        if self.fold is not None and (self.n_folds is None or not 0 <= self.fold < self.n_folds):
            raise ValueError(f"--fold {self.fold} needs --n_folds > fold (got n_folds={self.n_folds})")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"--crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if min(self.cutmix_alpha, self.mixup_alpha, self.color_jitter, self.hed_jitter) < 0:
            raise ValueError("--cutmix_alpha, --mixup_alpha, --color_jitter and --hed_jitter must be >= 0")
        if not 0.0 < self.mix_prob <= 1.0:
            raise ValueError(f"--mix_prob must be in (0, 1], got {self.mix_prob}")
        if self.num_proc < 1:
            raise ValueError(f"--num_proc must be >= 1, got {self.num_proc}")

    def patching(self) -> PatchingConfig:
        """The patching fields as one validated `PatchingConfig` (for the dataset builder and the model config)."""
        return PatchingConfig(**{f.name: getattr(self, f.name) for f in fields(PatchingConfig)})


@dataclass
class ModelArguments:
    """Which backbone, which head, what is frozen, how patches vote."""

    model_name_or_path: str = field(
        default="phikon",
        metadata={
            "help": "Backbone: table name (phikon, convnext-tiny, resnet, ...), Hub id, local folder, a "
            "trained hf-histo checkpoint, or tiny-<family> (vit, convnext, resnet, dinov2, timm) for tests."
        },
    )
    demo_model: str = field(default="tiny-vit", metadata={"help": "Backbone used with --demo."})
    head: str = field(default="linear", metadata={"help": "Head: linear, mlp or deep."})
    head_hidden: int = field(default=512, metadata={"help": "Hidden width of the mlp/deep head."})
    head_layers: int = field(default=4, metadata={"help": "Hidden layers of the deep head."})
    head_activation: str = field(default="gelu", metadata={"help": "Activation of the mlp head."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout in the head."})
    pooling: str | None = field(default=None, metadata={"help": "cls, mean, cls_mean or pooler (default: table)."})
    freeze: str = field(
        default="none",
        metadata={
            "help": "Static freezing: none, backbone (head only), backbone_except_norm, last_n (see "
            "--trainable_blocks). Progressive unfreezing is --unfreeze_every_epochs instead."
        },
    )
    trainable_blocks: int | None = field(default=None, metadata={"help": "Trainable last blocks for freeze=last_n."})
    aggregation: str = field(
        default="soft",
        metadata={
            "help": "Patch-to-image voting: soft (mean prob), hard (majority), mask_weighted, or attention (a "
            "gated-attention MIL head trained on the patch embeddings after the patch model; see --mil_*)."
        },
    )
    mil_hidden: int | None = field(default=None, metadata={"help": "Width of the attention-MIL head (default 128)."})
    mil_dropout: float = field(default=0.25, metadata={"help": "Dropout after the MIL head's projection."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the backbone (0: no LoRA)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    lora_targets: str | None = field(
        default=None, metadata={"help": "Comma-separated module names for LoRA (default: the backbone table's)."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the backbone."})

    def __post_init__(self) -> None:
        _check("head", self.head, HEADS)
        _check("freeze", self.freeze, FREEZE_POLICIES)
        _check("aggregation", self.aggregation, AGGREGATIONS)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.freeze == "last_n" and (self.trainable_blocks is None or self.trainable_blocks < 0):
            raise ValueError("--freeze last_n needs --trainable_blocks >= 0")
        if self.freeze != "last_n" and self.trainable_blocks is not None:
            raise ValueError("--trainable_blocks is only used with --freeze last_n")
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0, got {self.lora_r}")
        if (self.mil_hidden is not None and self.mil_hidden < 1) or not 0.0 <= self.mil_dropout < 1.0:
            raise ValueError(
                f"--mil_hidden must be >= 1 and --mil_dropout in [0, 1), got {self.mil_hidden}, {self.mil_dropout}"
            )
        if self.lora_r and self.freeze != "none":
            raise ValueError("--lora_r trains adapters on a frozen backbone by itself: leave --freeze none")


@dataclass
class HistoTrainingArguments(TrainingArguments):
    """`TrainingArguments` with hf-histo's optimizer, unfreezing, loss and evaluation options.

    Defaults differ from `TrainingArguments` where patch classification needs it: evaluation and saving every
    epoch, best model by image-level macro-F1, streaming eval metrics, no column removal, no reporting.
    """

    optim_name: str = field(default="adamw", metadata={"help": "Optimizer: adamw, lion (timm) or sgd."})
    head_learning_rate: float | None = field(
        default=None, metadata={"help": "Head learning rate; --learning_rate is the backbone's (default: the same)."}
    )
    layer_decay: float = field(
        default=1.0, metadata={"help": "Layer-wise LR decay per backbone block towards the input (e.g. 0.75)."}
    )
    block_granularity: str = field(
        default="block", metadata={"help": "What a 'block' is for LR decay and unfreezing: block or stage (CNNs)."}
    )
    unfreeze_every_epochs: float | None = field(
        default=None, metadata={"help": "Progressive unfreezing: head first, then blocks every N epochs (seed: 20)."}
    )
    unfreeze_blocks: int = field(default=2, metadata={"help": "Blocks unfrozen at each unfreezing step."})
    unfreeze_start_epoch: float | None = field(
        default=None, metadata={"help": "Epoch of the first unfreezing step (default: --unfreeze_every_epochs)."}
    )
    frozen_head_learning_rate: float | None = field(
        default=None, metadata={"help": "Head learning rate while the whole backbone is still frozen (seed: 3e-4)."}
    )
    loss: str = field(default="ce", metadata={"help": "Loss: ce, weighted_ce (class weights) or focal."})
    class_weights: list[float] | None = field(
        default=None, metadata={"help": "Class weights in label order (default for weighted_ce: from train counts)."}
    )
    class_weight_scheme: str = field(default="inverse", metadata={"help": "Weights from counts: inverse|effective."})
    focal_gamma: float = field(default=2.0, metadata={"help": "Focusing parameter of the focal loss."})
    balanced_sampler: bool = field(default=False, metadata={"help": "Sample training patches class-balanced."})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without image macro-F1 improvement."}
    )
    tta: str = field(default="none", metadata={"help": "Test-time augmentation at evaluation: none, flips, d4."})
    ema_decay: float = field(default=0.0, metadata={"help": "Decay of a weight EMA the model ends with (0: off)."})
    precise_bn: bool = field(default=False, metadata={"help": "Recompute BatchNorm statistics after training."})
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the image macro-F1 95% CI."})
    calibrate: bool = field(
        default=True,
        metadata={
            "help": "Fit a temperature on the validation images' probabilities (out-of-fold ones under --n_folds) "
            "and store it in the model config; every inference entry point applies it. Needs a validation split. "
            "--no_calibrate: none."
        },
    )
    cv_results: str | None = field(
        default=None,
        metadata={
            "help": "With --val_fraction 0 (the model you ship, trained on all images): the --output_dir of this "
            "recipe's --n_folds run on the same data, whose out-of-fold figures the model card reports."
        },
    )
    resume_folds: bool = field(
        default=False,
        metadata={
            "help": "Continue the --n_folds run in --output_dir that a kill stopped: finished folds are kept, an "
            "unfinished one resumes from its last checkpoint; refused if any setting differs from that run's."
        },
    )
    mil_epochs: int = field(default=40, metadata={"help": "Epochs of the attention-MIL head over the train images."})
    mil_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the attention-MIL head."})
    mil_weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay of the attention-MIL head."})
    mil_batch_size: int = field(default=8, metadata={"help": "Images (bags of patches) per attention-MIL step."})
    use_embedding_cache: str = field(
        default="auto",
        metadata={
            "help": "Train the head on cached backbone embeddings: auto (when the backbone is frozen and "
            "augmentation is none/flips without CutMix/MixUp), yes, no."
        },
    )

    # TrainingArguments fields with defaults suited to patch classification.
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate: no, steps, epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save: no, steps, epoch, best."})
    logging_strategy: str = field(default="epoch", metadata={"help": "When to log: no, steps, epoch."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (best one included)."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Reload the best checkpoint at the end."})
    metric_for_best_model: str | None = field(
        default="image_macro_f1", metadata={"help": "Metric selecting the best checkpoint."}
    )
    greater_is_better: bool | None = field(default=True, metadata={"help": "Whether the metric is maximised."})
    batch_eval_metrics: bool = field(
        default=True, metadata={"help": "Stream eval metrics batch by batch (no full logits in memory)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: the patch transform reads `image`."}
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Experiment trackers."})
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the final Hub-ready folder to --hub_model_id once, at the end."}
    )
    push_final_to_hub: bool = field(default=False, init=False, repr=False)
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the run already in --output_dir (its checkpoints and final files are removed first); "
            "without it a folder holding another run is refused, unless --resume_from_checkpoint names one of its "
            "checkpoints."
        },
    )

    def __post_init__(self) -> None:
        if self.cv_results:  # checked now, not after the training
            from .cross_validation import cv_metrics_file

            cv_metrics_file(self.cv_results)
        _check("optim_name", self.optim_name, OPTIMIZERS)
        _check("loss", self.loss, LOSSES)
        _check("tta", self.tta, TTA_MODES)
        _check("block_granularity", self.block_granularity, ("block", "stage"))
        _check("class_weight_scheme", self.class_weight_scheme, ("inverse", "effective"))
        _check("use_embedding_cache", self.use_embedding_cache, ("auto", "yes", "no"))
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.head_learning_rate is not None and self.head_learning_rate < 0:
            raise ValueError(f"--head_learning_rate must be >= 0, got {self.head_learning_rate}")
        if self.unfreeze_every_epochs is not None:
            if self.unfreeze_every_epochs <= 0 or self.unfreeze_blocks < 1:
                raise ValueError("--unfreeze_every_epochs must be > 0 and --unfreeze_blocks >= 1")
        elif self.unfreeze_start_epoch is not None or self.frozen_head_learning_rate is not None:
            raise ValueError("--unfreeze_start_epoch/--frozen_head_learning_rate need --unfreeze_every_epochs")
        if self.class_weights is not None and self.loss == "ce":
            raise ValueError("--class_weights needs --loss weighted_ce or focal")
        if self.focal_gamma < 0:
            raise ValueError(f"--focal_gamma must be >= 0, got {self.focal_gamma}")
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                raise ValueError(f"--early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
            if str(self.eval_strategy) == "no" or not self.metric_for_best_model:
                raise ValueError("--early_stopping_patience needs an eval strategy and --metric_for_best_model")
        if self.n_bootstrap < 1:
            raise ValueError(f"--n_bootstrap must be >= 1, got {self.n_bootstrap}")
        if self.mil_epochs < 1 or self.mil_batch_size < 1 or self.mil_learning_rate <= 0 or self.mil_weight_decay < 0:
            raise ValueError(
                "--mil_epochs/--mil_batch_size must be >= 1, --mil_learning_rate > 0, --mil_weight_decay >= 0"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in [0, 1) (0: no weight average), got {self.ema_decay}")
        if "no" in (str(self.eval_strategy), str(self.save_strategy)):
            self.load_best_model_at_end = False
        if self.push_to_hub:  # hf_histo.hub.save_run uploads the complete folder; Trainer's own push stays off
            if not self.hub_model_id:
                raise ValueError("--push_to_hub needs --hub_model_id user/name (the Hub repo to upload to)")
            self.push_to_hub, self.push_final_to_hub = False, True
        super().__post_init__()


ARGUMENT_CLASSES = (DataArguments, ModelArguments, HistoTrainingArguments)


def make_parser() -> HfArgumentParser:
    """The recipes' parser of the three dataclasses; a literal `%` in a help text is escaped for argparse."""
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    for action in parser._actions:  # argparse formats help with `%` (`%(default)s`): "95% CI" would crash --help
        if action.help:
            action.help = re.sub(r"(?<!%)%(?![(%])", "%%", action.help)
    return parser


def parse_args(
    defaults: Mapping[str, Any] | None = None, argv: Sequence[str] | None = None
) -> tuple[DataArguments, ModelArguments, HistoTrainingArguments]:
    """Parse recipe arguments: recipe defaults < `--demo` defaults < `--config` file < command line.

    Args:
        defaults: The recipe's `RECIPE_DEFAULTS` (any field of the three dataclasses).
        argv: Command-line arguments (default: `sys.argv[1:]`).

    From the command line (``argv`` None), a `DataError` left uncaught by the recipe prints ``<script>: error:
    <message>`` and exits with status 2 instead of a traceback (`exit_on_data_error`).

    Returns:
        `(data_args, model_args, training_args)`. With `--demo`, `model_name_or_path` becomes `demo_model` and
        `data_dir` defaults to `output_dir/demo_data` (generated by `build_datasets`). Unless set, pinned memory is
        off without CUDA, `--val_fraction 0` (no folds) means `--eval_strategy no`, and the DataLoader gets
        `default_num_workers()` persistent workers (`hf_histo.data.workers`).
    """
    if argv is None:
        relaunch_for_cpu_ddp()
        if sys.excepthook is sys.__excepthook__:  # a script run: data errors end as `error: <message>`, status 2
            sys.excepthook = exit_on_data_error
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = pop_config(argv)
    known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls)}
    merged: dict[str, Any] = dict(defaults or {})
    file_values = load_config_file(config_path) if config_path else {}
    if bool_flag("demo", argv, bool(file_values.get("demo", merged.get("demo")))):
        merged.update(DEMO_DEFAULTS)
        if merged.get("unfreeze_every_epochs"):
            merged["unfreeze_every_epochs"] = 1
            merged.pop("unfreeze_start_epoch", None)
    merged.update(file_values)
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"unknown argument names {unknown} (in RECIPE_DEFAULTS or the --config file)")
    parser = make_parser()
    parser.set_defaults(**merged)
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        values["use_cpu"] = True  # torchrun on a CPU-only machine: DDP over gloo, not N independent runs
    if not given("dataloader_pin_memory", argv, merged):  # pinning needs CUDA; torch warns on every loader without
        values["dataloader_pin_memory"] = torch.cuda.is_available() and not values.get("use_cpu")
    if not given("dataloader_num_workers", argv, merged):  # decode + crop in workers; jitter runs on the batch
        values["dataloader_num_workers"] = default_num_workers()
    if values["dataloader_num_workers"] > 0 and not given("dataloader_persistent_workers", argv, merged):
        values["dataloader_persistent_workers"] = True  # no worker start-up at each epoch and evaluation
    if values.get("val_fraction") == 0 and not values.get("n_folds") and not given("eval_strategy", argv, merged):
        values["eval_strategy"] = "no"  # no validation split: nothing to evaluate (Trainer refuses "epoch")
    if values.get("demo"):
        values["output_dir"] = values.get("output_dir") or "hf_histo_demo"
        values["model_name_or_path"] = values["demo_model"]
        if values.get("data_dir") is None:
            values["data_dir"] = str(Path(values["output_dir"]) / "demo_data")
    outputs = []
    for cls in ARGUMENT_CLASSES:
        names = {f.name for f in fields(cls) if f.init}
        outputs.append(cls(**{k: v for k, v in values.items() if k in names}))
    from .cross_validation import score_only_on_heldout
    from .finalize import check_output_dir  # the run folder's layout lives with the code that writes it

    args = outputs[-1]
    if outputs[0].n_folds and outputs[0].fold is not None:  # one fold of a CV run: its held-out images score it
        score_only_on_heldout(args, outputs[0].fold)
    main_process = int(os.environ.get("RANK", "0")) == 0  # removes an overwritten run; the other ranks only check
    if args.resume_folds and not (outputs[0].n_folds and outputs[0].fold is None):
        raise ValueError("--resume_folds continues a cross-validation run: it needs --n_folds (and no --fold)")
    resume = args.resume_from_checkpoint or args.resume_folds
    check_output_dir(args.output_dir, args.overwrite_output_dir, resume, main_process)
    return tuple(outputs)  # type: ignore[return-value]
