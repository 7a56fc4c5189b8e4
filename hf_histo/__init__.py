"""hf-histo: fine-tune vision foundation models on small histopathology datasets with the Hugging Face stack.

Importing the package registers, in one place, the model classes with the Auto classes and the
``histo-image-classification`` pipeline task.
"""

__version__ = "0.1.0"

from .data.builder import build_patch_dataset, load_patch_dataset
from .data.images import DataError, load_rgb
from .data.patching import PatchBox, PatchingConfig, component_boxes, grid_boxes, topk_boxes
from .data.sources import Sample, SampleSet, read_samples
from .hub import HubUnavailableError, push_folder_to_hub, save_for_hub
from .inference.engine import ImagePrediction, InferenceEngine
from .inference.loading import load_engine
from .inference.pipeline import HistoImageClassificationPipeline, load_pipeline, register_pipeline_task
from .inference.results import ImageLevelResult
from .models import (
    HistoClassifierConfig,
    HistoClassifierForImageClassification,
    apply_lora,
    merge_lora,
)
from .models.aggregation import aggregate, aggregate_by_image

register_pipeline_task()

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
    "build_patch_dataset",
    "component_boxes",
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
