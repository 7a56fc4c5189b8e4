"""Models layer: histology classifier config/model, backbone table and LoRA helpers; Auto classes registered lazily."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backbones import BACKBONES, BackboneSpec, get_backbone_spec, tiny_backbone_config
    from .configuration_histo import HistoClassifierConfig
    from .configuration_segmentation import HistoSegmentationConfig
    from .lora import apply_lora, merge_lora
    from .modeling_histo import HistoClassifierForImageClassification
    from .modeling_segmentation import HistoSegmentationModel

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "HistoClassifierConfig",
    "HistoClassifierForImageClassification",
    "HistoSegmentationConfig",
    "HistoSegmentationModel",
    "apply_lora",
    "get_backbone_spec",
    "merge_lora",
    "register_auto_classes",
    "register_segmentation_classes",
    "tiny_backbone_config",
]

# Public name -> submodule. Importing this package imports neither torch nor transformers (aggregation.py and
# backbones.py are numpy/stdlib only); the first name read from a transformers module registers the Auto classes.
_LAZY = {
    "BACKBONES": "backbones",
    "BackboneSpec": "backbones",
    "get_backbone_spec": "backbones",
    "tiny_backbone_config": "backbones",
    "HistoClassifierConfig": "configuration_histo",
    "HistoClassifierForImageClassification": "modeling_histo",
    "HistoSegmentationConfig": "configuration_segmentation",
    "HistoSegmentationModel": "modeling_segmentation",
    "apply_lora": "lora",
    "merge_lora": "lora",
}
_REGISTERING = frozenset({"configuration_histo", "modeling_histo", "lora"})
_registered = False


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    if module in _REGISTERING and not _registered:
        register_auto_classes()
    if module in ("configuration_segmentation", "modeling_segmentation"):
        register_segmentation_classes()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _same_class(a: type, b: type) -> bool:
    # A re-import (importlib.reload, a second import path) creates a new class object with the same qualified name.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_auto_classes(config_class: type | None = None, model_class: type | None = None) -> None:
    """Register the classifier with `AutoConfig`/`AutoModelForImageClassification` and for remote code.

    Idempotent for the same classes; raises when another class already claims the model type, because
    transformers would otherwise silently replace it. Reading `HistoClassifierConfig` or
    `HistoClassifierForImageClassification` from `hf_histo` or `hf_histo.models` calls it, and so do the library's
    own loaders before `from_pretrained`; call it yourself before `AutoModelForImageClassification.from_pretrained`
    of an hf-histo folder (without `trust_remote_code`) when nothing else has.

    Args:
        config_class: The config class (default: `HistoClassifierConfig`).
        model_class: The model class (default: `HistoClassifierForImageClassification`).

    Raises:
        ValueError: `config_class.model_type` is registered to a different class.
    """
    global _registered
    from transformers import AutoConfig, AutoModelForImageClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .configuration_histo import HistoClassifierConfig
    from .modeling_histo import HistoClassifierForImageClassification

    config_class = HistoClassifierConfig if config_class is None else config_class
    model_class = HistoClassifierForImageClassification if model_class is None else model_class
    model_type = config_class.model_type
    try:
        existing = CONFIG_MAPPING[model_type]
    except KeyError:
        existing = None
    if existing is not None and not _same_class(existing, config_class):
        raise ValueError(
            f"Model type {model_type!r} is already registered to {existing.__module__}.{existing.__qualname__}; "
            f"refusing to replace it with {config_class.__module__}.{config_class.__qualname__}."
        )
    AutoConfig.register(model_type, config_class, exist_ok=True)
    AutoModelForImageClassification.register(config_class, model_class, exist_ok=True)
    # save_pretrained then copies configuration_histo.py, modeling_histo.py and backbones.py next to the weights
    # and writes `auto_map`, so a checkpoint loads with trust_remote_code=True where hf_histo is not installed.
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModelForImageClassification")
    if config_class is HistoClassifierConfig and model_class is HistoClassifierForImageClassification:
        _registered = True


def register_segmentation_classes() -> None:
    """Register the ROI segmentation model with `AutoConfig`/`AutoModelForSemanticSegmentation` and for remote code.

    Idempotent. `save_pretrained` then copies configuration_segmentation.py and modeling_segmentation.py next to the
    weights, so the folder loads with ``trust_remote_code=True`` where hf-histo is not installed.
    """
    from transformers import AutoConfig, AutoModelForSemanticSegmentation

    from .configuration_segmentation import HistoSegmentationConfig
    from .modeling_segmentation import HistoSegmentationModel

    AutoConfig.register(HistoSegmentationConfig.model_type, HistoSegmentationConfig, exist_ok=True)
    AutoModelForSemanticSegmentation.register(HistoSegmentationConfig, HistoSegmentationModel, exist_ok=True)
    HistoSegmentationConfig.register_for_auto_class()
    HistoSegmentationModel.register_for_auto_class("AutoModelForSemanticSegmentation")
