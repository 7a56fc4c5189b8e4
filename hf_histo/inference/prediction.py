"""What the inference engine hands on per image: the patched image, its prediction, and a bad input's error."""

# Ships with checkpoints, as engine.py: stdlib, numpy, PIL, torch and siblings, relatively.

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.images import DataError


def item_error(error: Exception, name: str | None) -> DataError:
    """The error of one input as a `DataError` whose message names the input (prefixed when it does not already)."""
    message = str(error)
    if name and name not in message:
        message = f"{name}: {message}"
    if isinstance(error, DataError) and message == str(error):
        return error
    wrapped = DataError(message)
    wrapped.__cause__ = error
    return wrapped


@dataclass
class PatchedImage:
    """An image after the decode and patch stages: what the forward stage crops from."""

    image: Image.Image
    mask: np.ndarray
    boxes: np.ndarray  # [N, 5] int64: x, y, w, h, foreground pixels
    mask_source: str
    fallback: str | None
    patches: torch.Tensor | None = None  # InferenceEngine.cut, once cut (None until then)
    embeddings: np.ndarray | None = None  # [N, D] patch embeddings of a model with a MIL head, once forwarded


@dataclass
class ImagePrediction:
    """The image-level prediction of one image, with the per-patch details it came from.

    Attributes:
        labels: Class names in index order.
        probs: Image class probabilities ``[C]`` after aggregation.
        patch_probs: Patch class probabilities ``[N, C]`` (softmax averaged over the TTA views).
        boxes: ``[N, 5]`` int array: x, y, w, h and mask pixels of each patch.
        mask_source: ``"mask"``, ``"tissue"`` (no mask given), ``"roi_model"`` (no mask given: the ROI model's
            region), ``"empty_mask_tissue"``, ``"empty_mask_whole"``, ``"empty_roi_tissue"`` or ``"whole"``.
        fallback: None, or why the image was not patched normally (``"best_tile"`` or a mask fallback above).
        aggregation: How the patches were aggregated.
        tta: The TTA views averaged per patch.
        image_id: The caller's name for the image, if any.
        attention: With ``aggregation="attention"``, the MIL head's weight of each patch ``[N]`` (sums to 1).
        temperature: The temperature that scaled ``probs`` (``config.calibration_temperature``); None: not scaled.
    """

    labels: list[str]
    probs: np.ndarray
    patch_probs: np.ndarray
    boxes: np.ndarray
    mask_source: str
    fallback: str | None
    aggregation: str
    tta: str
    image_id: str | None = None
    attention: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    temperature: float | None = None

    @property
    def label(self) -> str:
        """The predicted class name."""
        return self.labels[int(np.argmax(self.probs))]

    @property
    def foreground(self) -> np.ndarray:
        """Mask fraction of each patch (mask pixels over the box area)."""
        return self.boxes[:, 4] / np.maximum(self.boxes[:, 2] * self.boxes[:, 3], 1)

    def scores(self, top_k: int | None = None) -> list[dict[str, Any]]:
        """``[{"label", "score"}]`` sorted by score, the ``top_k`` best (all by default)."""
        order = np.argsort(-self.probs, kind="stable")[: top_k or len(self.labels)]
        return [{"label": self.labels[i], "score": float(self.probs[i])} for i in order]
