"""HistoClassifierForImageClassification: an AutoModel backbone, a pooling step and a classification head."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .backbones import BACKBONES, get_backbone_spec
from .configuration_histo import HistoClassifierConfig
from .mil import GatedAttentionMIL

# Ships with checkpoints: imports only torch/transformers and sibling modules, relatively.

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_BACKBONE_PREFIX = "backbone."
_HEAD_PREFIX = "classifier."
_MIL_PREFIX = "mil."  # the attention-MIL head trains after the patch model (hf_histo.training.mil), never with it


def build_head(config: HistoClassifierConfig, in_features: int) -> nn.Sequential:
    """Build the classification head described by `config` on top of `in_features`-dim embeddings."""
    num_labels = config.num_labels
    if config.head == "linear":
        return nn.Sequential(nn.Dropout(config.dropout), nn.Linear(in_features, num_labels))
    if config.head == "mlp":
        hidden = config.head_hidden[0] if isinstance(config.head_hidden, list) else config.head_hidden
        if config.head_activation not in _ACTIVATIONS:
            raise ValueError(f"head_activation={config.head_activation!r}; choose one of {sorted(_ACTIVATIONS)}.")
        return nn.Sequential(
            nn.Linear(in_features, hidden),
            _ACTIVATIONS[config.head_activation](),
            nn.Dropout(config.dropout),
            nn.Linear(hidden, num_labels),
        )
    widths = config.head_hidden if isinstance(config.head_hidden, list) else [config.head_hidden] * config.head_layers
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.GELU(), nn.LayerNorm(width), nn.Dropout(config.dropout)]
        in_features = width
    layers.append(nn.Linear(in_features, num_labels))
    return nn.Sequential(*layers)


def _offline_error(name: str, error: Exception) -> OSError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return OSError(
        f"Could not load backbone {name!r}: it is not a local folder and not in the Hugging Face cache, and the Hub "
        "is unreachable (offline, HF_HUB_OFFLINE=1, or no network). Either download it on a machine with internet "
        f"(`huggingface-cli download {name} --local-dir DIR`, or `hf download {name} --local-dir DIR`), copy DIR "
        "here and pass the local folder DIR instead of the name, or set HF_HOME to a cache that already has it. "
        f"(original error: {type(error).__name__}: {reason})"
    )


class HistoClassifierForImageClassification(PreTrainedModel):
    """Patch classifier: `AutoModel` backbone -> pooled embedding -> head -> logits.

    With `config.mil_hidden` set it also holds `mil`, a gated-attention MIL head that turns the pooled embeddings of
    all patches of an image into image logits (`image_logits`, used by `aggregation="attention"`).

    Args:
        config: The model configuration; the backbone is built with `AutoModel.from_config(config.backbone_config)`.
        backbone: An already built (pretrained) backbone to use instead of a randomly initialised one.
    """

    config_class = HistoClassifierConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True
    # Trainer must not pass `num_items_in_batch` to forward: the loss here is a plain mean.
    accepts_loss_kwargs = False

    def __init__(self, config: HistoClassifierConfig, backbone: nn.Module | None = None):
        super().__init__(config)
        self.spec = get_backbone_spec(config.backbone_config)
        if backbone is None:
            backbone = AutoModel.from_config(config.backbone_config, **self._backbone_init_kwargs(config))
        self.backbone = backbone
        if config.pooling in ("cls", "cls_mean") and self._num_prefix_tokens() == 0:
            raise ValueError(
                f"pooling={config.pooling!r} needs a backbone with a CLS token; "
                f"{config.backbone_config.model_type!r} has none: use pooling='pooler' or 'mean'."
            )
        self.classifier = build_head(config, self._feature_dim())
        self.mil = self._build_mil(config)
        self.supports_gradient_checkpointing = bool(getattr(self.backbone, "supports_gradient_checkpointing", False))
        self.post_init()
        self.apply_freeze(config.freeze, config.trainable_blocks)

    # ---- construction helpers -------------------------------------------------------------------------------
    @staticmethod
    def _backbone_init_kwargs(config: HistoClassifierConfig) -> dict:
        kwargs = dict(get_backbone_spec(config.backbone_config).init_kwargs)
        if "add_pooling_layer" in kwargs and config.pooling == "pooler":
            kwargs["add_pooling_layer"] = True
        return kwargs

    def _num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (CLS + registers); 0 for feature-map backbones."""
        timm_model = getattr(self.backbone, "timm_model", None)
        if timm_model is not None:
            return int(getattr(timm_model, "num_prefix_tokens", 0) or 0)
        if not self.spec.tokens:
            return 0
        return 1 + int(getattr(self.config.backbone_config, "num_register_tokens", 0) or 0)

    def _feature_dim(self) -> int:
        timm_model = getattr(self.backbone, "timm_model", None)
        bconf = self.config.backbone_config
        if timm_model is not None:
            dim = getattr(timm_model, "head_hidden_size", None) if self.config.pooling == "pooler" else None
            dim = dim or timm_model.num_features
        elif getattr(bconf, "hidden_sizes", None):
            dim = bconf.hidden_sizes[-1]
        else:
            dim = bconf.hidden_size
        return 2 * dim if self.config.pooling == "cls_mean" else dim

    def _build_mil(self, config: HistoClassifierConfig) -> GatedAttentionMIL | None:
        if not config.mil_hidden:
            return None
        return GatedAttentionMIL(self._feature_dim(), config.mil_hidden, config.num_labels, config.mil_dropout)

    def reset_mil_head(self, hidden: int | None = None, dropout: float | None = None) -> None:
        """Give the model a new, untrained attention-MIL head (e.g. before its patch model is trained further).

        Args:
            hidden: Width of the head (default: `config.mil_hidden`, else 128).
            dropout: Dropout after its projection (default: `config.mil_dropout`).
        """
        self.config.mil_hidden = int(hidden or self.config.mil_hidden or 128)
        if dropout is not None:
            self.config.mil_dropout = float(dropout)
        mil = self._build_mil(self.config)
        mil.apply(self._init_weights)
        self.mil = mil.to(device=self.device, dtype=self.dtype).requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---- loading --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load a saved classifier (see `PreTrainedModel.from_pretrained`) and re-apply its freezing policy."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.apply_freeze()  # weight loading replaces parameters, which drops requires_grad=False
        return loaded

    @classmethod
    def from_backbone(
        cls,
        name_or_path: str | os.PathLike,
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **config_kwargs,
    ) -> HistoClassifierForImageClassification:
        """Build a classifier on a pretrained backbone (`AutoModel.from_pretrained`) with a fresh head.

        Args:
            name_or_path: Table name (`"phikon"`), Hub id (`"owkin/phikon"`, `"timm/efficientnet_b0.ra_in1k"`) or
                a local folder with `config.json` and weights (4.x or 5.x key names both load).
            num_labels: Number of classes; taken from `id2label` when omitted.
            id2label: Class index -> class name.
            cache_dir: Hugging Face cache to read from / download to.
            revision: Hub revision.
            token: Hub token for gated or private backbones.
            **config_kwargs: `HistoClassifierConfig` fields: head, head_hidden, head_layers, dropout, pooling,
                freeze, trainable_blocks, patching, aggregation, ...

        Returns:
            The model, with the freezing policy applied.

        Raises:
            OSError: The backbone is neither a local folder nor cached and the Hub cannot be reached; the message
                says how to pass a local folder.
        """
        name = os.fspath(name_or_path)
        entry = BACKBONES.get(name)
        if entry is None and not os.path.isdir(name):
            entry = next((s for s in BACKBONES.values() if s.hub_id == name), None)
        if id2label is not None:
            id2label = {int(k): str(v) for k, v in id2label.items()}
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} classes.")
            config_kwargs["id2label"] = id2label
            config_kwargs["label2id"] = {v: k for k, v in id2label.items()}
        elif num_labels is not None:
            config_kwargs["num_labels"] = num_labels
        if entry is not None and config_kwargs.get("pooling") is None:
            config_kwargs["pooling"] = entry.pooling

        if entry is not None and entry.hub_id is None:  # trained from scratch (e.g. the seed's ResNet)
            backbone_config = AutoConfig.for_model(entry.model_type, **(entry.scratch_config or {}))
            config = HistoClassifierConfig(backbone_config=backbone_config, backbone_name=name, **config_kwargs)
            return cls(config)

        source = entry.hub_id if entry is not None else name
        hub_kwargs = {"cache_dir": cache_dir, "revision": revision, "token": token}
        hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
        try:
            backbone_config = AutoConfig.from_pretrained(source, **hub_kwargs)
        except (OSError, ValueError, ConnectionError, TimeoutError) as error:
            if os.path.isdir(source):
                raise OSError(f"Folder {source!r} does not hold a loadable backbone config.json: {error}") from error
            raise _offline_error(source, error) from error
        config = HistoClassifierConfig(backbone_config=backbone_config, backbone_name=source, **config_kwargs)
        init_kwargs = cls._backbone_init_kwargs(config)
        try:
            backbone = AutoModel.from_pretrained(source, config=backbone_config, **init_kwargs, **hub_kwargs)
        except (OSError, ConnectionError, TimeoutError) as error:
            if os.path.isdir(source):
                raise OSError(f"Folder {source!r} does not hold loadable backbone weights: {error}") from error
            raise _offline_error(source, error) from error
        return cls(config, backbone=backbone)

    # ---- forward --------------------------------------------------------------------------------------------
    def _backbone_outputs(self, pixel_values: torch.Tensor, **kwargs):
        if self.config.backbone_config.model_type == "vit" and "interpolate_pos_encoding" not in kwargs:
            size = self.config.backbone_config.image_size
            size = size if isinstance(size, (list, tuple)) else (size, size)
            if tuple(pixel_values.shape[-2:]) != tuple(size):
                kwargs["interpolate_pos_encoding"] = True
        if getattr(self.backbone, "timm_model", None) is not None and self.config.pooling != "pooler":
            kwargs.setdefault("do_pooling", False)
        return self.backbone(pixel_values=pixel_values, return_dict=True, **kwargs)

    def _pool(self, outputs) -> torch.Tensor:
        pooling = self.config.pooling
        if pooling == "pooler":
            pooled = outputs.pooler_output
            if pooled is None:
                raise ValueError(f"{type(self.backbone).__name__} returned no pooler_output; use pooling='mean'.")
            return pooled.flatten(1)
        hidden = outputs.last_hidden_state
        if hidden.dim() == 4:  # feature map [B, C, H, W]
            return hidden.mean(dim=(2, 3))
        n_prefix = self._num_prefix_tokens()
        patch_mean = hidden[:, n_prefix:].mean(dim=1)
        if pooling == "mean":
            return patch_mean
        if pooling == "cls":
            return hidden[:, 0]
        return torch.cat([hidden[:, 0], patch_mean], dim=-1)

    def embed(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """Return the pooled patch embeddings [B, D] the head consumes."""
        return self._pool(self._backbone_outputs(pixel_values, **kwargs))

    def classify_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """Return logits [B, C] for pooled embeddings (`forward == classify_embeddings(embed(x))`)."""
        return self.classifier(features)

    @property
    def has_mil_head(self) -> bool:
        """Whether the model has an attention-MIL head (`aggregation="attention"` can use it)."""
        return self.mil is not None

    def image_logits(
        self, embeddings: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image logits `[B, C]` and patch attention `[B, N]` of the MIL head over patch embeddings `[B, N, D]`.

        Args:
            embeddings: The `embed` outputs of each image's patches, padded to `N` per image.
            mask: `[B, N]` bool, True on real patches (default: all).

        Raises:
            ValueError: The model has no MIL head.
        """
        if self.mil is None:
            raise ValueError(
                "this model has no attention-MIL head (config.mil_hidden is None): train one with --aggregation "
                "attention, or use aggregation soft, hard or mask_weighted"
            )
        return self.mil(embeddings, mask)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """Classify patches.

        Args:
            pixel_values: Images [B, 3, H, W] from the backbone's image processor.
            labels: Class indices [B], or soft targets [B, C] (MixUp/CutMix) of the same shape as the logits.
            output_hidden_states: Return the backbone's hidden states.
            output_attentions: Return the backbone's attentions (needs eager attention).
            return_dict: Return a tuple when False.
            **kwargs: Passed to the backbone (e.g. `interpolate_pos_encoding`).

        Returns:
            `ImageClassifierOutput` with `loss` (cross-entropy, when labels are given) and `logits`.
        """
        if pixel_values is None:
            raise ValueError("HistoClassifierForImageClassification needs pixel_values.")
        if output_hidden_states:
            kwargs["output_hidden_states"] = True
        if output_attentions:
            kwargs["output_attentions"] = True
        outputs = self._backbone_outputs(pixel_values, **kwargs)
        logits = self.classify_embeddings(self._pool(outputs))
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if labels.is_floating_point() and labels.shape == logits.shape:
                loss = F.cross_entropy(logits.float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.view(-1).long())
        hidden_states = getattr(outputs, "hidden_states", None)
        attentions = getattr(outputs, "attentions", None)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            out = tuple(x for x in (logits, hidden_states, attentions) if x is not None)
            return (loss, *out) if loss is not None else out
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)

    # ---- parameter groups and freezing ----------------------------------------------------------------------
    def _relative(self, name: str) -> str | None:
        """Backbone-relative name of a parameter, or None for head parameters."""
        if name.startswith(_BACKBONE_PREFIX):
            return name[len(_BACKBONE_PREFIX) :]
        return None

    def backbone_blocks(self, coarse: bool = False) -> list[tuple[str, list[str]]]:
        """Backbone parameters grouped into blocks, ordered from input to output (head excluded).

        Args:
            coarse: Group hierarchical CNNs (ConvNeXt, ResNet, timm) by stage instead of by block.

        Returns:
            `[(block_name, [parameter names as in named_parameters()]), ...]`: "embeddings" (stem) first, then
            each block (e.g. "layers.0"), then "post_backbone" (final norm); empty groups are left out.
        """
        stem: list[str] = []
        blocks: dict[str, list[str]] = {}
        post: list[str] = []
        for name, _ in self.named_parameters():
            rel = self._relative(name)
            if rel is None:
                continue
            block = self.spec.block_id(rel, coarse=coarse)
            if block is not None:
                blocks.setdefault(block, []).append(name)
            elif blocks:
                post.append(name)
            else:
                stem.append(name)
        groups = [("embeddings", stem), *blocks.items(), ("post_backbone", post)]
        return [(block, names) for block, names in groups if names]

    def head_parameter_names(self) -> list[str]:
        """Names of the head's parameters."""
        return [name for name, _ in self.named_parameters() if name.startswith(_HEAD_PREFIX)]

    def _norm_modules(self):
        for module_name, module in self.backbone.named_modules():
            if isinstance(module, _TORCH_NORMS) or type(module).__name__ in self.spec.norm_layers:
                yield module_name, module

    def norm_parameter_names(self) -> list[str]:
        """Affine parameters of the backbone's normalisation layers (BatchNorm, GroupNorm, LayerNorm, ...)."""
        names = []
        for module_name, module in self._norm_modules():
            prefix = f"{_BACKBONE_PREFIX}{module_name}." if module_name else _BACKBONE_PREFIX
            names += [prefix + n for n, _ in module.named_parameters(recurse=False)]
        return names

    def apply_freeze(self, policy: str | None = None, trainable_blocks: int | None = None) -> None:
        """Set `requires_grad` for a freezing policy and record it in the config (the MIL head stays frozen).

        Args:
            policy: `"none"`, `"backbone"` (head only), `"backbone_except_norm"` (head + norm affine params) or
                `"last_n"` (head + last `trainable_blocks` blocks + final norm); defaults to `config.freeze`.
            trainable_blocks: Blocks kept trainable by `"last_n"`; defaults to `config.trainable_blocks`.
        """
        policy = self.config.freeze if policy is None else policy
        if policy != "last_n":
            trainable_blocks = None
        elif trainable_blocks is None:
            trainable_blocks = self.config.trainable_blocks
        if policy not in ("none", "backbone", "backbone_except_norm", "last_n"):
            raise ValueError(
                f"Unknown freeze policy {policy!r}; choose none, backbone, backbone_except_norm or last_n."
            )
        if policy == "last_n" and (not isinstance(trainable_blocks, int) or trainable_blocks < 0):
            raise ValueError(f"freeze='last_n' needs trainable_blocks >= 0, got {trainable_blocks!r}.")
        trainable = set(self.head_parameter_names())
        if policy == "none":
            trainable = {name for name, _ in self.named_parameters() if not name.startswith(_MIL_PREFIX)}
        elif policy == "backbone_except_norm":
            trainable |= set(self.norm_parameter_names())
        elif policy == "last_n" and trainable_blocks > 0:
            groups = self.backbone_blocks()
            inner = [names for block, names in groups if block not in ("embeddings", "post_backbone")]
            for names in inner[-trainable_blocks:]:
                trainable |= set(names)
            trainable |= {n for block, names in groups if block == "post_backbone" for n in names}
        for name, param in self.named_parameters():
            param.requires_grad_(name in trainable)
        self.config.freeze = policy
        self.config.trainable_blocks = trainable_blocks

    def train(self, mode: bool = True):
        """Set train mode; BatchNorm layers whose parameters are all frozen stay in eval mode (frozen statistics)."""
        super().train(mode)
        if mode:
            for _, module in self._norm_modules():
                params = list(module.parameters(recurse=False))
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and params:
                    if not any(p.requires_grad for p in params):
                        module.eval()
        return self
