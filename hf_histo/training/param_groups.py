"""Optimizer parameter groups: layer-wise LR decay over backbone blocks, a head LR, no decay on norms and biases."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "lion", "sgd")
HEAD = "head"
BACKBONE = "backbone"
# A peft model names parameters "base_model.model.<name in the (adapter-injected) base model>".
_PEFT_PREFIX = re.compile(r"^base_model\.model\.")


@dataclass(frozen=True)
class BlockInfo:
    """One backbone block as the optimizer sees it: its position and the names of its trainable parameters."""

    name: str
    index: int
    n_blocks: int
    parameter_names: tuple[str, ...]


def _base_model(model: nn.Module) -> nn.Module:
    """The `HistoClassifierForImageClassification` behind a peft or DDP wrapper."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _base_name(name: str) -> str:
    """Map a (peft) parameter name to its name in the base model."""
    return _PEFT_PREFIX.sub("", name)


def parameter_blocks(model: nn.Module, coarse: bool = False) -> tuple[list[str], dict[str, str]]:
    """Assign every parameter of `model` to `"head"` or to a backbone block.

    Uses the model's own `backbone_blocks()` / `head_parameter_names()` (ordered input to output), so the groups
    follow the backbone table. Parameters of a peft-wrapped model (LoRA adapters, `modules_to_save` head) are
    mapped through their base module path.

    Args:
        model: A `HistoClassifierForImageClassification`, possibly wrapped by peft or DDP.
        coarse: Use stages instead of blocks for hierarchical CNNs.

    Returns:
        `(block_names, owner)`: the block names in input-to-output order and `{parameter name: block name or
        "head"}` for every parameter of `model` (as `model.named_parameters()` names them).
    """
    base = _base_model(model)
    blocks = base.backbone_blocks(coarse=coarse)
    block_names = [name for name, _ in blocks]
    owner_of_base = {p: block for block, names in blocks for p in names}
    owner_of_base.update(dict.fromkeys(base.head_parameter_names(), HEAD))
    owner: dict[str, str] = {}
    for name, _ in model.named_parameters():
        base_name = _base_name(name)
        found = owner_of_base.get(base_name)
        if found is None:  # not listed by the model (e.g. an extra module): head if it sits in the classifier
            found = HEAD if base_name.startswith("classifier.") else BACKBONE
        owner[name] = found
    return block_names, owner


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: biases, normalisation affine params and all 1-D tensors.

    1-D covers position embeddings' companions (CLS token, LayerScale gammas) the way timm does it.
    """
    base = _base_model(model)
    norm_modules = set()
    norm_names = set(getattr(base, "norm_parameter_names", list)())
    for module_name, module in base.named_modules():
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            norm_modules.add(module_name)
    names = set()
    for name, param in model.named_parameters():
        base_name = _base_name(name)
        module = base_name.rsplit(".", 1)[0]
        if (
            param.ndim <= 1
            or base_name.endswith(".bias")
            or base_name in norm_names
            or module in norm_modules
            or base_name.endswith(("cls_token", "position_embeddings", "pos_embed", "mask_token", "register_tokens"))
        ):
            names.add(name)
    return names


def build_param_groups(
    model: nn.Module,
    backbone_lr: float,
    head_lr: float | None = None,
    layer_decay: float = 1.0,
    weight_decay: float = 0.0,
    coarse: bool = False,
) -> list[dict[str, Any]]:
    """Build optimizer param groups with layer-wise LR decay and a separate head learning rate.

    With `n` backbone blocks (stem first, final norm last), block `i` gets `backbone_lr * layer_decay**(n-1-i)`;
    the head gets `head_lr`. Biases, norm parameters and 1-D parameters get no weight decay. Only parameters with
    `requires_grad` are included (a backbone frozen for the whole run is left out).

    Args:
        model: The classifier (plain, peft-wrapped or DDP-wrapped).
        backbone_lr: Learning rate of the last backbone block (e.g. 1e-5).
        head_lr: Learning rate of the head (e.g. 3e-5 or 3e-4); defaults to `backbone_lr`.
        layer_decay: Multiplier per block towards the input (1.0: same LR for all blocks, 0.75: timm/BEiT style).
        weight_decay: Decoupled weight decay of the decayed parameters.
        coarse: Group by stage for hierarchical CNNs (ConvNeXt, ResNet).

    Returns:
        A list of dicts accepted by any torch optimizer, head group first. Extra keys: `name` (block name or
        `"head"`), `role` (`"head"`/`"backbone"`), `block_index` (0 = stem; the head is `n_blocks`),
        `n_blocks` and `param_names`.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if backbone_lr < 0 or (head_lr is not None and head_lr < 0):
        raise ValueError(f"learning rates must be >= 0, got backbone_lr={backbone_lr}, head_lr={head_lr}")
    head_lr = backbone_lr if head_lr is None else head_lr
    block_names, owner = parameter_blocks(model, coarse=coarse)
    n = len(block_names)
    index = {name: i for i, name in enumerate(block_names)}
    no_decay = no_decay_parameter_names(model)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        block = owner[name]
        decay = name not in no_decay and weight_decay > 0
        key = (block, decay)
        if key not in groups:
            if block == HEAD:
                lr, role, block_index = head_lr, HEAD, n
            else:
                block_index = index.get(block, n - 1)
                lr, role = backbone_lr * layer_decay ** (n - 1 - block_index), BACKBONE
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr": lr,
                "weight_decay": weight_decay if decay else 0.0,
                "name": block,
                "role": role,
                "block_index": block_index,
                "n_blocks": n,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    ordered = sorted(groups.values(), key=lambda g: (g["role"] != HEAD, -g["block_index"], g["weight_decay"] == 0))
    if not ordered:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    return ordered


def create_optimizer(
    param_groups: list[dict[str, Any]],
    name: str = "adamw",
    *,
    betas: tuple[float, float] | None = None,
    eps: float = 1e-8,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """Create AdamW (torch), Lion (`timm.optim.Lion`) or SGD with Nesterov momentum over `param_groups`.

    Args:
        param_groups: From `build_param_groups` (each group carries its own lr and weight decay).
        name: `"adamw"`, `"lion"` or `"sgd"`.
        betas: Adam/Lion betas (defaults: (0.9, 0.999) for AdamW, (0.9, 0.99) for Lion).
        eps: AdamW epsilon.
        momentum: SGD momentum.

    Returns:
        The optimizer; its groups keep the extra keys of `param_groups` (`role`, `name`, ...).
    """
    lr = max(g["lr"] for g in param_groups)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas or (0.9, 0.999), eps=eps)
    if name == "lion":
        from timm.optim import Lion

        return Lion(param_groups, lr=lr, betas=betas or (0.9, 0.99))
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")


def describe_param_groups(param_groups: list[dict[str, Any]]) -> str:
    """One line per group (name, lr, weight decay, #params) for logs."""
    lines = []
    for g in param_groups:
        n_params = sum(p.numel() for p in g["params"])
        lines.append(f"{g.get('name', '?'):>40s}  lr={g['lr']:.3g}  wd={g['weight_decay']:.3g}  params={n_params}")
    return "\n".join(lines)
