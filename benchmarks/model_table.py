"""Print the backbone table with parameter counts of the real architectures (offline, weights on the meta device).

Usage: python benchmarks/model_table.py
"""

import torch
from transformers import ConvNextConfig, Dinov2Config, ResNetConfig, TimmWrapperConfig, ViTConfig

from hf_histo.models import BACKBONES, HistoClassifierConfig, HistoClassifierForImageClassification, apply_lora
from hf_histo.models.lora import default_lora_targets

_CONVNEXT = {
    "tiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
    "small": ([3, 3, 27, 3], [96, 192, 384, 768]),
    "base": ([3, 3, 27, 3], [128, 256, 512, 1024]),
    "large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
}
_DINOV2 = {"small": (384, 6, 12), "base": (768, 12, 12), "large": (1024, 16, 24)}

# The Hub configs of the table's checkpoints, rebuilt locally (architecture fields only).
REAL_CONFIGS = {
    "phikon": lambda: ViTConfig(),  # ViT-B/16, 224 px
    "phikon-v2": lambda: Dinov2Config(hidden_size=1024, num_attention_heads=16, num_hidden_layers=24, patch_size=16),
    "vit-base": lambda: ViTConfig(),
    **{
        f"convnext-{s}": (lambda d=d, h=h: ConvNextConfig(depths=d, hidden_sizes=h)) for s, (d, h) in _CONVNEXT.items()
    },
    **{
        f"dinov2-{s}": (
            lambda h=h, a=a, n=n: Dinov2Config(
                hidden_size=h, num_attention_heads=a, num_hidden_layers=n, image_size=518
            )
        )
        for s, (h, a, n) in _DINOV2.items()
    },
    "resnet": lambda: ResNetConfig(**BACKBONES["resnet"].scratch_config),
    "efficientnet-b0": lambda: TimmWrapperConfig(architecture="efficientnet_b0"),
    "resnet50-timm": lambda: TimmWrapperConfig(architecture="resnet50"),
}


def describe(name: str, num_labels: int = 4) -> dict:
    """Parameter counts and structure of one table entry, built on the meta device."""
    spec = BACKBONES[name]
    with torch.device("meta"):
        config = HistoClassifierConfig(
            backbone_config=REAL_CONFIGS[name](), num_labels=num_labels, pooling=spec.pooling
        )
        model = HistoClassifierForImageClassification(config)
        backbone = sum(p.numel() for p in model.backbone.parameters())
        blocks = [b for b, _ in model.backbone_blocks() if b not in ("embeddings", "post_backbone")]
        stages = [b for b, _ in model.backbone_blocks(coarse=True) if b not in ("embeddings", "post_backbone")]
        feature_dim = model.classifier[-1].in_features
        targets = default_lora_targets(model)
        lora = apply_lora(model, target_modules=targets)
        lora_trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        total = sum(p.numel() for p in lora.parameters())
    return {
        "name": name,
        "hub_id": spec.hub_id or "(from scratch)",
        "arch": spec.architecture,
        "pooling": spec.pooling,
        "dim": feature_dim,
        "blocks": f"{len(blocks)}" + (f" ({len(stages)} stages)" if spec.stage else ""),
        "lora": ",".join(targets),
        "params": backbone,
        "lora_pct": 100 * lora_trainable / total,
    }


def main() -> None:
    header = "| name | checkpoint | architecture | pooling | dim | blocks | LoRA targets | backbone params | LoRA r=16 trainable |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name in BACKBONES:
        row = describe(name)
        print(
            f"| {row['name']} | {row['hub_id']} | {row['arch']} | {row['pooling']} | {row['dim']} | {row['blocks']} "
            f"| {row['lora']} | {row['params'] / 1e6:.1f}M | {row['lora_pct']:.2f}% |"
        )


if __name__ == "__main__":
    main()
