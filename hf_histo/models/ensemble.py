"""FoldEnsemble: several fold classifiers averaged into one model (softmax mean), for CV-root inference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput


class FoldEnsemble(nn.Module):
    """Average the softmax of several fold models (same labels and patching): one model to the outside.

    `forward(pixel_values)` returns `ImageClassifierOutput(logits=log(mean probabilities))`, so softmax of the
    logits is the ensemble probability and argmax the ensemble class.

    Args:
        models: The fold classifiers.
    """

    main_input_name = "pixel_values"

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("FoldEnsemble needs at least one model")
        first = models[0].config
        for k, model in enumerate(models[1:], start=1):
            if dict(model.config.id2label) != dict(first.id2label):
                raise ValueError(f"model {k} has labels {model.config.id2label}, model 0 has {first.id2label}")
            if getattr(model.config, "patching", None) != getattr(first, "patching", None):
                raise ValueError(
                    f"model {k} was trained on other patches ({model.config.patching} vs {first.patching})"
                )
        self.models = nn.ModuleList(models)
        self.config = first

    @classmethod
    def from_pretrained(cls, paths: str | Path | Sequence[str | Path], **kwargs) -> FoldEnsemble:
        """Load fold models from folders; a CV root folder expands to its `fold_*` subfolders."""
        from transformers import AutoModelForImageClassification

        from . import register_auto_classes

        register_auto_classes()  # idempotent; the package registers lazily, the folds load by Auto class
        if isinstance(paths, (str, Path)):
            root = Path(paths)
            fold_dirs = sorted(p for p in root.glob("fold_*") if (p / "config.json").is_file())
            paths = fold_dirs or [root]
        models = [AutoModelForImageClassification.from_pretrained(str(p), **kwargs).eval() for p in paths]
        return cls(models)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the fold models' parameters (what inputs are cast to)."""
        return next(self.parameters()).dtype

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        """Ensemble log-probabilities."""
        probs = None
        for model in self.models:
            p = torch.softmax(model(pixel_values=pixel_values).logits.float(), dim=-1)
            probs = p if probs is None else probs + p
        return ImageClassifierOutput(logits=(probs / len(self.models)).clamp_min(1e-12).log())
