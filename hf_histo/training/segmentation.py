"""Train and score ROI segmentation models: weighted CE + Dice through the Trainer, sliding-window validation, k-fold CV."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..data.images import DataError
from ..data.samples import Sample
from ..data.splits import split_samples
from ..inference.roi import IMAGENET_MEAN, IMAGENET_STD, RoiSegmenter
from ..inference.segmentation_metrics import confusion, plot_predictions, segmentation_scores
from ..utils import atomic_write_text
from .segmentation_data import RandomCrops, SegmentationArguments, class_weights, load_pair, segmentation_samples

logger = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
PLOT_FILE = "predictions.png"
CardWriter = Callable[[Path, dict[str, Any], dict[str, Any]], Any]


class SegmentationLoss:
    """Class-weighted cross-entropy plus ``dice_weight`` x soft Dice over the foreground classes (unannotated pixels ignored).

    Args:
        weights: Per-class CE weights, or None.
        ignore_index: Target value that is never scored.
        dice_weight: Weight of the Dice term (0: CE only).
    """

    def __init__(self, weights: torch.Tensor | None, ignore_index: int = 255, dice_weight: float = 1.0):
        self.weights, self.ignore_index, self.dice_weight = weights, int(ignore_index), float(dice_weight)

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        """The loss of a batch: ``outputs.logits`` ``(B, C, h, w)`` (upsampled to the labels' size) vs ``labels``."""
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        logits = logits.float()
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        weight = None if self.weights is None else self.weights.to(logits.device)
        loss = F.cross_entropy(logits, labels, weight=weight, ignore_index=self.ignore_index)
        if self.dice_weight > 0:
            num_labels = logits.shape[1]
            valid = (labels != self.ignore_index).unsqueeze(1).float()
            probs = logits.softmax(1) * valid
            onehot = F.one_hot(labels.clamp(0, num_labels - 1), num_labels).permute(0, 3, 1, 2).float() * valid
            inter = (probs * onehot).sum((0, 2, 3))
            dice = (2 * inter + 1.0) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1.0)
            loss = loss + self.dice_weight * (1 - dice[1:] if num_labels > 1 else 1 - dice).mean()
        return loss


def build_segmentation_model(args: SegmentationArguments) -> tuple[torch.nn.Module, Any]:
    """A fresh model (pretrained encoder when ``encoder_weights`` is given) and the image processor saved with it."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    from ..models import HistoSegmentationConfig, HistoSegmentationModel

    labels = args.labels
    id2label = dict(enumerate(labels))
    inference = dict(window_size=args.window_size, window_overlap=args.window_overlap, fill_holes=args.fill_holes)
    masks = dict(mask_mode=args.mask_mode, ignore_index=args.ignore_index)
    if args.architecture == "segformer":
        kwargs = dict(id2label=id2label, label2id={v: k for k, v in id2label.items()}, semantic_loss_ignore_index=255)
        if args.encoder_weights:
            model = SegformerForSemanticSegmentation.from_pretrained(
                args.encoder_weights, ignore_mismatched_sizes=True, **kwargs
            )
        else:
            model = SegformerForSemanticSegmentation(SegformerConfig(**kwargs))
        model.config.update({**inference, **masks})
    else:
        config = HistoSegmentationConfig(
            architecture=args.architecture,
            encoder_name=args.encoder_name,
            encoder_depth=args.encoder_depth,
            decoder_channels=[int(c) for c in args.decoder_channels.split(",")],
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            **inference,
            **masks,
        )
        model = HistoSegmentationModel(config, encoder_weights=args.encoder_weights)
    processor = SegformerImageProcessor(
        do_resize=False, do_reduce_labels=False, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
    )
    return model, processor


def score_images(
    segmenter: RoiSegmenter, pairs: list[tuple[np.ndarray, np.ndarray]], args: SegmentationArguments
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Scores of sliding-window predictions on whole images, pixels pooled; also returns the predictions."""
    num_labels = len(args.labels)
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    predictions = []
    for image, target in pairs:
        predicted = segmenter.predict(image)
        matrix += confusion(target, predicted, num_labels, args.ignore_index)
        predictions.append(predicted)
    return {**segmentation_scores(matrix, args.labels), "confusion_matrix": matrix.tolist()}, predictions


def train_segmentation(
    args: SegmentationArguments,
    training_args: TrainingArguments,
    train: list[Sample],
    validation: list[Sample],
    write_card: CardWriter | None = None,
) -> dict[str, Any]:
    """Train one model on ``train`` samples, score it on ``validation`` (whole images), save a loadable folder.

    The folder (``training_args.output_dir``) gets the model, its processor and code, ``metrics.json`` (written
    last: its presence marks a finished run), a predicted-vs-true plot and a model card. An interrupted run resumes
    from its last checkpoint; checkpoints are removed once the folder is complete.

    Args:
        args: What to train on and how.
        training_args: The Trainer's arguments; ``output_dir`` is the model folder.
        train: Training images (with masks).
        validation: Validation images, scored whole; empty for a final fit on all images.
        write_card: Writes the model card into the folder (``hf_histo.hub.write_segmentation_card``).

    Returns:
        The metrics record (validation scores under ``"validation"`` when there is a validation split).
    """
    output_dir = Path(training_args.output_dir)
    if (output_dir / METRICS_FILE).exists():
        if not args.overwrite_output_dir:
            raise DataError(
                f"--output_dir {output_dir} holds a finished run ({METRICS_FILE}); pass --overwrite_output_dir true to "
                "replace it, or choose another --output_dir."
            )
        for stale in (METRICS_FILE, PLOT_FILE):  # this run writes them again (the plot only with a validation split)
            (output_dir / stale).unlink(missing_ok=True)
    started = time.perf_counter()
    train_pairs = [load_pair(s, args) for s in train]
    model, processor = build_segmentation_model(args)
    weights = class_weights([t for _, t in train_pairs], len(args.labels), args.ignore_index)
    dataset = RandomCrops(
        train_pairs,
        args.crop_size,
        args.crops_per_image,
        processor.image_mean,
        processor.image_std,
        args.color_jitter,
        args.ignore_index,
    )
    loss = SegmentationLoss(weights if args.class_weighting else None, args.ignore_index, args.dice_weight)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, compute_loss_func=loss)
    resume = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume or training_args.resume_from_checkpoint)
    train_seconds = time.perf_counter() - started
    record: dict[str, Any] = {
        "labels": args.labels,
        "n_train_images": len(train),
        "n_validation_images": len(validation),
        "class_weights": weights.tolist(),
        "train_seconds": round(train_seconds, 1),
        "architecture": args.architecture,
        "encoder": args.encoder_name if args.architecture != "segformer" else "mit-b0",
    }
    if not trainer.is_world_process_zero():
        return record
    trainer.save_model(str(output_dir))
    processor.save_pretrained(str(output_dir))
    if validation:
        val_pairs = [load_pair(s, args) for s in validation]
        segmenter = RoiSegmenter(trainer.model, processor)
        scores, predicted = score_images(segmenter, val_pairs, args)
        record["validation"] = scores
        record["validation_images"] = [s.image_id for s in validation]
        shown = list(zip(validation, val_pairs, predicted))[: args.n_plot]
        plot_predictions(
            output_dir / PLOT_FILE,
            [(s.image_id, pair[0], pair[1], p) for s, pair, p in shown],
            len(args.labels),
        )
    if write_card is not None:
        write_card(output_dir, record, vars(args))
    for checkpoint in output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)
    atomic_write_text(output_dir / METRICS_FILE, json.dumps(record, indent=2) + "\n")
    return record


def cross_validate_segmentation(
    args: SegmentationArguments, training_args: TrainingArguments, write_card: CardWriter | None = None
) -> dict[str, Any]:
    """Patient-grouped k-fold CV (``args.n_folds``): one folder per fold, finished folds skipped on a rerun.

    With ``overwrite_output_dir`` every fold trains again.

    Returns:
        ``{"folds": [records], "mean": {...}, "std": {...}}`` of the validation mean IoU, mean Dice and pixel
        accuracy, written to ``output_dir/cv_metrics.json``.
    """
    samples = segmentation_samples(args)
    root = Path(training_args.output_dir)
    folds = [args.fold] if args.fold is not None else range(args.n_folds)
    records = []
    for fold in folds:
        fold_dir = root / f"fold_{fold}"
        if (fold_dir / METRICS_FILE).exists() and not args.overwrite_output_dir:
            logger.info("fold %d already trained (%s): kept", fold, fold_dir / METRICS_FILE)
            records.append(json.loads((fold_dir / METRICS_FILE).read_text()))
            continue
        train, validation = split_samples(samples, n_folds=args.n_folds, fold=fold, seed=training_args.seed)
        fold_args = dataclasses.replace(training_args, output_dir=str(fold_dir))
        records.append(train_segmentation(args, fold_args, train, validation, write_card))
    summary = summarize_segmentation_folds(records)
    if args.fold is None and training_args.process_index == 0:
        atomic_write_text(root / "cv_metrics.json", json.dumps(summary, indent=2) + "\n")
    return summary


def summarize_segmentation_folds(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over folds of the validation scores (and of the per-class Dice)."""
    scored = [r["validation"] for r in records if "validation" in r]
    keys = ("mean_iou", "mean_dice", "pixel_accuracy")
    out: dict[str, Any] = {"folds": records, "mean": {}, "std": {}}
    for key in keys:
        values = np.array([s[key] for s in scored], dtype=float)
        out["mean"][key], out["std"][key] = float(np.nanmean(values)), float(np.nanstd(values))
    return out


def segmentation_splits(args: SegmentationArguments, seed: int):
    """The train and validation samples of a single run (grouped split by ``val_fraction``)."""
    return split_samples(segmentation_samples(args), val_fraction=args.val_fraction, seed=seed)
