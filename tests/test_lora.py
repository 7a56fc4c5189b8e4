"""Tests for LoRA wiring: default targets, trainable fraction, head in modules_to_save, merged round trip."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fallback when run without tests/conftest.py

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageClassification, ViTConfig

from hf_histo.models import (
    HistoClassifierConfig,
    HistoClassifierForImageClassification,
    apply_lora,
    merge_lora,
    tiny_backbone_config,
)
from hf_histo.models.lora import default_lora_targets

DEFAULT_TARGETS = {
    "vit": ["q_proj", "v_proj"],
    "dinov2": ["q_proj", "v_proj"],
    "convnext": ["pwconv1", "pwconv2"],
    "resnet": ["convolution"],
    "timm": ["conv_pw", "conv_pwl"],
}


def tiny_model(family="vit", seed=0, **kwargs):
    torch.manual_seed(seed)
    config = HistoClassifierConfig(backbone_config=tiny_backbone_config(family), num_labels=3, **kwargs)
    return HistoClassifierForImageClassification(config)


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        model(pixel_values=images(4, seed=2), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("family", list(DEFAULT_TARGETS))
def test_only_adapters_on_default_targets_and_the_head_train(family):
    model = tiny_model(family)
    assert default_lora_targets(model) == DEFAULT_TARGETS[family]
    peft_model = apply_lora(model, r=4, alpha=8)
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    adapters = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    head = {n for n in names if ".classifier.modules_to_save." in n}
    assert adapters and head and names == adapters | head
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapters}
    assert targeted == set(DEFAULT_TARGETS[family])
    assert all(".backbone." in n for n in adapters)


def test_trainable_fraction_is_small_for_vit_base():
    with torch.device("meta"):  # real ViT-B/16 sizes without allocating weights
        model = HistoClassifierForImageClassification(HistoClassifierConfig(backbone_config=ViTConfig(), num_labels=4))
        peft_model = apply_lora(model)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    assert trainable == 12 * 2 * (768 * 16 * 2) + (768 * 4 + 4)  # q/v adapters (r=16) + head
    assert trainable / total < 0.01


@pytest.mark.parametrize("family", ["vit", "convnext", "timm"])
def test_merged_model_is_plain_and_round_trips_through_auto(tmp_path, family):
    peft_model = train_steps(apply_lora(tiny_model(family, head="mlp", head_hidden=16), r=4))
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    x = images()
    with torch.no_grad():
        expected = peft_model(pixel_values=x).logits
    merged = merge_lora(peft_model)
    assert type(merged) is HistoClassifierForImageClassification
    assert not any(k in n for n, _ in merged.named_modules() for k in ("lora_", "base_layer", "modules_to_save"))
    assert set(merged.state_dict()) == set(tiny_model(family, head="mlp", head_hidden=16).state_dict())
    assert all(p.requires_grad for p in merged.parameters())  # config freeze="none" re-applied
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x).logits, expected, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, merged(x).logits, rtol=0, atol=0)


def test_adapter_reload_restores_the_trained_head(tmp_path):
    peft_model = train_steps(apply_lora(tiny_model("vit"), r=4))
    x = images()
    with torch.no_grad():
        expected = peft_model(pixel_values=x).logits
    peft_model.save_pretrained(tmp_path)

    base = tiny_model("vit")  # same backbone weights, but give it a different random head
    torch.manual_seed(123)
    base.classifier[1].reset_parameters()
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, expected, rtol=1e-5, atol=1e-5)


def test_explicit_targets_and_missing_defaults():
    peft_model = apply_lora(tiny_model("vit"), r=2, target_modules=["fc1"])
    adapters = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert adapters and all(".mlp.fc1." in n for n in adapters)
    generic = tiny_model("resnet")
    generic.config.backbone_config = ViTConfig()  # table says q_proj/v_proj, the ResNet has none
    with pytest.raises(ValueError, match="No default LoRA targets.*pass target_modules"):
        default_lora_targets(generic)


def test_merge_lora_passes_plain_models_through():
    model = tiny_model("vit")
    assert merge_lora(model) is model
