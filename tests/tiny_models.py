"""Test helpers: a tiny classifier built from a config and a generated tissue-like image."""

import numpy as np
import torch

from hf_histo.data.patching import PatchingConfig
from hf_histo.models import HistoClassifierConfig, HistoClassifierForImageClassification, tiny_backbone_config

LABELS = {0: "HER2(+)", 1: "Luminal A", 2: "Luminal B"}
PATCHING = PatchingConfig(strategy="grid", patch_size=32, min_foreground=100)


def tiny_model(family: str = "vit", seed: int = 0, **config_kwargs) -> HistoClassifierForImageClassification:
    """A tiny random classifier (eval mode) with `LABELS` and `PATCHING` unless overridden."""
    torch.manual_seed(seed)
    config = HistoClassifierConfig(
        backbone_config=tiny_backbone_config(family),
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        patching=config_kwargs.pop("patching", PATCHING.to_dict()),
        **config_kwargs,
    )
    return HistoClassifierForImageClassification(config).eval()


def tissue_image(size: int = 160, seed: int = 0) -> np.ndarray:
    """White background with a textured pink/purple disc (what tissue detection keeps)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.35) ** 2
    image = np.full((size, size, 3), 245, dtype=np.uint8)
    stain = np.array([200, 90, 170]) - rng.integers(0, 60, size=(size, size, 3))
    image[disc] = np.clip(stain[disc], 0, 255).astype(np.uint8)
    return image


# Prelude of the scripts that run a shipped Hub folder in a fresh interpreter where `import hf_histo` fails, so
# only the folder's own code is used (test_one_path, test_mil); HIDE_ALSO=a,b hides those packages too.
HIDE_HF_HISTO = """
import importlib.abc, json, os, sys
import numpy as np

HIDDEN = ("hf_histo", *filter(None, os.environ.get("HIDE_ALSO", "").split(",")))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ImportError(f"{name} is hidden")

sys.meta_path.insert(0, Hide())
from transformers import pipeline
"""
