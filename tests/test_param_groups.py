"""Tests of optimizer param groups: layer-wise LR decay, head LR, no decay on norms/biases, peft, optimizers."""

import pytest
import torch

from hf_histo.models import (
    HistoClassifierConfig,
    HistoClassifierForImageClassification,
    apply_lora,
    tiny_backbone_config,
)
from hf_histo.training.param_groups import (
    build_param_groups,
    create_optimizer,
    describe_param_groups,
    no_decay_parameter_names,
    parameter_blocks,
)


def _model(family: str = "vit", **kw) -> HistoClassifierForImageClassification:
    torch.manual_seed(0)
    config = HistoClassifierConfig(backbone_config=tiny_backbone_config(family), num_labels=3, **kw)
    return HistoClassifierForImageClassification(config)


def _lrs_by_block(groups) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in groups}


def test_layer_wise_decay_and_head_learning_rate():
    model = _model("vit")
    groups = build_param_groups(model, backbone_lr=1e-4, head_lr=3e-3, layer_decay=0.5, weight_decay=0.05)
    blocks = [name for name, _ in model.backbone_blocks()]
    assert blocks == ["embeddings", "layers.0", "layers.1", "post_backbone"]
    lrs = _lrs_by_block(groups)
    n = len(blocks)
    for i, block in enumerate(blocks):
        assert lrs[block] == pytest.approx(1e-4 * 0.5 ** (n - 1 - i))
    assert lrs["head"] == pytest.approx(3e-3)
    assert groups[0]["role"] == "head"  # the LR Trainer logs is the head's
    assert [g["block_index"] for g in groups if g["role"] == "backbone"] == sorted(
        [g["block_index"] for g in groups if g["role"] == "backbone"], reverse=True
    )
    assert "layers.0" in describe_param_groups(groups)


def test_every_trainable_parameter_is_in_exactly_one_group():
    model = _model("convnext")
    groups = build_param_groups(model, 1e-4, coarse=True, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters())
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    stages = {g["name"] for g in groups if g["role"] == "backbone"}
    assert stages == {
        "embeddings",
        "encoder.stages.0",
        "encoder.stages.1",
        "encoder.stages.2",
        "encoder.stages.3",
        "post_backbone",
    }


def test_no_weight_decay_on_biases_norms_and_1d_parameters():
    model = _model("vit")
    groups = build_param_groups(model, 1e-4, weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    not_decayed = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    params = dict(model.named_parameters())
    assert "backbone.embeddings.cls_token" in not_decayed
    assert "backbone.embeddings.position_embeddings" in not_decayed
    assert all(not n.endswith(".bias") for n in decayed)
    assert set(model.norm_parameter_names()) <= not_decayed
    assert all(params[n].ndim >= 2 for n in decayed)
    assert "backbone.layers.0.attention.q_proj.weight" in decayed
    assert no_decay_parameter_names(model) == not_decayed
    assert all(g["weight_decay"] == 0 for g in build_param_groups(model, 1e-4, weight_decay=0.0))


def test_frozen_parameters_are_left_out():
    model = _model("vit", freeze="backbone")
    groups = build_param_groups(model, 1e-4, head_lr=1e-3)
    assert {g["role"] for g in groups} == {"head"}
    model = _model("timm", freeze="backbone_except_norm")
    names = {n for g in build_param_groups(model, 1e-4) for n in g["param_names"]}
    assert names == set(model.head_parameter_names()) | set(model.norm_parameter_names())
    model = _model("vit")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(model, 1e-4)


def test_lora_parameters_follow_their_blocks_and_the_head_stays_the_head():
    model = apply_lora(_model("vit"), r=4, target_modules=["q_proj", "v_proj"])
    block_names, owner = parameter_blocks(model)
    assert block_names[0] == "embeddings"
    groups = build_param_groups(model, 1e-4, head_lr=1e-3, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["param_names"]}
    lora = [n for n in by_name if "lora_A" in n]
    assert lora and all(by_name[n]["name"].startswith("layers.") for n in lora)
    head = [n for n in by_name if "modules_to_save" in n]
    assert head and all(by_name[n]["role"] == "head" and by_name[n]["lr"] == 1e-3 for n in head)
    assert (
        by_name[[n for n in lora if "layers.0" in n][0]]["lr"] < by_name[[n for n in lora if "layers.1" in n][0]]["lr"]
    )


@pytest.mark.parametrize("name, cls_name", [("adamw", "AdamW"), ("lion", "Lion"), ("sgd", "SGD")])
def test_optimizers_keep_group_metadata_and_step(name, cls_name):
    model = _model("resnet")
    optimizer = create_optimizer(build_param_groups(model, 1e-3, head_lr=1e-2, weight_decay=0.01), name)
    assert type(optimizer).__name__ == cls_name
    assert {g["role"] for g in optimizer.param_groups} == {"head", "backbone"}
    before = model.classifier[-1].weight.detach().clone()
    loss = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2])).loss
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.classifier[-1].weight)


def test_bad_arguments_are_rejected():
    model = _model("vit")
    with pytest.raises(ValueError, match="layer_decay"):
        build_param_groups(model, 1e-4, layer_decay=1.5)
    with pytest.raises(ValueError, match="learning rates"):
        build_param_groups(model, -1.0)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        create_optimizer(build_param_groups(model, 1e-4), "adam")
