"""Attention-MIL training: each image's patch embeddings as one bag, the MIL head trained on image labels."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .embeddings import compute_embeddings
from .trainer import build_training_loss

logger = logging.getLogger(__name__)


@dataclass
class Bags:
    """The bags of a split: the patch embeddings of each image and the image's label.

    Attributes:
        image_ids: One id per image, in order of first appearance.
        embeddings: ``[n_i, D]`` float32 patch embeddings of each image.
        labels: ``[n_images]`` class index of each image.
    """

    image_ids: list[str]
    embeddings: list[torch.Tensor]
    labels: torch.Tensor


def bags_from_embeddings(dataset: Any) -> Bags:
    """Group cached patch embeddings (`compute_embeddings`) by ``image_id``; each patch's views are averaged.

    The mean over the cached TTA views is what the inference engine computes per patch, so the MIL head trains on
    the features it sees at inference.

    Raises:
        ValueError: The dataset has no ``image_id`` column, or the patches of one image disagree on its label.
    """
    if "image_id" not in dataset.column_names:
        raise ValueError("the patch embeddings have no image_id column: bags are the patches of one image")
    rows = dataset.with_format("numpy", columns=["embeddings", "labels"], output_all_columns=True)[:]
    embeddings = np.asarray(rows["embeddings"], dtype=np.float32)
    embeddings = embeddings.mean(axis=1) if embeddings.ndim == 3 else embeddings
    index: dict[str, list[int]] = {}
    for row, image_id in enumerate(rows["image_id"]):
        index.setdefault(str(image_id), []).append(row)
    labels = []
    for image_id, members in index.items():
        found = {int(rows["labels"][i]) for i in members}
        if len(found) != 1:
            raise ValueError(f"image {image_id!r} has patches of several labels {sorted(found)}")
        labels.append(found.pop())
    return Bags(
        image_ids=list(index),
        embeddings=[torch.from_numpy(embeddings[members]) for members in index.values()],
        labels=torch.tensor(labels, dtype=torch.long),
    )


def pad_bags(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags of different sizes ``[n_i, D]`` into ``[B, max n_i, D]`` (zeros after the end) and a bool mask."""
    longest = max(len(bag) for bag in bags)
    padded = bags[0].new_zeros((len(bags), longest, bags[0].shape[-1]))
    mask = torch.zeros((len(bags), longest), dtype=torch.bool)
    for i, bag in enumerate(bags):
        padded[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return padded, mask


def train_mil_head(
    head: nn.Module,
    bags: Bags,
    loss_fn: nn.Module,
    *,
    epochs: int = 40,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 8,
    seed: int = 0,
) -> list[float]:
    """Train a `GatedAttentionMIL` head on bags with AdamW; deterministic in ``seed``, global RNGs untouched.

    A plain loop rather than `Trainer`: the head (a few thousand parameters) trains in seconds on the CPU from bags
    already in memory, while a second Trainer inside `finalize_run` would write checkpoints and logs into the run's
    folder and, under `accelerate launch`, wrap the head in DDP so that every process had to step through uneven
    bags together. Here every process trains the same copy on the CPU (same seed, same result) and keeps it.

    Args:
        head: The MIL head; trained in place (on the CPU, in float32) and set ``trained``.
        bags: The training bags.
        loss_fn: ``loss_fn(logits, labels)``, e.g. the run's loss with class weights from image counts.
        epochs: Passes over the bags (shuffled each epoch).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: Bags per step (padded, with a mask).
        seed: Seeds the shuffling and the dropout.

    Returns:
        The mean training loss of each epoch.
    """
    if not bags.image_ids:
        raise ValueError("no training images to train the attention-MIL head on")
    working = copy.deepcopy(head).float().cpu().requires_grad_(True).train()
    optimizer = torch.optim.AdamW(working.parameters(), lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the dropout draws
        for _ in range(epochs):
            order = torch.randperm(len(bags.image_ids), generator=generator).tolist()
            losses = []
            for start in range(0, len(order), batch_size):
                chosen = order[start : start + batch_size]
                embeddings, mask = pad_bags([bags.embeddings[i] for i in chosen])
                logits, _ = working(embeddings, mask)
                loss = loss_fn(logits, bags.labels[chosen])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            history.append(float(np.mean(losses)))
    working.trained.fill_(True)
    head.load_state_dict(working.state_dict())  # copied into the head's own device and dtype
    return history


def train_run_mil_head(trainer: Any, model: nn.Module, data: Any, data_args: Any) -> bool:
    """The second stage of a run with ``aggregation="attention"``: train the model's MIL head on the train split.

    `finalize_run` calls it before the validation images go through the inference engine, so every recipe gets
    the stage with ``--aggregation attention``. The bags are the train split's images (validation images never
    train the head; under cross-validation the held-out fold is the validation split); their patch embeddings are
    what the head consumes at inference: ``model.embed`` of the trained (or frozen) backbone, computed and cached by
    `compute_embeddings` with the run's ``--tta`` views and averaged per patch. The loss is the run's (``--loss``,
    ``--class_weights``, ``--focal_gamma``, label smoothing), its class weights from image counts. Under several
    processes every process must call it (the embedding cache is computed in shards); all train the same head.

    Args:
        trainer: The run's trainer (its arguments, image processor and seed).
        model: The final classifier (`final_model(trainer)`).
        data: The run's patch `DatasetDict` (its ``train`` split).
        data_args: The run's `DataArguments` (``cache_dir`` of the embedding cache).

    Returns:
        Whether a head was trained (False: the model does not use attention, or its head is already trained).
    """
    config = model.config
    if getattr(config, "aggregation", None) != "attention":
        return False
    if getattr(model, "mil", None) is None:
        model.reset_mil_head()
    if bool(model.mil.trained):
        return False
    if "train" not in data:
        raise ValueError("--aggregation attention trains the MIL head on the train split, and the data has none")
    args = trainer.args
    embedded = compute_embeddings(
        model,
        data["train"],
        trainer.processing_class,
        views=getattr(args, "tta", "none"),
        batch_size=args.per_device_eval_batch_size,
        cache_dir=getattr(data_args, "cache_dir", None),
        num_workers=args.dataloader_num_workers,
    )
    bags = bags_from_embeddings(embedded)
    loss_fn = build_training_loss(args, bags.labels.tolist(), config.num_labels)
    history = train_mil_head(
        model.mil,
        bags,
        loss_fn,
        epochs=getattr(args, "mil_epochs", 40),
        learning_rate=getattr(args, "mil_learning_rate", 1e-3),
        weight_decay=getattr(args, "mil_weight_decay", 1e-4),
        batch_size=getattr(args, "mil_batch_size", 8),
        seed=args.seed,
    )
    logger.info(
        "attention-MIL head trained on %d images for %d epochs: loss %.4f -> %.4f",
        len(bags.image_ids),
        len(history),
        history[0],
        history[-1],
    )
    return True
