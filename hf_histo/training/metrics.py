"""Trainer-side evaluation: patch probabilities of each eval batch -> patch- and image-level metrics per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..inference.metrics import METRIC_KEYS, classification_metrics
from ..models.aggregation import aggregate_by_image


def dataset_column(dataset: Any, name: str) -> list | None:
    """A column of a (possibly `with_transform`-formatted) `datasets.Dataset`, raw; None when absent."""
    if dataset is None or name not in getattr(dataset, "column_names", ()):
        return None
    return list(dataset.with_format(None)[name])


class ImageLevelMetrics:
    """Streaming `compute_metrics` for `Trainer(batch_eval_metrics=True)`: patch and image-level metrics.

    `HistoTrainer.prediction_step` hands over patch probabilities (softmax averaged over the run's TTA views, by
    `hf_histo.inference.engine.patch_probabilities`, the function the pipeline runs), batch by batch; they are kept
    as float32 (``n_patches x C x 4`` bytes) and aggregated per image with `aggregate_by_image` on the last batch.
    Predictions arrive in dataset order (Trainer's eval loader does not shuffle; under DDP they are gathered in
    order and the padding is dropped), so the `i`-th prediction belongs to the `i`-th row's `image_id`.
    `HistoTrainer` calls `start(dataset)` before each evaluation. This figure picks the best epoch; the figure a
    run reports (metrics.json) comes from the inference engine on the validation images (`finalize_run`).

    Args:
        labels: Class names in index order.
        aggregation: Patch-to-image voting: `"soft"`, `"hard"` or `"mask_weighted"` (weights: `foreground`).
    """

    def __init__(self, labels: Sequence[str], aggregation: str = "soft"):
        self.labels = list(labels)
        self.aggregation = aggregation
        self._image_ids: list[str] | None = None
        self._foreground: np.ndarray | None = None
        self._reset()

    def _reset(self) -> None:
        self._probs: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []

    def start(self, dataset: Any) -> None:
        """Bind the rows of the dataset about to be evaluated (reads its `image_id` and `foreground` columns)."""
        self._reset()
        ids = dataset_column(dataset, "image_id")
        self._image_ids = None if ids is None else [str(i) for i in ids]
        fg = dataset_column(dataset, "foreground")
        self._foreground = None if fg is None else np.asarray(fg, dtype=np.float64)

    def __call__(self, eval_prediction: Any, compute_result: bool = True) -> dict[str, float]:
        """Add a batch of patch probabilities; on the last batch return flat metrics (`image_macro_f1`, ...)."""
        probs = eval_prediction.predictions
        if isinstance(probs, (tuple, list)):
            probs = probs[0]
        self._probs.append(torch.as_tensor(probs).detach().float().cpu().numpy())
        labels = torch.as_tensor(eval_prediction.label_ids).detach().cpu().reshape(-1).numpy().astype(np.int64)
        self._targets.append(labels)
        if not compute_result:
            return {}
        probs = np.concatenate(self._probs).astype(np.float64)
        targets = np.concatenate(self._targets)
        self._reset()
        n = len(targets)
        if self._image_ids is None:  # no image ids: every patch is its own image
            ids = [f"row{i}" for i in range(n)]
        elif n > len(self._image_ids):
            raise ValueError(
                f"got {n} predictions but the eval dataset has {len(self._image_ids)} rows: evaluate the dataset "
                "bound with start(), unshuffled"
            )
        else:
            ids = self._image_ids[:n]
        aggregation = self.aggregation
        weights = None
        if aggregation == "mask_weighted":
            if self._foreground is None:
                aggregation = "soft"
            else:
                weights = self._foreground[:n]
        image_ids, image_probs = aggregate_by_image(ids, probs, aggregation, weights)
        first_label = dict(zip(reversed(ids), reversed(targets.tolist())))
        image_y = np.array([first_label[i] for i in image_ids], dtype=np.int64)
        keep, patch_keep = image_y >= 0, targets >= 0
        results = {
            "image": classification_metrics(image_y[keep], image_probs[keep], self.labels),
            "patch": classification_metrics(targets[patch_keep], probs[patch_keep], self.labels),
        }
        flat: dict[str, float] = {}
        for level, metrics in results.items():
            for key in METRIC_KEYS:
                flat[f"{level}_{key}"] = float("nan") if metrics[key] is None else float(metrics[key])
            flat[f"{level}_n"] = float(metrics["n"])
        return flat
