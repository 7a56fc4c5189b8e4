"""HistoSegmentationConfig: a U-Net-family ROI segmentation model and how it reads masks and tiles images."""

# Ships with checkpoints (remote code): imports only transformers and the standard library.

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

ARCHITECTURES = ("unet", "unetplusplus", "fpn", "deeplabv3plus")  # segmentation_models_pytorch names, lower case
MASK_MODES = ("binary", "multiclass")


class HistoSegmentationConfig(PretrainedConfig):
    """Configuration of `HistoSegmentationModel`: a `segmentation_models_pytorch` network with a timm/torchvision encoder.

    Args:
        architecture: One of ``ARCHITECTURES`` (``"unet"``: U-Net decoder with skip connections).
        encoder_name: The encoder, as `segmentation_models_pytorch` names it (``"resnet18"``, ``"tu-resnet10t"``,
            ``"tu-convnext_tiny"``, ...).
        encoder_depth: Encoder stages used (3 to 5); ``decoder_channels`` has one entry per stage.
        decoder_channels: Channels of the decoder blocks, coarse to fine.
        mask_mode: ``"binary"`` (any non-zero mask value is region of interest: class 1) or ``"multiclass"``
            (mask values are class indices, 0 the background).
        ignore_index: The mask value of unannotated pixels (multi-class masks); never trained on or scored.
        window_size: Side of the sliding windows inference cuts (images up to this size run in one pass).
        window_overlap: Share of a window that overlaps its neighbour (their logits are blended).
        fill_holes: Binary masks: fill the holes a predicted region encloses (ROI masks are solid regions; a gland's
            lumen, for one, belongs to the gland).
        kwargs: `PretrainedConfig` arguments (``id2label``, ``label2id``, ...).
    """

    model_type = "histo-segmentation"

    def __init__(
        self,
        architecture: str = "unet",
        encoder_name: str = "resnet18",
        encoder_depth: int = 5,
        decoder_channels: list[int] | tuple[int, ...] = (128, 64, 32, 16, 8),
        mask_mode: str = "binary",
        ignore_index: int = 255,
        window_size: int = 512,
        window_overlap: float = 0.25,
        fill_holes: bool = True,
        **kwargs: Any,
    ):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if len(decoder_channels) != encoder_depth:
            raise ValueError(
                f"decoder_channels needs one entry per encoder stage ({encoder_depth}), got {list(decoder_channels)}"
            )
        if not 0 <= window_overlap < 1:
            raise ValueError(f"window_overlap must be in [0, 1), got {window_overlap}")
        if "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = {0: "background", 1: "roi"}
        self.architecture = architecture
        self.encoder_name = encoder_name
        self.encoder_depth = int(encoder_depth)
        self.decoder_channels = [int(c) for c in decoder_channels]
        self.mask_mode = mask_mode
        self.ignore_index = int(ignore_index)
        self.window_size = int(window_size)
        self.window_overlap = float(window_overlap)
        self.fill_holes = bool(fill_holes)
        super().__init__(**kwargs)
