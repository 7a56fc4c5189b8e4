"""Models layer: histology classifier config/model, backbone table and LoRA helpers; registers the Auto classes."""

from transformers import AutoConfig, AutoModelForImageClassification
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .backbones import BACKBONES, BackboneSpec, get_backbone_spec, tiny_backbone_config
from .configuration_histo import HistoClassifierConfig
from .lora import apply_lora, merge_lora
from .modeling_histo import HistoClassifierForImageClassification

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "HistoClassifierConfig",
    "HistoClassifierForImageClassification",
    "apply_lora",
    "get_backbone_spec",
    "merge_lora",
    "register_auto_classes",
    "tiny_backbone_config",
]


def _same_class(a: type, b: type) -> bool:
    # A re-import (importlib.reload, a second import path) creates a new class object with the same qualified name.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_auto_classes(
    config_class: type = HistoClassifierConfig, model_class: type = HistoClassifierForImageClassification
) -> None:
    """Register the classifier with `AutoConfig`/`AutoModelForImageClassification` and for remote code.

    Idempotent for the same classes; raises when another class already claims the model type, because
    transformers would otherwise silently replace it.

    Raises:
        ValueError: `config_class.model_type` is registered to a different class.
    """
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


register_auto_classes()
