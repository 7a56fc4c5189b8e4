"""The typed image-level result: per-image ids, labels and probabilities, their metrics and confidence intervals."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import atomic_write_text
from .engine import ImagePrediction
from .metrics import bootstrap_ci, classification_metrics

CI_METRICS = ("macro_f1",)  # each bootstrap costs a few seconds (one scikit-learn call per resample)


@dataclass
class ImageLevelResult:
    """Image-level predictions of one split and what they score; one shape from evaluation to metrics.json to the card.

    Attributes:
        labels: Class names in index order.
        image_ids: One id per image.
        y_true: True class index per image, -1 for an unlabelled image (left out of the metrics).
        probs: Image class probabilities, ``[n_images][n_classes]``.
        aggregation: How patches were aggregated (``soft``, ``hard``, ``mask_weighted``).
        tta: The test-time augmentation averaged per patch (``none``, ``flips``, ``d4``).
        split: Which images these are (``validation``, ``test``, ``out_of_fold``, a folder name...).
        metrics: ``classification_metrics`` of the labelled images (``macro_f1``, ``accuracy``, ... ``n``).
        ci: 95% bootstrap interval per metric, e.g. ``{"macro_f1": [0.61, 0.88]}``.
        patch_metrics: The same metrics at patch level (each patch carries its image's label), when computed.
        n_patches: Patches behind the predictions.
        trained_on: Ids of the images the model trained on (``evaluate_model`` checks its splits.json): their
            figures are optimistic.
        temperature: The temperature that scaled ``probs`` (the model's ``config.calibration_temperature``); None: unscaled.
        calibration: How the temperature was fitted, when the run fitted the temperature on these images
            (``hf_histo.inference.calibration``): ``temperature``, ``fitted_on``, ``n_images``, ``before`` /
            ``after`` (cross-fitted) / ``after_in_sample`` ``{ece, brier, nll}`` and ``uncalibrated_probs``.
    """

    labels: list[str]
    image_ids: list[str]
    y_true: list[int]
    probs: list[list[float]]
    aggregation: str
    tta: str
    split: str = "validation"
    metrics: dict[str, Any] = field(default_factory=dict)
    ci: dict[str, list[float]] = field(default_factory=dict)
    patch_metrics: dict[str, Any] | None = None
    n_patches: int = 0
    trained_on: list[str] = field(default_factory=list)
    temperature: float | None = None
    calibration: dict[str, Any] | None = None

    @classmethod
    def from_predictions(
        cls,
        labels: Sequence[str],
        image_ids: Sequence[str],
        y_true: Sequence[int],
        probs: np.ndarray | Sequence[Sequence[float]],
        *,
        aggregation: str,
        tta: str,
        split: str = "validation",
        temperature: float | None = None,
        patch_probs: np.ndarray | None = None,
        patch_labels: Sequence[int] | None = None,
        n_bootstrap: int = 1000,
        seed: int = 0,
        ci_metrics: Sequence[str] = CI_METRICS,
    ) -> ImageLevelResult:
        """Score image probabilities: metrics of the labelled images and their bootstrap intervals.

        Args:
            labels: Class names in index order.
            image_ids: One id per image.
            y_true: Class index per image (-1: unlabelled).
            probs: ``[n_images, n_classes]`` probabilities.
            aggregation: The aggregation that produced ``probs``.
            tta: The TTA that produced ``probs``.
            split: Name of the image set.
            temperature: The temperature that scaled ``probs``, if any.
            patch_probs: Optional ``[n_patches, n_classes]`` for patch-level metrics, with ``patch_labels``.
            patch_labels: The label of each patch's image.
            n_bootstrap: Resamples of each interval.
            seed: Seed of the resampling.
            ci_metrics: Metrics that get an interval.
        """
        labels = [str(label) for label in labels]
        probs = np.asarray(probs, dtype=np.float64).reshape(len(image_ids), len(labels))
        y = np.asarray(y_true, dtype=np.int64).reshape(-1)
        keep = y >= 0
        metrics = classification_metrics(y[keep], probs[keep], labels)
        ci: dict[str, list[float]] = {}
        if keep.sum() >= 2:
            predicted = probs[keep].argmax(axis=1)
            for name in ci_metrics:
                ci[name] = list(bootstrap_ci(y[keep], predicted, name, n_boot=n_bootstrap, seed=seed))
        patch_metrics = None
        if patch_probs is not None and patch_labels is not None:
            patch_y = np.asarray(patch_labels, dtype=np.int64)
            patch_metrics = classification_metrics(
                patch_y[patch_y >= 0], np.asarray(patch_probs)[patch_y >= 0], labels
            )
        return cls(
            labels=labels,
            image_ids=[str(i) for i in image_ids],
            y_true=y.tolist(),
            probs=probs.tolist(),
            aggregation=aggregation,
            tta=tta,
            split=split,
            temperature=temperature,
            metrics=metrics,
            ci=ci,
            patch_metrics=patch_metrics,
            n_patches=0 if patch_probs is None else len(patch_probs),
        )

    @classmethod
    def from_image_predictions(
        cls,
        predictions: Sequence[ImagePrediction],
        y_true: Sequence[int],
        *,
        split: str = "validation",
        n_bootstrap: int = 1000,
        seed: int = 0,
    ) -> ImageLevelResult:
        """Score the engine's predictions of images whose true class indices are ``y_true`` (-1: unlabelled)."""
        if not predictions:
            raise ValueError("no image predictions to score")
        first = predictions[0]
        patch_labels = np.concatenate([np.full(len(p.patch_probs), y) for p, y in zip(predictions, y_true)])
        return cls.from_predictions(
            first.labels,
            [p.image_id or str(i) for i, p in enumerate(predictions)],
            y_true,
            np.stack([p.probs for p in predictions]),
            aggregation=first.aggregation,
            tta=first.tta,
            split=split,
            temperature=first.temperature,
            patch_probs=np.concatenate([p.patch_probs for p in predictions]),
            patch_labels=patch_labels,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )

    @property
    def n_images(self) -> int:
        """Number of images."""
        return len(self.image_ids)

    @property
    def probs_array(self) -> np.ndarray:
        """``probs`` as a ``[n_images, n_classes]`` float64 array."""
        return np.asarray(self.probs, dtype=np.float64).reshape(len(self.image_ids), len(self.labels))

    def table(self) -> str:
        """A short text summary: images, image macro-F1 (95% CI), balanced accuracy, AUROC, ECE / Brier / NLL, patch
        macro-F1, and the confusion matrix (true classes in rows, predicted in columns)."""
        m, patch = self.metrics, self.patch_metrics or {}
        scored = m.get("n", 0)
        unscored = f" ({self.n_images - scored} unlabelled, not scored)" if self.n_images > scored else ""
        ci = self.ci.get("macro_f1") or []
        interval = f"  (95% CI {ci[0]:.3f} to {ci[1]:.3f})" if len(ci) == 2 and _finite(ci) else ""
        lines = [
            f"{self.split} ({self.aggregation} aggregation, TTA {self.tta}, "
            + (f"temperature {self.temperature:.3g})" if self.temperature else "uncalibrated)"),
            f"{'images':<18} {scored}{unscored}",
            f"{'image macro-F1':<18} {_figure(m.get('macro_f1'))}{interval}",
            f"{'balanced accuracy':<18} {_figure(m.get('balanced_accuracy'))}",
            f"{'AUROC (macro)':<18} {_figure(m.get('auroc'))}",
            f"{'ECE / Brier / NLL':<18} {_figure(m.get('ece'))} / {_figure(m.get('brier'))} / {_figure(m.get('nll'))}",
            f"{'patch macro-F1':<18} {_figure(patch.get('macro_f1'))}"
            + (f"  ({self.n_patches} patches)" if self.n_patches else ""),
        ]
        if self.trained_on:
            lines.append(f"{'trained on':<18} {len(self.trained_on)} of the images: these figures are optimistic")
        matrix = m.get("confusion_matrix") or []
        if matrix:
            width = max(len(name) for name in self.labels)
            cells = [max(len(name), *(len(str(row[j])) for row in matrix)) for j, name in enumerate(self.labels)]
            lines += ["", "confusion matrix (rows: true, columns: predicted)"]
            lines.append(" " * width + "".join(f"  {name:>{w}}" for name, w in zip(self.labels, cells)))
            for name, row in zip(self.labels, matrix):
                lines.append(f"{name:<{width}}" + "".join(f"  {value:>{w}}" for value, w in zip(row, cells)))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN becomes null); ``from_dict`` reads it back."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageLevelResult:
        """Inverse of ``to_dict``; extra keys (e.g. the run facts of metrics.json) are ignored."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str | Path, **extra: Any) -> Path:
        """Write ``to_dict()`` (plus ``extra`` JSON-able keys, e.g. ``run``) to a JSON file atomically."""
        return atomic_write_text(path, json.dumps({**self.to_dict(), **_jsonable(extra)}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ImageLevelResult:
        """Read a JSON file written by ``save`` (a run's metrics.json)."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _finite(values: Sequence[float | None]) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _figure(value: float | None) -> str:
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "n/a"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
