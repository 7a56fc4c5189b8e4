"""HistoSegmentationModel: a segmentation_models_pytorch network as a transformers semantic-segmentation model."""

# Ships with checkpoints (remote code): torch, transformers, segmentation_models_pytorch and the config, relatively.
# Wrapping the smp network in a PreTrainedModel gives it save/load/push_to_hub, AutoModelForSemanticSegmentation
# and `pipeline("image-segmentation")`; the network itself is smp's (U-Net and relatives over timm encoders).

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput

from .configuration_segmentation import HistoSegmentationConfig


class HistoSegmentationModel(PreTrainedModel):
    """Semantic segmentation at full input resolution; inputs of any size are padded to the encoder's stride.

    Args:
        config: The model's `HistoSegmentationConfig`.
        encoder_weights: Pretrained encoder weights to start from (``"imagenet"``, as
            `segmentation_models_pytorch` names them; downloaded from the Hub), or None for random ones. Used only
            when the model is built, never by `from_pretrained` (the saved weights replace them).
    """

    config_class = HistoSegmentationConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = "net"

    def __init__(self, config: HistoSegmentationConfig, encoder_weights: str | None = None):
        super().__init__(config)
        import segmentation_models_pytorch as smp  # noqa: PLC0415 - a dependency of this model only

        self.net = smp.create_model(
            config.architecture,
            encoder_name=config.encoder_name,
            encoder_weights=encoder_weights,
            encoder_depth=config.encoder_depth,
            decoder_channels=list(config.decoder_channels),
            classes=config.num_labels,
        )
        self.stride = 2**config.encoder_depth
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # smp initialises its encoder and decoder itself; transformers must not re-initialise them.
        return

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, return_dict: bool | None = None, **kwargs
    ) -> SemanticSegmenterOutput:
        """Per-pixel class logits at the input's resolution.

        Args:
            pixel_values: ``(batch, 3, height, width)`` normalised images of any size.
            labels: Optional ``(batch, height, width)`` class indices (``config.ignore_index`` where unannotated);
                the loss is then the plain cross-entropy (training uses hf-histo's weighted CE + Dice instead).

        Returns:
            `SemanticSegmenterOutput` with ``logits`` of shape ``(batch, num_labels, height, width)``.
        """
        height, width = pixel_values.shape[-2:]
        pad_h, pad_w = -height % self.stride, -width % self.stride
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h), mode="replicate")
        logits = self.net(pixel_values)[..., :height, :width]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=self.config.ignore_index)
        return SemanticSegmenterOutput(loss=loss, logits=logits)
