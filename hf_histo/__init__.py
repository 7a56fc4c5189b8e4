"""hf-histo: fine-tune vision foundation models on small histopathology datasets with the Hugging Face stack."""

# The package imports lazily: `import hf_histo` (or any of its data modules) loads neither torch nor transformers.
# The model classes are registered with the Auto classes, and the `histo-image-classification` pipeline task with
# transformers, in one place (`_register`): when a model, pipeline or inference name is first read from here, or at
# import when torch is already loaded (it then costs little). The library's own loaders register before loading.

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .data.builder import build_patch_dataset, load_patch_dataset
    from .data.images import DataError, load_rgb
    from .data.patching import PatchBox, PatchingConfig, component_boxes, grid_boxes, topk_boxes
    from .data.sources import Sample, SampleSet, read_samples
    from .hub import HubUnavailableError, push_folder_to_hub, save_for_hub
    from .inference.calibration import fit_temperature
    from .inference.engine import ImagePrediction, InferenceEngine
    from .inference.loading import load_engine, load_pipeline
    from .inference.pipeline import HistoImageClassificationPipeline
    from .inference.results import ImageLevelResult
    from .models import HistoClassifierConfig, HistoClassifierForImageClassification, apply_lora, merge_lora
    from .models.aggregation import aggregate, aggregate_by_image, apply_temperature

__all__ = [
    "DataError",
    "HistoClassifierConfig",
    "HistoClassifierForImageClassification",
    "HistoImageClassificationPipeline",
    "HubUnavailableError",
    "ImageLevelResult",
    "ImagePrediction",
    "InferenceEngine",
    "PatchBox",
    "PatchingConfig",
    "Sample",
    "SampleSet",
    "aggregate",
    "aggregate_by_image",
    "apply_lora",
    "apply_temperature",
    "build_patch_dataset",
    "component_boxes",
    "fit_temperature",
    "grid_boxes",
    "load_engine",
    "load_patch_dataset",
    "load_pipeline",
    "load_rgb",
    "merge_lora",
    "push_folder_to_hub",
    "read_samples",
    "save_for_hub",
    "topk_boxes",
]

# Public name -> the module that defines it (relative to this package).
_LAZY = {
    "build_patch_dataset": "data.builder",
    "load_patch_dataset": "data.builder",
    "DataError": "data.images",
    "load_rgb": "data.images",
    "PatchBox": "data.patching",
    "PatchingConfig": "data.patching",
    "component_boxes": "data.patching",
    "grid_boxes": "data.patching",
    "topk_boxes": "data.patching",
    "Sample": "data.sources",
    "SampleSet": "data.sources",
    "read_samples": "data.sources",
    "HubUnavailableError": "hub",
    "push_folder_to_hub": "hub",
    "save_for_hub": "hub",
    "ImagePrediction": "inference.engine",
    "InferenceEngine": "inference.engine",
    "load_engine": "inference.loading",
    "HistoImageClassificationPipeline": "inference.pipeline",
    "load_pipeline": "inference.loading",
    "ImageLevelResult": "inference.results",
    "HistoClassifierConfig": "models",
    "HistoClassifierForImageClassification": "models",
    "apply_lora": "models",
    "merge_lora": "models",
    "aggregate": "models.aggregation",
    "aggregate_by_image": "models.aggregation",
    "apply_temperature": "models.aggregation",
    "fit_temperature": "inference.calibration",
}
# Modules whose names are used with models or pipelines (they import torch anyway): reading one registers first.
_REGISTERING = frozenset(
    {"hub", "inference.engine", "inference.loading", "inference.pipeline", "inference.results", "models"}
)
# Submodules reachable as attributes after `import hf_histo`, as they were when the package imported eagerly.
_SUBMODULES = frozenset({"data", "hub", "inference", "models", "training", "utils"})
_registered = False


def _register() -> None:
    """Register the Auto classes and the pipeline task with transformers, once (both calls are idempotent)."""
    global _registered
    if _registered:
        return
    from .inference.pipeline import register_pipeline_task
    from .models import register_auto_classes

    register_auto_classes()
    register_pipeline_task()
    _registered = True


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module in _REGISTERING:
        _register()
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


if "torch" in sys.modules:  # e.g. transformers was imported first: registering now is cheap and saves surprises
    _register()
