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
    logits is the ensemble probability and argmax the ensemble class. When every fold has an attention-MIL head,
    `embed` concatenates the folds' patch embeddings and `image_logits` runs each fold's head on its part: the
    ensemble's image probability is the mean of the folds' (as for patches), its attention the folds' mean.

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

    @property
    def has_mil_head(self) -> bool:
        """Whether every fold model has an attention-MIL head."""
        return all(getattr(model, "mil", None) is not None for model in self.models)

    def _split(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return embeddings.split([model._feature_dim() for model in self.models], dim=-1)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The fold models' pooled patch embeddings, concatenated: ``[B, sum of D]``."""
        return torch.cat([model.embed(pixel_values) for model in self.models], dim=-1)

    def classify_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """Ensemble log-probabilities ``[B, C]`` of `embed` outputs (equal to `forward`'s logits)."""
        probs = sum(
            torch.softmax(model.classify_embeddings(part).float(), dim=-1)
            for model, part in zip(self.models, self._split(features))
        )
        return (probs / len(self.models)).clamp_min(1e-12).log()

    def image_logits(
        self, embeddings: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log of the folds' mean image probability ``[B, C]`` and their mean patch attention ``[B, N]``.

        Args:
            embeddings: `embed` outputs of each image's patches ``[B, N, sum of D]``, padded to ``N``.
            mask: ``[B, N]`` bool, True on real patches (default: all).
        """
        probs, attention = 0.0, 0.0
        for model, part in zip(self.models, self._split(embeddings)):
            logits, weights = model.image_logits(part, mask)
            probs, attention = probs + torch.softmax(logits.float(), dim=-1), attention + weights
        return (probs / len(self.models)).clamp_min(1e-12).log(), attention / len(self.models)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        """Ensemble log-probabilities."""
        probs = None
        for model in self.models:
            p = torch.softmax(model(pixel_values=pixel_values).logits.float(), dim=-1)
            probs = p if probs is None else probs + p
        return ImageClassifierOutput(logits=(probs / len(self.models)).clamp_min(1e-12).log())
