"""HistoClassifierConfig: a backbone config plus head, pooling, freezing, patching and aggregation settings."""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .aggregation import AGGREGATIONS, TTA_MODES
from .backbones import POOLINGS, get_backbone_spec

# Ships with checkpoints: imports only stdlib/transformers and sibling modules, relatively.

HEADS = ("linear", "mlp", "deep")
FREEZE_POLICIES = ("none", "backbone", "backbone_except_norm", "last_n")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"HistoClassifierConfig: {name}={value!r} is not supported; choose one of {list(allowed)}.")


class HistoClassifierConfig(PretrainedConfig):
    """Configuration of `HistoClassifierForImageClassification`.

    Args:
        backbone_config: Config (or its dict) of the backbone, built with `AutoModel.from_config`. Defaults to
            ViT-B/16 (the Phikon architecture).
        head: `"linear"`, `"mlp"` (Linear -> activation -> Dropout -> Linear) or `"deep"`
            (`head_layers` x [Linear, GELU, LayerNorm, Dropout] -> Linear).
        head_hidden: Hidden width of the mlp/deep head; a list gives one width per deep layer.
        head_layers: Number of hidden layers of the deep head.
        head_activation: Activation of the mlp head (`"gelu"`, `"relu"`, `"silu"`, `"tanh"`).
        dropout: Dropout before the last Linear of every head.
        pooling: `"cls"`, `"mean"`, `"cls_mean"` or `"pooler"`; `None` takes the backbone table's default.
        freeze: `"none"`, `"backbone"`, `"backbone_except_norm"` (norm affine params stay trainable) or
            `"last_n"` (last `trainable_blocks` blocks + final norm + head trainable).
        trainable_blocks: Number of trainable blocks for `freeze="last_n"`.
        backbone_name: Hub id or table name the backbone weights came from.
        patching: Patching parameters used at training time (`PatchingConfig.to_dict()`), read by the pipeline.
        aggregation: How patch predictions become one image prediction: `"soft"`, `"hard"`, `"mask_weighted"` or
            `"attention"` (the gated-attention MIL head over the patch embeddings, see `mil_hidden`).
        tta: Test-time augmentation averaged per patch: `"none"`, `"flips"` or `"d4"`. Training records the one
            its reported figures used; every inference entry point uses it by default.
        calibration_temperature: Temperature scaling of the image probabilities (`softmax(log(p) / T)`, argmax
            unchanged), fitted by training on the validation (or out-of-fold) images; every inference entry point
            applies it unless told not to (`calibrate=False`). None: no scaling. (Not `temperature`: transformers
            refuses to save a model config with that generation parameter.)
        initializer_range: Std of the normal init of the head's Linear layers.
        mil_hidden: Width of the gated-attention MIL head (`models/mil.py`); None: no MIL head, except with
            `aggregation="attention"`, which gets one of width 128.
        mil_dropout: Dropout after the MIL head's projection.
        roi_model: A region-of-interest segmentation model (a folder path or Hub repo id, e.g. one trained with
            `recipes/roi_segmentation.py`): every inference entry point patches an image given without a mask on
            the region it predicts, instead of detected tissue (a given mask always wins). None: tissue detection.
        **kwargs: `num_labels`, `id2label`, `label2id` and the other `PretrainedConfig` arguments.
    """

    model_type = "histo_classifier"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict | None = None,
        head: str = "linear",
        head_hidden: int | list[int] = 512,
        head_layers: int = 4,
        head_activation: str = "gelu",
        dropout: float = 0.0,
        pooling: str | None = None,
        freeze: str = "none",
        trainable_blocks: int | None = None,
        backbone_name: str | None = None,
        patching: dict | None = None,
        aggregation: str = "soft",
        tta: str = "none",
        calibration_temperature: float | None = None,
        initializer_range: float = 0.02,
        mil_hidden: int | None = None,
        mil_dropout: float = 0.25,
        roi_model: str | os.PathLike | None = None,
        **kwargs,
    ):
        if backbone_config is None:
            backbone_config = CONFIG_MAPPING["vit"]()
        elif isinstance(backbone_config, dict):
            backbone_config = dict(backbone_config)
            model_type = backbone_config.pop("model_type", None)
            if model_type not in CONFIG_MAPPING:
                raise ValueError(
                    f"HistoClassifierConfig: backbone_config has model_type={model_type!r}, which this transformers "
                    "version does not know; upgrade transformers or pass a config object."
                )
            backbone_config = CONFIG_MAPPING[model_type].from_dict(backbone_config)
        elif not isinstance(backbone_config, PretrainedConfig):
            raise TypeError(f"backbone_config must be a PretrainedConfig or a dict, got {type(backbone_config)}.")
        if hasattr(patching, "to_dict"):
            patching = patching.to_dict()

        _choice("head", head, HEADS)
        _choice("freeze", freeze, FREEZE_POLICIES)
        _choice("aggregation", aggregation, AGGREGATIONS)
        _choice("tta", tta, TTA_MODES)
        temperature = calibration_temperature
        if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"HistoClassifierConfig: calibration_temperature must be > 0, got {temperature!r}.")
        spec = get_backbone_spec(backbone_config)
        if pooling is None:
            pooling = spec.pooling
        _choice("pooling", pooling, POOLINGS)
        if pooling in ("cls", "cls_mean") and not spec.tokens and spec.model_type != "timm_wrapper":
            raise ValueError(
                f"HistoClassifierConfig: pooling={pooling!r} needs a token backbone with a CLS token (ViT, DINOv2); "
                f"{backbone_config.model_type!r} returns feature maps: use pooling='pooler' or 'mean'."
            )
        if freeze == "last_n":
            if not isinstance(trainable_blocks, int) or trainable_blocks < 0:
                raise ValueError(
                    f"HistoClassifierConfig: freeze='last_n' needs trainable_blocks >= 0, got {trainable_blocks!r}."
                )
        elif trainable_blocks is not None:
            raise ValueError(
                f"HistoClassifierConfig: trainable_blocks={trainable_blocks} is only used with freeze='last_n' "
                f"(freeze={freeze!r})."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"HistoClassifierConfig: dropout must be in [0, 1), got {dropout}.")
        if mil_hidden is None and aggregation == "attention":
            mil_hidden = 128
        if mil_hidden is not None and (not isinstance(mil_hidden, int) or mil_hidden < 1):
            raise ValueError(f"HistoClassifierConfig: mil_hidden must be an int >= 1 or None, got {mil_hidden!r}.")
        if not 0.0 <= mil_dropout < 1.0:
            raise ValueError(f"HistoClassifierConfig: mil_dropout must be in [0, 1), got {mil_dropout}.")
        roi_model = os.fspath(roi_model) if isinstance(roi_model, os.PathLike) else roi_model
        if roi_model is not None and (not isinstance(roi_model, str) or not roi_model):
            raise ValueError(
                f"HistoClassifierConfig: roi_model must be a folder path or Hub repo id, got {roi_model!r}."
            )
        if not isinstance(head_layers, int) or head_layers < 1:
            raise ValueError(f"HistoClassifierConfig: head_layers must be an int >= 1, got {head_layers!r}.")
        widths = head_hidden if isinstance(head_hidden, (list, tuple)) else [head_hidden]
        if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ValueError(
                f"HistoClassifierConfig: head_hidden must be a positive int or list, got {head_hidden!r}."
            )
        if head == "deep" and isinstance(head_hidden, (list, tuple)) and len(head_hidden) != head_layers:
            raise ValueError(
                f"HistoClassifierConfig: head_hidden has {len(head_hidden)} widths but head_layers={head_layers}."
            )

        self.backbone_config = backbone_config
        self.head = head
        self.head_hidden = list(head_hidden) if isinstance(head_hidden, (list, tuple)) else head_hidden
        self.head_layers = head_layers
        self.head_activation = head_activation
        self.dropout = dropout
        self.pooling = pooling
        self.freeze = freeze
        self.trainable_blocks = trainable_blocks
        self.backbone_name = backbone_name
        self.patching = patching
        self.aggregation = aggregation
        self.tta = tta
        self.calibration_temperature = None if temperature is None else float(temperature)
        self.initializer_range = initializer_range
        self.mil_hidden = mil_hidden
        self.mil_dropout = mil_dropout
        self.roi_model = roi_model
        super().__init__(**kwargs)
        if self.id2label is not None and not self.label2id:  # transformers 5 no longer derives it
            self.label2id = {label: index for index, label in self.id2label.items()}
