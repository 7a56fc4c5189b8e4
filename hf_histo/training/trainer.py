"""HistoTrainer: a Trainer with layer-wise LR groups, gated unfreezing, imbalance-aware losses, image-level metrics."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from transformers import EarlyStoppingCallback, PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import SaveStrategy

from ..inference.engine import patch_probabilities
from .callbacks import (
    BestCheckpointReport,
    ProgressiveUnfreezeCallback,
    WeightEmaCallback,
    drop_gated_gradients,
    gated_parameters,
    logged_evaluation,
)
from .losses import build_loss, class_weights_from_counts
from .metrics import ImageLevelMetrics, dataset_column
from .param_groups import build_param_groups, create_optimizer, describe_param_groups

logger = logging.getLogger(__name__)


def label_names(model: nn.Module) -> list[str]:
    """Class names in index order from the (wrapped) model's `config.id2label`."""
    base = getattr(model, "module", model)
    config = getattr(base, "config", None)
    id2label = getattr(config, "id2label", None)
    if not id2label:
        raise ValueError("the model config has no id2label: build it with id2label (class names)")
    return [str(id2label[i]) for i in sorted(int(k) for k in id2label)]


class BalancedSampler(torch.utils.data.Sampler[int]):
    """Class-balanced sampling with replacement: each class is drawn equally often in expectation.

    Deterministic in `(seed, epoch)` so that all DDP ranks draw the same sequence and a resumed run the same
    epochs (Trainer/accelerate call `set_epoch`).

    Args:
        labels: Class index of every training row.
        seed: Base seed.
        num_samples: Draws per epoch (default: the dataset length).
    """

    def __init__(self, labels: Sequence[int], seed: int = 0, num_samples: int | None = None):
        labels_t = torch.as_tensor(list(labels), dtype=torch.long)
        if labels_t.numel() == 0:
            raise ValueError("BalancedSampler needs at least one labelled row")
        counts = torch.bincount(labels_t[labels_t >= 0])
        self.weights = torch.where(labels_t >= 0, 1.0 / counts.clamp_min(1)[labels_t.clamp_min(0)].double(), 0.0)
        self.num_samples = int(num_samples or labels_t.numel())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's random sequence."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def build_training_loss(args: Any, train_labels: Sequence[int] | None, num_labels: int) -> nn.Module:
    """The loss module from `HistoTrainingArguments` (class weights from training counts when not given).

    Args:
        args: `HistoTrainingArguments` (`loss`, `class_weights`, `class_weight_scheme`, `focal_gamma`,
            `label_smoothing_factor`).
        train_labels: Class index of each training patch (for weights from counts).
        num_labels: Number of classes.
    """
    name = getattr(args, "loss", "ce")
    weights = getattr(args, "class_weights", None)
    if weights is not None and len(weights) != num_labels:
        raise ValueError(f"--class_weights has {len(weights)} values for {num_labels} classes")
    if name == "weighted_ce" and weights is None:
        if train_labels is None:
            raise ValueError("weighted_ce needs --class_weights or a train dataset with a `label` column")
        counts = np.bincount([int(y) for y in train_labels if int(y) >= 0], minlength=num_labels)
        weights = class_weights_from_counts(counts, scheme=getattr(args, "class_weight_scheme", "inverse"))
    return build_loss(
        name,
        class_weights=weights,
        gamma=getattr(args, "focal_gamma", 2.0),
        label_smoothing=float(getattr(args, "label_smoothing_factor", 0.0) or 0.0),
    )


def check_training_classes(train_dataset: Any, train_labels: Sequence[int] | None, names: Sequence[str]) -> None:
    """Refuse training data with fewer than two classes (every prediction would be right: macro-F1 1.0).

    Args:
        train_dataset: The train dataset (its `info.description` and `image_id` column name the data).
        train_labels: Class index of each training row (-1: unlabelled); None skips the check (no label column).
        names: Class names in index order.

    Raises:
        ValueError: Fewer than two classes among the labelled training rows; the message names the data and the fix.
    """
    if train_labels is None:
        return
    present = sorted({int(y) for y in train_labels if int(y) >= 0})
    if len(present) >= 2:
        return
    description = str(getattr(getattr(train_dataset, "info", None), "description", "") or "")
    data = f"the train dataset ({description})" if description else "the train dataset"
    fix = (
        "a classifier needs at least 2 classes among the training images (with one, every prediction is that class "
        "and macro-F1 reads 1.0): add images of another class to the training data, or check the labels (labels.csv, "
        "train_labels.csv or the class folders) and the split (a `split` column, --val_fraction, --fold)"
    )
    if not present:
        raise ValueError(f"Cannot train: {data} has no labelled training patches; {fix}.")
    rows = sum(1 for y in train_labels if int(y) == present[0])
    ids = dataset_column(train_dataset, "image_id")
    images = f" of {len({i for i, y in zip(ids, train_labels) if int(y) == present[0]})} images" if ids else ""
    name = names[present[0]] if present[0] < len(names) else str(present[0])
    raise ValueError(
        f"Cannot train: {data} has only one class ({name!r}: {rows} patches{images}) in its training images; {fix}."
    )


def _train_labels(dataset: Any) -> list[int] | None:
    """The `label` (or `labels`) column of a `datasets.Dataset`; None for other datasets or without one."""
    if not getattr(dataset, "column_names", None):
        return None
    labels = dataset_column(dataset, "label")
    return dataset_column(dataset, "labels") if labels is None else labels


class HistoTrainer(Trainer):
    """`Trainer` for patch classifiers judged at image level.

    It overrides only what it must: the optimizer (layer-wise LR decay, head LR, AdamW/Lion/SGD), the loss (any
    `losses.build_loss` module, CutMix/MixUp soft targets), the training step (gated gradients of blocks not yet
    unfrozen), evaluation (streaming image-level metrics, optional TTA) and the sampler (class-balanced option).
    With `HistoTrainingArguments` it adds `ProgressiveUnfreezeCallback` (`--unfreeze_every_epochs`),
    `WeightEmaCallback` (`--ema_decay`) and `EarlyStoppingCallback` (`--early_stopping_patience`) by itself.
    Training data with fewer than two classes is refused; of evaluations tied on `metric_for_best_model` the best
    checkpoint is the one of lower `eval_loss` (`BestCheckpointReport` logs which one was kept).

    Args:
        *args: `Trainer` arguments.
        loss_fn: `forward(logits, targets)` module; default from the arguments and the train labels.
        batch_mixer: `mix(pixel_values, labels)` applied to training batches (see `build_batch_mixer`).
        batch_augment: `augment(pixel_values, augment_params)` applied to uint8 batches on the training device
            before the mixer: colour/stain jitter and normalisation (`BatchAugment`); default: the one the train
            dataset's `patch_transform_fn` carries.
        **kwargs: `Trainer` keyword arguments; `compute_metrics` defaults to `ImageLevelMetrics`.
    """

    def __init__(
        self,
        *args,
        loss_fn: nn.Module | None = None,
        batch_mixer: Callable | None = None,
        batch_augment: Callable | None = None,
        **kwargs,
    ):
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        labels = label_names(model)
        train_dataset = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        train_labels = _train_labels(train_dataset)
        check_training_classes(train_dataset, train_labels, labels)
        if kwargs.get("compute_metrics") is None:
            aggregation = getattr(getattr(_base(model), "config", None), "aggregation", "soft") or "soft"
            if aggregation == "attention":  # the MIL head trains after the patch model: epochs are judged by soft vote
                aggregation = "soft"
            kwargs["compute_metrics"] = ImageLevelMetrics(labels, aggregation)
        callbacks = list(kwargs.get("callbacks") or [])
        if training_args is not None and getattr(training_args, "unfreeze_every_epochs", None):
            if not any(isinstance(c, ProgressiveUnfreezeCallback) for c in callbacks):
                callbacks.append(
                    ProgressiveUnfreezeCallback(
                        every_epochs=training_args.unfreeze_every_epochs,
                        blocks_per_step=training_args.unfreeze_blocks,
                        start_epoch=training_args.unfreeze_start_epoch,
                        frozen_head_lr=training_args.frozen_head_learning_rate,
                    )
                )
        if training_args is not None and getattr(training_args, "early_stopping_patience", None):
            if not any(isinstance(c, EarlyStoppingCallback) for c in callbacks):
                callbacks.append(EarlyStoppingCallback(training_args.early_stopping_patience))
        if training_args is not None and getattr(training_args, "ema_decay", 0.0):
            if not any(isinstance(c, WeightEmaCallback) for c in callbacks):
                callbacks.append(WeightEmaCallback(training_args.ema_decay))
        if not any(isinstance(c, BestCheckpointReport) for c in callbacks):
            callbacks.append(BestCheckpointReport())
        kwargs["callbacks"] = callbacks
        super().__init__(*args, **kwargs)
        if loss_fn is None:
            loss_fn = build_training_loss(self.args, train_labels, len(labels))
        self.loss_fn = loss_fn
        self.batch_mixer = batch_mixer
        if batch_augment is None:
            batch_augment = _dataset_transform_attribute(self.train_dataset, "batch_augment")
        self.batch_augment = batch_augment
        augmentation_seed = _dataset_transform_attribute(self.train_dataset, "augmentation_seed")
        if augmentation_seed is not None:  # per-patch augmentation seeds follow the run's seed and epoch
            augmentation_seed.seed = self.args.seed
            self.add_callback(_AugmentationEpoch(augmentation_seed))

    # ---- optimizer -----------------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Param groups from `build_param_groups` (layer decay, head LR, no decay on norms/biases)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            args = self.args
            groups = build_param_groups(
                opt_model,
                backbone_lr=args.learning_rate,
                head_lr=getattr(args, "head_learning_rate", None),
                layer_decay=getattr(args, "layer_decay", 1.0),
                weight_decay=args.weight_decay,
                coarse=getattr(args, "block_granularity", "block") == "stage",
            )
            self.optimizer = create_optimizer(
                groups,
                getattr(args, "optim_name", "adamw"),
                betas=(args.adam_beta1, args.adam_beta2) if getattr(args, "optim_name", "adamw") == "adamw" else None,
                eps=args.adam_epsilon,
            )
            if self.is_world_process_zero():
                logger.info(
                    "optimizer %s param groups:\n%s", type(self.optimizer).__name__, describe_param_groups(groups)
                )
        return self.optimizer

    # ---- loss and training step ----------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Loss of the logits under `self.loss_fn`; batches go through `batch_augment` and `batch_mixer` first."""
        inputs = self._augment(inputs, jitter=model.training)
        labels = inputs.pop("labels", None)
        if model.training:
            self._keep_gated_batchnorm_frozen(model)
            if self.batch_mixer is not None and labels is not None and "pixel_values" in inputs:
                inputs["pixel_values"], labels = self.batch_mixer(inputs["pixel_values"], labels)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if labels is None:
            raise ValueError("HistoTrainer needs `labels` in every batch")
        loss = self.loss_fn(logits, labels)
        return (loss, outputs) if return_outputs else loss

    def _augment(self, inputs: dict[str, Any], jitter: bool) -> dict[str, Any]:
        """Apply `batch_augment` to uint8 pixel batches: jitter with their `augment_params` (training), normalise."""
        inputs = dict(inputs)
        params = inputs.pop("augment_params", None)
        pixels = inputs.get("pixel_values")
        if self.batch_augment is not None and pixels is not None and not pixels.is_floating_point():
            inputs["pixel_values"] = self.batch_augment(pixels, params if jitter else None)
        return inputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward/backward, then drop the gradients of gated (not yet unfrozen) blocks before clipping."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.optimizer is not None:
            drop_gated_gradients(self.optimizer)
        return loss

    def _keep_gated_batchnorm_frozen(self, model: nn.Module) -> None:
        # Gated blocks keep their BatchNorm running statistics, as requires_grad=False freezing would.
        for module in self._gated_batchnorms(model):
            module.eval()

    def _gated_batchnorms(self, model: nn.Module) -> list[nn.Module]:
        """BatchNorm layers of the blocks that progressive unfreezing still gates (cheap when none is gated)."""
        gated = {id(p) for p in gated_parameters(self.optimizer)} if self.optimizer is not None else set()
        if not gated:
            return []
        return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m.weight) in gated]

    def _get_train_sampler(self, train_dataset=None):
        if getattr(self.args, "balanced_sampler", False):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            labels = dataset_column(dataset, "label") or dataset_column(dataset, "labels")
            if labels is None:
                raise ValueError("--balanced_sampler needs a `label` column in the train dataset")
            return BalancedSampler(labels, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # ---- precise BatchNorm ---------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        """`Trainer.train`; then, with ``--precise_bn``, BatchNorm statistics recomputed for the final weights."""
        output = super().train(*args, **kwargs)
        if getattr(self.args, "precise_bn", False):
            self.recompute_batchnorm_statistics()
        return output

    def recompute_batchnorm_statistics(self) -> int:
        """Replace BatchNorm running statistics by their plain average over one pass of the training data.

        Training leaves a momentum-0.1 average of the last few dozen batches, which moves with the images they held
        even at a learning rate near 0, and the predictions with it ("precise BN", Wu & Johnson 2021). One pass with
        training augmentation and no gradients (torch's `update_bn`); blocks still gated by progressive unfreezing
        keep theirs; under DDP the processes' averages are averaged.

        Returns:
            The number of BatchNorm layers updated (0 when the model has none, e.g. a ViT).
        """
        model = self.accelerator.unwrap_model(self.model)
        layers = [
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        kept = {m: {k: v.clone() for k, v in m.named_buffers()} for m in self._gated_batchnorms(model) if m in layers}
        if len(kept) == len(layers):
            return 0
        key = getattr(model, "main_input_name", "pixel_values")

        def inputs() -> Iterator[torch.Tensor]:
            for batch in self.get_train_dataloader():
                yield self._augment(self._prepare_inputs(batch), jitter=True)[key]

        with torch.no_grad():
            update_bn(inputs(), model)
            for module, buffers in kept.items():
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)
            if self.accelerator.num_processes > 1:
                for module in layers:
                    module.running_mean.copy_(self.accelerator.reduce(module.running_mean, "mean"))
                    module.running_var.copy_(self.accelerator.reduce(module.running_var, "mean"))
        n = len(layers) - len(kept)
        logger.info("precise BN: running statistics of %d BatchNorm layers recomputed over the training data", n)
        return n

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        """Trainer's best-checkpoint rule, with ties on `metric_for_best_model` going to the lower `eval_loss`.

        Trainer keeps the first evaluation that reaches the best value; on a small validation set F1 1.0 comes
        early and every later epoch ties with it. Of equal metrics the lower evaluation loss wins, of equal losses
        the earlier evaluation. The best evaluation's loss is read from `state.log_history` (restored on resume).
        """
        if super()._determine_best_metric(metrics=metrics, trial=trial):
            return True
        name = self.args.metric_for_best_model
        if name is None or self.state.best_metric is None or self.state.best_global_step is None:
            return False
        key = name if name.startswith("eval_") else f"eval_{name}"
        loss = metrics.get("eval_loss")
        if key == "eval_loss" or loss is None:
            return False
        if not math.isclose(float(metrics[key]), float(self.state.best_metric), rel_tol=1e-9, abs_tol=1e-12):
            return False
        best = logged_evaluation(self.state.log_history, self.state.best_global_step, key) or {}
        best_loss = best.get("eval_loss")
        if best_loss is None or not float(loss) < float(best_loss):
            return False
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
            self.state.best_global_step = self.state.global_step
        return True

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write checkpoints in the in-memory key format, so that resuming and `load_best_model_at_end` reload them.

        transformers 5 saves ViT-family weights under their 4.x names (`save_original_format=True`) but reloads
        checkpoints with a plain `load_state_dict`, which would silently skip every backbone weight.
        """
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PreTrainedModel):
            return super()._save(output_dir, state_dict)
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_original_format=False)
        try:
            super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained

    # ---- evaluation ----------------------------------------------------------------------------------------
    def evaluation_loop(self, dataloader, *args, **kwargs):
        """Bind the streaming image-level metrics to the dataset; score the weight average while it trains (EMA)."""
        if isinstance(self.compute_metrics, ImageLevelMetrics):
            self.compute_metrics.start(getattr(dataloader, "dataset", None))
        ema = next((c for c in self.callback_handler.callbacks if isinstance(c, WeightEmaCallback)), None)
        with ema.averaged(self.model) if ema is not None else contextlib.nullcontext():
            return super().evaluation_loop(dataloader, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Patch probabilities for `ImageLevelMetrics`: softmax averaged over the `--tta` views (pixel inputs).

        Pixel batches go through `hf_histo.inference.engine.patch_probabilities`, the function the pipeline runs;
        other inputs (cached embeddings) through the model, whose logits are softmaxed. The loss is the loss
        function on the log-probabilities (equal to it on the logits without TTA).
        """
        inputs = self._augment(self._prepare_inputs(inputs), jitter=False)
        labels = inputs.get("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            if "pixel_values" in inputs:
                probs = patch_probabilities(model, inputs["pixel_values"], getattr(self.args, "tta", "none"))
            else:
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
                logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
                probs = logits.float().softmax(dim=-1)
            loss = self.loss_fn(probs.clamp_min(1e-12).log(), labels).detach() if labels is not None else None
        return (loss, None if prediction_loss_only else probs, labels)


def _dataset_transform_attribute(dataset: Any, name: str) -> Any:
    """`augmentation_seed` / `batch_augment` of a dataset formatted with `patch_transform_fn`, if any."""
    transform = (getattr(dataset, "format", None) or {}).get("format_kwargs", {}).get("transform")
    return getattr(transform, name, None)


class _AugmentationEpoch(TrainerCallback):
    """Keep `AugmentationSeed.epoch` equal to the epoch being trained (also after a resume)."""

    def __init__(self, seed: Any):
        self.seed = seed

    def _set(self, state) -> None:
        self.seed.epoch = int(math.floor(float(state.epoch or 0.0) + 1e-6))

    def on_train_begin(self, args, state, control, **kwargs):
        self._set(state)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._set(state)


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def final_model(trainer: Trainer) -> nn.Module:
    """The plain classifier to save: unwrapped from DDP, out of a `HeadOnlyModel`, LoRA merged."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model = getattr(model, "full_model", model)
    if hasattr(model, "merge_and_unload"):
        from ..models import merge_lora

        model = merge_lora(model)
    return model
