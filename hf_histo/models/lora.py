"""LoRA wiring with peft: default targets from the backbone table, head kept in modules_to_save, merge back."""

from __future__ import annotations

from typing import Any

from torch import nn

from .backbones import get_backbone_spec
from .modeling_histo import HistoClassifierForImageClassification

_LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_lora_targets(model: HistoClassifierForImageClassification) -> list[str]:
    """Module-name suffixes LoRA targets by default: the first group of the table's `lora_targets` present.

    Raises:
        ValueError: The backbone table has no LoRA targets for this backbone that exist in the model.
    """
    spec = get_backbone_spec(model.config.backbone_config)
    present = {
        name.rsplit(".", 1)[-1]
        for name, module in model.backbone.named_modules()
        if isinstance(module, _LORA_LAYER_TYPES)
    }
    for group in spec.lora_targets:
        found = [target for target in group if target in present]
        if found:
            return found
    raise ValueError(
        f"No default LoRA targets for backbone {model.config.backbone_config.model_type!r} "
        f"(table targets {spec.lora_targets}); pass target_modules=[...] with names of its Linear/Conv layers."
    )


def apply_lora(
    model: HistoClassifierForImageClassification,
    r: int = 16,
    alpha: int = 16,
    dropout: float = 0.1,
    target_modules: list[str] | str | None = None,
    **lora_kwargs: Any,
):
    """Wrap the classifier with LoRA adapters; only adapters and the head are trainable.

    Args:
        model: The classifier to adapt (its head is fine-tuned in full through `modules_to_save`, otherwise peft
            would reload it with random weights).
        r: LoRA rank.
        alpha: LoRA scaling numerator (`lora_alpha`).
        dropout: Dropout on the LoRA branch.
        target_modules: peft target modules; defaults to the backbone table's (ViT/Phikon query+value
            projections, ConvNeXt pointwise convs, ...).
        **lora_kwargs: Other `peft.LoraConfig` arguments (e.g. `use_rslora=True`).

    Returns:
        The `peft.PeftModel`; call `merge_lora` on it to get a plain model back.
    """
    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        target_modules = default_lora_targets(model)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=["classifier"],
        **lora_kwargs,
    )
    return get_peft_model(model, config)


def merge_lora(model) -> HistoClassifierForImageClassification:
    """Merge LoRA adapters into the weights and return the plain classifier.

    The result has no peft modules: its `save_pretrained` checkpoint loads through
    `AutoModelForImageClassification` with identical logits and needs no peft at inference. Parameters are made
    trainable again according to the config's freezing policy.

    Args:
        model: A `peft.PeftModel` returned by `apply_lora` (or loaded with `PeftModel.from_pretrained`).
    """
    if not hasattr(model, "merge_and_unload"):  # already plain
        return model
    merged = model.merge_and_unload()
    # Duck-typed: a classifier loaded with trust_remote_code is the same class from another module.
    if not hasattr(merged, "apply_freeze"):
        raise TypeError(f"merge_lora expected a LoRA-wrapped HistoClassifier, got {type(merged).__name__}.")
    merged.apply_freeze(merged.config.freeze, merged.config.trainable_blocks)
    return merged
