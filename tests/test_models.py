"""Tests for the models layer: config, classifier, backbone table, freezing and Auto round trips (tiny, offline)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fallback when run without tests/conftest.py

import importlib
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, PretrainedConfig, ViTModel

import hf_histo.models as models_pkg
from hf_histo.models import (
    BACKBONES,
    HistoClassifierConfig,
    HistoClassifierForImageClassification,
    get_backbone_spec,
    register_auto_classes,
    tiny_backbone_config,
)

FAMILIES = ["vit", "dinov2", "convnext", "resnet", "timm"]
HEADS = ["linear", "mlp", "deep"]
POLICIES = ["none", "backbone", "backbone_except_norm", "last_n"]

# Independent oracles (from the real module names) for what each policy must leave trainable.
NORM_PARAM = {
    "vit": r"layernorm",
    "dinov2": r"norm1|norm2|layernorm",
    "convnext": r"layernorm|downsampling_layer\.0\.",
    "resnet": r"normalization",
    "timm": r"\.bn\d\.",
}
LAST_BLOCK_AND_POST = {
    "vit": r"^backbone\.(layers\.1\.|layernorm\.)",
    "dinov2": r"^backbone\.(encoder\.layer\.1\.|layernorm\.)",
    "convnext": r"^backbone\.(encoder\.stages\.3\.layers\.0\.|layernorm\.)",
    "resnet": r"^backbone\.encoder\.stages\.1\.layers\.2\.",
    "timm": r"^backbone\.timm_model\.(blocks\.4\.0\.|conv_head\.|bn2\.)",
}


def tiny_model(family="vit", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("num_labels", 3)
    return HistoClassifierForImageClassification(
        HistoClassifierConfig(backbone_config=tiny_backbone_config(family), **kwargs)
    )


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_every_family_and_head(family, head):
    model = tiny_model(family, head=head, head_hidden=16, head_layers=2, dropout=0.1)
    out = model(pixel_values=images(), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None for n in model.head_parameter_names())
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("backbone."))
    model.eval()
    with torch.no_grad():
        x = images()
        torch.testing.assert_close(model(x).logits, model.classify_embeddings(model.embed(x)))


def test_head_layouts():
    mlp = tiny_model(head="mlp", head_hidden=16, head_activation="relu").classifier
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    deep = tiny_model(head="deep", head_hidden=[24, 16, 12, 8], head_layers=4).classifier
    assert [type(m) for m in deep] == [nn.Linear, nn.GELU, nn.LayerNorm, nn.Dropout] * 4 + [nn.Linear]
    assert [m.out_features for m in deep if isinstance(m, nn.Linear)] == [24, 16, 12, 8, 3]
    linear = tiny_model(head="linear").classifier
    assert [type(m) for m in linear] == [nn.Dropout, nn.Linear] and linear[1].in_features == 32


def test_soft_targets_give_the_same_loss_as_one_hot():
    model = tiny_model().eval()
    x, labels = images(), torch.tensor([1, 2])
    hard = model(x, labels=labels).loss
    soft = model(x, labels=nn.functional.one_hot(labels, 3).float()).loss
    torch.testing.assert_close(hard, soft)


@pytest.mark.parametrize(
    ("family", "pooling", "dim"),
    [("vit", "cls", 32), ("vit", "mean", 32), ("vit", "cls_mean", 64), ("vit", "pooler", 32)]
    + [("dinov2", "cls_mean", 64), ("convnext", "pooler", 32), ("convnext", "mean", 32), ("resnet", "pooler", 64)]
    + [("resnet", "mean", 64), ("timm", "pooler", 256), ("timm", "mean", 256)],
)
def test_pooling_dims(family, pooling, dim):
    model = tiny_model(family, pooling=pooling).eval()
    with torch.no_grad():
        assert model.embed(images()).shape == (2, dim)


def test_vit_pooling_matches_hidden_states():
    model = tiny_model("vit", pooling="mean").eval()
    x = images()
    with torch.no_grad():
        hidden = model.backbone(pixel_values=x).last_hidden_state
        torch.testing.assert_close(model.embed(x), hidden[:, 1:].mean(1))
        model.config.pooling = "cls"
        torch.testing.assert_close(model.embed(x), hidden[:, 0])
    # Phikon-style ViT has no (unused, untrained) pooler unless pooling="pooler" asks for it.
    assert not any("pooler" in n for n, _ in model.named_parameters())
    assert any("pooler" in n for n, _ in tiny_model("vit", pooling="pooler").named_parameters())


def test_vit_interpolates_for_other_patch_sizes():
    model = tiny_model("vit").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).logits.shape == (1, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head": "transformer"}, r"head='transformer'.*\['linear', 'mlp', 'deep'\]"),
        ({"pooling": "max"}, r"pooling='max'"),
        ({"freeze": "all"}, r"freeze='all'"),
        ({"aggregation": "vote"}, r"aggregation='vote'"),
        ({"freeze": "last_n"}, r"trainable_blocks >= 0"),
        ({"trainable_blocks": 2}, r"only used with freeze='last_n'"),
        ({"dropout": 1.5}, r"dropout"),
        ({"head": "deep", "head_hidden": [8, 8], "head_layers": 3}, r"2 widths but head_layers=3"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HistoClassifierConfig(backbone_config=tiny_backbone_config("vit"), **kwargs)


def test_cls_pooling_on_feature_maps_is_rejected():
    with pytest.raises(ValueError, match="CLS token.*'pooler' or 'mean'"):
        HistoClassifierConfig(backbone_config=tiny_backbone_config("convnext"), pooling="cls")
    with pytest.raises(ValueError, match="CLS token"):
        tiny_model("timm", pooling="cls")  # EfficientNet through timm: known only once built


def test_config_defaults_and_serialisation(tmp_path):
    config = HistoClassifierConfig(
        backbone_config=tiny_backbone_config("convnext"),
        id2label={0: "HER2(+)", 1: "Luminal A"},
        patching={"strategy": "grid", "patch_size": 224},
        aggregation="hard",
        backbone_name="facebook/convnext-tiny-224",
    )
    assert config.pooling == "pooler" and config.num_labels == 2 and config.head == "linear"
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is HistoClassifierConfig
    assert loaded.backbone_config.model_type == "convnext"
    assert loaded.backbone_config.hidden_sizes == [8, 16, 24, 32]
    assert loaded.patching == {"strategy": "grid", "patch_size": 224}
    assert (loaded.aggregation, loaded.backbone_name) == ("hard", "facebook/convnext-tiny-224")
    assert loaded.id2label == {0: "HER2(+)", 1: "Luminal A"} and loaded.label2id == {"HER2(+)": 0, "Luminal A": 1}
    assert HistoClassifierConfig().backbone_config.model_type == "vit"  # ViT-B/16 default


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_blocks_partition_the_backbone_in_order(family):
    model = tiny_model(family)
    blocks = model.backbone_blocks()
    names = [n for _, group in blocks for n in group]
    backbone = [n for n, _ in model.named_parameters() if n.startswith("backbone.")]
    assert names == backbone  # every backbone parameter exactly once, input -> output order
    assert blocks[0][0] == "embeddings"
    assert not set(names) & set(model.head_parameter_names())
    expected = {
        "vit": ["embeddings", "layers.0", "layers.1", "post_backbone"],
        "dinov2": ["embeddings", "encoder.layer.0", "encoder.layer.1", "post_backbone"],
        "resnet": ["embeddings"] + [f"encoder.stages.{s}.layers.{i}" for s in (0, 1) for i in range(3)],
        "timm": ["embeddings"] + [f"blocks.{i}.0" for i in range(5)] + ["post_backbone"],
    }
    if family in expected:
        assert [b for b, _ in blocks] == expected[family]
    if family == "convnext":
        assert [b for b, _ in model.backbone_blocks(coarse=True)] == (
            ["embeddings"] + [f"encoder.stages.{i}" for i in range(4)] + ["post_backbone"]
        )
        assert "encoder.stages.1.downsampling_layer" in dict(blocks)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_policies_leave_exactly_the_intended_parameters_trainable(family, policy):
    kwargs = {"trainable_blocks": 1} if policy == "last_n" else {}
    model = tiny_model(family, freeze=policy, **kwargs)
    every = {n for n, _ in model.named_parameters()}
    head = {n for n in every if n.startswith("classifier.")}
    assert head and set(model.head_parameter_names()) == head
    norms = {n for n in every - head if re.search(NORM_PARAM[family], n)}
    assert norms and set(model.norm_parameter_names()) == norms
    expected = {
        "none": every,
        "backbone": head,
        "backbone_except_norm": head | norms,
        "last_n": head | {n for n in every if re.search(LAST_BLOCK_AND_POST[family], n)},
    }[policy]
    assert trainable(model) == expected
    assert model.config.freeze == policy


def test_last_n_counts_blocks_and_can_be_changed_later():
    model = tiny_model("vit")
    model.apply_freeze("last_n", trainable_blocks=0)
    assert trainable(model) == set(model.head_parameter_names())
    model.apply_freeze("last_n", trainable_blocks=5)  # more than there are: all blocks, stem stays frozen
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in dict(model.named_parameters()) if n.startswith("backbone.embeddings.")}
    assert model.config.trainable_blocks == 5
    model.apply_freeze("none")
    assert model.config.trainable_blocks is None and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="Unknown freeze policy"):
        model.apply_freeze("everything")


def test_frozen_batchnorm_keeps_its_statistics():
    model = tiny_model("resnet", freeze="backbone").train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.classifier.training
    before = bns[0].running_mean.clone()
    model(images(4))
    torch.testing.assert_close(bns[0].running_mean, before)
    model.apply_freeze("none")
    model.train()
    assert all(m.training for m in bns)


@pytest.mark.parametrize(("family", "head"), [(f, h) for f in FAMILIES for h in HEADS])
def test_save_and_auto_load_round_trip(tmp_path, family, head):
    model = tiny_model(family, head=head, head_hidden=16, head_layers=2, freeze="backbone_except_norm")
    model.config.patching = {"strategy": "topk", "patch_size": 32, "top_k": 12}
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is HistoClassifierForImageClassification
    assert loaded.config.patching == {"strategy": "topk", "patch_size": 32, "top_k": 12}
    assert trainable(loaded) == trainable(model)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, model.eval()(x).logits, rtol=0, atol=0)


def _to_transformers4_names(state_dict):
    """Rename a transformers-5 ViTModel state dict to the 4.x key names Phikon-era checkpoints carry."""
    renames = [
        (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
        (r"attention\.q_proj", "attention.attention.query"),
        (r"attention\.k_proj", "attention.attention.key"),
        (r"attention\.v_proj", "attention.attention.value"),
        (r"attention\.o_proj", "attention.output.dense"),
        (r"mlp\.fc1", "intermediate.dense"),
        (r"mlp\.fc2", "output.dense"),
    ]
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value.contiguous()
    return out


@pytest.mark.parametrize("naming", ["transformers4", "transformers5"])
def test_from_backbone_loads_vit_checkpoints_in_both_namings(tmp_path, naming):
    torch.manual_seed(0)
    reference = ViTModel(tiny_backbone_config("vit")).eval()  # with pooler weights, like Phikon's checkpoint
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if naming == "transformers4":
        state = _to_transformers4_names(state)
        assert "encoder.layer.0.attention.attention.query.weight" in state
    else:
        assert "layers.0.attention.q_proj.weight" in state
    reference.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})

    model = HistoClassifierForImageClassification.from_backbone(str(tmp_path), num_labels=4, head="mlp")
    assert model.config.backbone_name == str(tmp_path) and model.config.num_labels == 4
    x = images()
    with torch.no_grad():
        expected = reference(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(model.eval().embed(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["dinov2", "convnext", "timm"])
def test_from_backbone_local_folder_keeps_pretrained_weights(tmp_path, family):
    torch.manual_seed(0)
    reference = AutoModel.from_config(tiny_backbone_config(family)).eval()
    reference.save_pretrained(tmp_path)
    model = HistoClassifierForImageClassification.from_backbone(tmp_path, id2label={0: "a", 1: "b"}).eval()
    assert model.config.label2id == {"a": 0, "b": 1}
    x = images()
    with torch.no_grad():
        out = reference(pixel_values=x)
        if family == "dinov2":  # default DINOv2 pooling: CLS + mean patch token
            hidden = out.last_hidden_state
            expected = torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1)
        else:
            expected = out.pooler_output.flatten(1)
        torch.testing.assert_close(model.embed(x), expected, rtol=0, atol=0)


def test_from_backbone_builds_the_seed_resnet_from_scratch():
    model = HistoClassifierForImageClassification.from_backbone("resnet", num_labels=4)
    assert model.config.backbone_config.hidden_sizes == [32, 64]
    assert model.config.backbone_config.depths == [3, 3]
    assert model.config.backbone_name == "resnet"
    with pytest.raises(ValueError, match="num_labels=3 but id2label has 2"):
        HistoClassifierForImageClassification.from_backbone("resnet", num_labels=3, id2label={0: "a", 1: "b"})


@pytest.mark.parametrize("name", ["owkin/phikon", "phikon"])
def test_from_backbone_offline_without_cache_says_how_to_pass_a_folder(tmp_path, monkeypatch, name):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as info:
        HistoClassifierForImageClassification.from_backbone(name, num_labels=2, cache_dir=tmp_path / "empty")
    message = str(info.value)
    assert "'owkin/phikon'" in message
    assert "huggingface-cli download owkin/phikon --local-dir DIR" in message
    assert "local folder" in message and "HF_HOME" in message


def test_backbone_table_entries():
    assert BACKBONES["phikon"].hub_id == "owkin/phikon" and BACKBONES["phikon"].pooling == "cls"
    assert BACKBONES["phikon"].init_kwargs == {"add_pooling_layer": False}
    assert BACKBONES["phikon-v2"].model_type == "dinov2"
    assert {f"convnext-{s}" for s in ("tiny", "small", "base", "large")} <= set(BACKBONES)
    assert BACKBONES["efficientnet-b0"].model_type == "timm_wrapper"
    assert get_backbone_spec("owkin/phikon") is BACKBONES["phikon"]
    assert get_backbone_spec(tiny_backbone_config("convnext")).model_type == "convnext"
    assert get_backbone_spec(tiny_model("timm")).name == "timm"
    assert get_backbone_spec("swin").name == "generic"
    with pytest.raises(ValueError, match="Unknown tiny backbone family"):
        tiny_backbone_config("swin")


def test_auto_registration_is_idempotent_and_loud_on_conflicts():
    importlib.reload(models_pkg)  # re-import registers again without complaint
    register_auto_classes()
    assert type(AutoConfig.for_model("histo_classifier")) is HistoClassifierConfig

    class OtherConfig(PretrainedConfig):
        model_type = "histo_classifier"

    with pytest.raises(ValueError, match="already registered"):
        register_auto_classes(OtherConfig, HistoClassifierForImageClassification)
    assert type(AutoConfig.for_model("histo_classifier")) is HistoClassifierConfig


def test_save_writes_remote_code_files(tmp_path):
    tiny_model("vit").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_histo.HistoClassifierConfig",
        "AutoModelForImageClassification": "modeling_histo.HistoClassifierForImageClassification",
    }
    for name in ("configuration_histo.py", "modeling_histo.py", "backbones.py"):
        assert (tmp_path / name).is_file()
    # 4.x key names on disk (transformers 5 reverses its conversions when saving), loadable by both.
    assert "backbone.encoder.layer.0.attention.attention.query.weight" in load_file(tmp_path / "model.safetensors")


def test_gradient_checkpointing_trains():
    model = tiny_model("vit")
    model.activation_checkpointing_enable()
    model.train()
    model(images(), labels=torch.tensor([0, 1])).loss.backward()
    assert model.backbone.layers[0].attention.q_proj.weight.grad is not None
