"""Backbone table: per-family pooling, block enumeration, LoRA targets and normalisation layers (plain data)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

# Ships with checkpoints next to modeling_histo.py: stdlib + transformers only, no hf_histo imports.

POOLINGS = ("cls", "mean", "cls_mean", "pooler")


@dataclass(frozen=True)
class BackboneSpec:
    """How hf-histo drives one backbone family (or one named checkpoint of it).

    Regexes are matched with `re.match` against parameter names relative to the backbone module
    (`model.backbone`), so a `peft` prefix or our own `backbone.` prefix never matters. The first capture
    group of `block` names the block a parameter belongs to; parameters before the first block are the
    stem ("embeddings"), parameters after the last block are the final norm ("post_backbone").

    Attributes:
        name: Table key (`"phikon"`, `"convnext-tiny"`) or the family name for family-level specs.
        model_type: `config.model_type` of the backbone in transformers (`"vit"`, `"timm_wrapper"`).
        hub_id: Default checkpoint on the Hub; `None` for backbones trained from scratch.
        architecture: Human-readable architecture, for docs and model cards.
        pooling: Default pooling of the token/feature map into one vector per patch.
        tokens: Whether `last_hidden_state` is a token sequence with a CLS token at position 0.
        block: Regex whose first group is the block id (one transformer layer, one ConvNeXt layer, ...).
        stage: Regex whose first group is the coarse stage id (hierarchical CNNs); `None` when blocks are flat.
        lora_targets: Groups of module-name suffixes for LoRA; the first group present in the model is used
            (transformers 5 names first, transformers 4 names as fallback).
        norm_layers: Class names treated as normalisation layers on top of torch's BatchNorm/GroupNorm/LayerNorm.
        init_kwargs: Extra keyword arguments for `AutoModel.from_config/from_pretrained` (e.g. no ViT pooler).
        scratch_config: Config kwargs for backbones built from scratch (no `hub_id`).
        notes: Free text for the model card.
    """

    name: str
    model_type: str
    hub_id: str | None = None
    architecture: str = ""
    pooling: str = "pooler"
    tokens: bool = False
    block: str = r"((?:encoder\.)?(?:layers?|stages?|blocks)\.\d+)\."
    stage: str | None = None
    lora_targets: tuple[tuple[str, ...], ...] = ()
    norm_layers: tuple[str, ...] = ("LayerNorm", "BatchNorm2d", "GroupNorm")
    init_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    scratch_config: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    notes: str = ""

    def block_id(self, relative_name: str, coarse: bool = False) -> str | None:
        """Return the block (or, with `coarse`, the stage) a backbone-relative parameter name belongs to."""
        pattern = self.stage if coarse and self.stage else self.block
        match = re.match(pattern, relative_name)
        return match.group(1) if match else None


# ---- families: how to walk the real transformers 5 modules (checked against the installed version) ----------------
# ViTModel (5.x): embeddings.*, layers.N.attention.{q,k,v,o}_proj, layers.N.mlp.fc1/fc2, layernorm, pooler.dense
# ViTModel (4.x): encoder.layer.N.attention.attention.{query,key,value}; the block regex accepts both.
VIT = BackboneSpec(
    name="vit",
    model_type="vit",
    architecture="ViT",
    pooling="cls",
    tokens=True,
    block=r"((?:encoder\.)?layers?\.\d+)\.",
    lora_targets=(("q_proj", "v_proj"), ("query", "value")),
    norm_layers=("LayerNorm",),
    # Phikon and the in21k ViT are used through the CLS token: the tanh pooler is untrained for our task and
    # would be an unused parameter under DDP, so it is only built for pooling="pooler".
    init_kwargs={"add_pooling_layer": False},
)
# Dinov2Model: embeddings.*, encoder.layer.N.attention.{q,k,v,o}_proj, encoder.layer.N.mlp, layernorm
DINOV2 = BackboneSpec(
    name="dinov2",
    model_type="dinov2",
    architecture="DINOv2 ViT",
    pooling="cls_mean",
    tokens=True,
    block=r"(encoder\.layer\.\d+)\.",
    lora_targets=(("q_proj", "v_proj"), ("query", "value")),
    norm_layers=("LayerNorm",),
)
# ConvNextModel: embeddings.*, encoder.stages.S.downsampling_layer.*, encoder.stages.S.layers.L.{dwconv,
# layernorm,pwconv1,pwconv2}, layernorm (applied to the global average = pooler_output)
CONVNEXT = BackboneSpec(
    name="convnext",
    model_type="convnext",
    architecture="ConvNeXt",
    pooling="pooler",
    block=r"(encoder\.stages\.\d+\.(?:layers\.\d+|downsampling_layer))\.",
    stage=r"(encoder\.stages\.\d+)\.",
    lora_targets=(("pwconv1", "pwconv2"),),
    norm_layers=("ConvNextLayerNorm", "LayerNorm"),
)
# ResNetModel: embedder.*, encoder.stages.S.layers.L.{shortcut,layer.K}.{convolution,normalization}; no final norm
RESNET = BackboneSpec(
    name="resnet",
    model_type="resnet",
    architecture="ResNet",
    pooling="pooler",
    block=r"(encoder\.stages\.\d+\.layers\.\d+)\.",
    stage=r"(encoder\.stages\.\d+)\.",
    lora_targets=(("convolution",),),
    norm_layers=("BatchNorm2d",),
)
# TimmWrapperModel: timm_model.<timm names>; covers EfficientNet (conv_stem, blocks.S.B, conv_head), ResNet
# (conv1, layerS.B), ViT (patch_embed, blocks.N, norm) and ConvNeXt (stem, stages.S.blocks.B, head.norm).
TIMM = BackboneSpec(
    name="timm",
    model_type="timm_wrapper",
    architecture="any timm model",
    pooling="pooler",
    block=r"timm_model\.((?:blocks|stages|layers)\.\d+(?:\.(?:blocks\.)?\d+)?|layer\d+\.\d+)\.",
    stage=r"timm_model\.((?:blocks|stages|layers)\.\d+|layer\d+)\.",
    lora_targets=(("qkv",), ("conv_pw", "conv_pwl"), ("fc1", "fc2"), ("conv1", "conv2", "conv3")),
    norm_layers=("BatchNorm2d", "BatchNormAct2d", "LayerNorm", "LayerNorm2d", "GroupNorm", "GroupNormAct"),
)
# Anything else AutoModel can build: best-effort block regex, pooler output, no default LoRA targets.
GENERIC = BackboneSpec(name="generic", model_type="", architecture="unknown AutoModel backbone")

FAMILIES: dict[str, BackboneSpec] = {spec.model_type: spec for spec in (VIT, DINOV2, CONVNEXT, RESNET, TIMM)}

# The seed's from-scratch CNN: 2 stacks x 3 basic blocks, 32 filters.
SEED_RESNET = {"embedding_size": 32, "hidden_sizes": [32, 64], "depths": [3, 3], "layer_type": "basic"}

_CONVNEXT_SIZES = {"tiny": "ConvNeXt-T", "small": "ConvNeXt-S", "base": "ConvNeXt-B", "large": "ConvNeXt-L"}

BACKBONES: dict[str, BackboneSpec] = {
    "phikon": replace(
        VIT,
        name="phikon",
        hub_id="owkin/phikon",
        architecture="ViT-B/16",
        notes="iBOT on 40M TCGA tiles; CLS token of last_hidden_state, loaded without the pooling layer",
    ),
    "phikon-v2": replace(
        DINOV2,
        name="phikon-v2",
        hub_id="owkin/phikon-v2",
        architecture="ViT-L/16",
        pooling="cls",
        notes="DINOv2 on 460M pan-cancer tiles; CLS token",
    ),
    "vit-base": replace(
        VIT,
        name="vit-base",
        hub_id="google/vit-base-patch16-224-in21k",
        architecture="ViT-B/16",
        notes="ImageNet-21k; CLS token",
    ),
    **{
        f"convnext-{size}": replace(
            CONVNEXT, name=f"convnext-{size}", hub_id=f"facebook/convnext-{size}-224", architecture=arch
        )
        for size, arch in _CONVNEXT_SIZES.items()
    },
    **{
        f"dinov2-{size}": replace(
            DINOV2,
            name=f"dinov2-{size}",
            hub_id=f"facebook/dinov2-{size}",
            architecture=f"ViT-{size[0].upper()}/14",
            notes="CLS token concatenated with the mean patch token (the DINOv2 linear-probe recipe)",
        )
        for size in ("small", "base", "large")
    },
    "resnet": replace(
        RESNET,
        name="resnet",
        architecture="ResNet 2x3 basic blocks, 32 filters",
        scratch_config=SEED_RESNET,
        notes="from scratch (no pretrained weights), the seed's small CNN",
    ),
    "efficientnet-b0": replace(
        TIMM,
        name="efficientnet-b0",
        hub_id="timm/efficientnet_b0.ra_in1k",
        architecture="EfficientNet-B0 (timm)",
        notes="through transformers' TimmWrapperModel; any `timm/...` Hub id works the same way",
    ),
    "resnet50-timm": replace(
        TIMM, name="resnet50-timm", hub_id="timm/resnet50.a1_in1k", architecture="ResNet-50 (timm)"
    ),
}


def get_backbone_spec(config_or_model_type: Any) -> BackboneSpec:
    """Return the table entry for a table name, Hub id, model type, config or model.

    Args:
        config_or_model_type: `"phikon"`, `"owkin/phikon"`, `"vit"`, a backbone `PretrainedConfig`, a
            `HistoClassifierConfig` (its backbone is used) or a model with a `.config`.

    Returns:
        The named entry when a table name or known Hub id is given, otherwise the family spec of the model type
        (`GENERIC` for model types the table does not know).
    """
    obj = config_or_model_type
    if isinstance(obj, str):
        if obj in BACKBONES:
            return BACKBONES[obj]
        for spec in BACKBONES.values():
            if spec.hub_id == obj:
                return spec
        if obj in FAMILIES:
            return FAMILIES[obj]
        return replace(GENERIC, model_type=obj)
    config = getattr(obj, "config", obj)
    config = getattr(config, "backbone_config", None) or config
    model_type = getattr(config, "model_type", "")
    return FAMILIES.get(model_type) or replace(GENERIC, model_type=model_type)


def tiny_backbone_config(family: str):
    """Build a tiny backbone config for tests and smoke runs (no downloads; 32x32 inputs).

    Args:
        family: One of `"vit"` (alias `"phikon"`), `"dinov2"`, `"convnext"`, `"resnet"`, `"timm"`.

    Returns:
        A transformers `PretrainedConfig` that `AutoModel.from_config` builds in well under a second.
    """
    from transformers import ConvNextConfig, Dinov2Config, ResNetConfig, TimmWrapperConfig, ViTConfig

    vit_kw = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    builders = {
        "vit": lambda: ViTConfig(intermediate_size=37, **vit_kw),
        "phikon": lambda: ViTConfig(intermediate_size=37, **vit_kw),
        "dinov2": lambda: Dinov2Config(mlp_ratio=2, **vit_kw),
        "convnext": lambda: ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], image_size=32),
        "resnet": lambda: ResNetConfig(**SEED_RESNET),
        # timm's own test network (EfficientNet blocks, ~0.36M params), created with pretrained=False.
        "timm": lambda: TimmWrapperConfig(architecture="test_efficientnet"),
    }
    if family not in builders:
        raise ValueError(f"Unknown tiny backbone family {family!r}; choose one of {sorted(builders)}.")
    return builders[family]()
