"""The one path from pixels to an image label: decode -> patch boxes -> batched TTA forward -> aggregation."""

# Ships with checkpoints (the pipeline runs on it): stdlib, numpy, PIL, torch, transformers and siblings, relatively.
# The pipeline, `hf-histo predict|evaluate|explain` and the end-of-training evaluation all run this code, so the
# figure a run reports is the figure the shipped pipeline reproduces.

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.images import DataError, load_rgb
from ..data.patching import PatchBox, PatchingConfig, crop_array, crop_patch
from ..data.stain import normalize_stain
from ..models.aggregation import AGGREGATIONS as AGGREGATIONS  # re-exported, as TTA_MODES: the app lists them
from ..models.aggregation import TTA_MODES as TTA_MODES  # re-exported: the app lists the engine's names
from ..models.aggregation import aggregate, apply_temperature
from .feed import PixelTransform, read_ahead, stack_patches
from .forward import (
    attention_vote,
    check_aggregation,
    check_attention,
    check_num_workers,
    check_tta,
    has_mil_head,
    patch_probabilities_and_embeddings,
)
from .forward import patch_probabilities as patch_probabilities  # re-exported, with the views training embeds
from .forward import tta_views as tta_views
from .prediction import ImagePrediction as ImagePrediction  # re-exported: the records of the engine's stages
from .prediction import PatchedImage as PatchedImage
from .prediction import item_error as item_error
from .roi import RoiSegmenter, resolve_roi_mask

DEFAULT_BATCH_SIZE = 32
DEFAULT_NUM_WORKERS = 2  # read-ahead threads of the folder-level entry points (predict, evaluate)

# Values of `ImagePrediction.fallback` (None when the image was patched normally).
FALLBACK_BEST_TILE = "best_tile"  # no patch passed the strategy's filters: the best single tile (as in training)
# resolve_roi_mask sources other than a real mask or the ROI model's region ("roi_model").
MASK_FALLBACKS = ("empty_mask_tissue", "empty_mask_whole", "empty_roi_tissue", "whole")
# What a bad input raises while it is decoded and patched (DataError is a ValueError); anything else is a bug or the
# model's, and stops the run.
ITEM_ERRORS = (ValueError, TypeError)
# load_rgb and load_mask change PIL's global pixel limit and the warnings filters while they decode, which is not
# thread-safe: read-ahead threads take turns to decode an image and its mask; the rest of `load` runs in parallel.
_DECODE_LOCK = threading.Lock()


class InferenceEngine:
    """Classify whole images with a patch classifier exactly as it was trained and evaluated.

    Stages, each callable (and timeable) on its own: ``decode`` (the one RGB conversion, shared with the dataset
    builder) -> ``patch`` (mask or tissue detection, then the model's ``PatchingConfig``: boxes, stain) -> ``cut``
    (the patches as one uint8 tensor at the processor's size) -> ``to_model`` (the processor's normalisation, on the
    model's device) -> ``forward`` (batched, TTA views averaged) -> ``aggregate`` (the image vote). ``load`` is
    decode, patch and cut: what the read-ahead threads of ``predict_many`` do while the model runs.

    The saved image processor's resize and normalisation run as tensor ops on all patches of an image at once
    (`PixelTransform`: the numbers of transformers' torchvision `ViTImageProcessor` and of training's evaluation
    transform). A processor that this does not reproduce (centre crop, another resampling or processor class) is
    called on the PIL crops instead.

    Args:
        model: A classifier whose ``config`` has ``id2label`` and, for the defaults, ``patching``,
            ``aggregation`` and ``tta`` (as hf-histo checkpoints do).
        image_processor: The image processor saved with the model (resize + normalise).
        patching: Patching override (default: ``model.config.patching``).
        aggregation: ``"soft"``, ``"hard"``, ``"mask_weighted"`` or ``"attention"`` (the model's MIL head over
            the patch embeddings) (default: ``model.config.aggregation``).
        tta: ``"none"``, ``"flips"`` or ``"d4"`` (default: ``model.config.tta``, the TTA of the reported figures).
        batch_size: Patches per forward pass (patches of consecutive images share batches).
        max_image_pixels: Raise PIL's decompression-bomb limit for trusted large images.
        num_workers: Threads of ``predict_many`` that decode, patch and cut the next images while the model runs
            (0: one image at a time in the calling thread, nothing read ahead).
        calibrate: Scale image probabilities by ``config.calibration_temperature``, as the reported figures; False: raw ones.
        roi: A region-of-interest segmenter: an image without a mask is patched on its predicted region instead of
            detected tissue (tissue detection when it predicts none). A given mask always wins.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: Any,
        *,
        patching: PatchingConfig | dict | None = None,
        aggregation: str | None = None,
        tta: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_image_pixels: int | None = None,
        num_workers: int = 0,
        calibrate: bool = True,
        roi: RoiSegmenter | None = None,
    ):
        config = model.config
        if patching is None:
            patching = getattr(config, "patching", None)
            if patching is None:
                raise ValueError(
                    "The model config has no `patching` entry: hf-histo needs a checkpoint trained with hf-histo "
                    "(HistoClassifierConfig.patching), which records how training patches were cut."
                )
        self.model = model.eval()
        self.image_processor = image_processor
        self.patching = patching if isinstance(patching, PatchingConfig) else PatchingConfig.from_dict(patching)
        self.aggregation = check_aggregation(aggregation or getattr(config, "aggregation", None) or "soft")
        check_attention(model, self.aggregation)
        self.embeds = has_mil_head(model)  # the forward stage also returns the patch embeddings (for "attention")
        self.tta = check_tta(tta or getattr(config, "tta", None) or "none")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.max_image_pixels = max_image_pixels
        self.num_workers = check_num_workers(num_workers)
        self.transform = PixelTransform.of(image_processor)
        self.labels = [str(config.id2label[i]) for i in range(len(config.id2label))]
        self.calibrate, self.temperature = bool(calibrate), getattr(config, "calibration_temperature", None)
        self.roi = roi

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    # ---- stages ----------------------------------------------------------------------------------------------------
    def decode(self, image: Any, timeout: float | None = None, name: str | None = None) -> Image.Image:
        """8-bit RGB of a path, URL, PIL image or array (``hf_histo.data.images.load_rgb``; ``name`` in errors)."""
        return load_rgb(image, self.max_image_pixels, timeout, name)

    def patch(self, image: Image.Image, mask: Any = None, resize_mask: bool = False, name: str | None = None):
        """Resolve the mask (the ROI model's region, or tissue detection, without one), select the patch boxes and
        normalise the image's stain (``patching.stain_norm``, as the training patches were).

        Returns:
            A `PatchedImage` (its image: the stain-normalised one, which the patches are cut from).
        """
        return self._select(image, *self._resolve_mask(image, mask, resize_mask, name), name)

    def _resolve_mask(
        self, image: Image.Image, mask: Any, resize_mask: bool, name: str | None
    ) -> tuple[np.ndarray, str]:
        return resolve_roi_mask(
            self.roi,
            image,
            mask,
            self.patching.empty_fallback,
            resize=resize_mask,
            image_path=name,
            max_pixels=self.max_image_pixels,
        )

    def _select(self, image: Image.Image, mask_array: np.ndarray, mask_source: str, name: str | None) -> PatchedImage:
        boxes, fell_back = self.patching.boxes_with_fallback(mask_array)
        fallback = FALLBACK_BEST_TILE if fell_back else (mask_source if mask_source in MASK_FALLBACKS else None)
        array = np.asarray([tuple(b) for b in boxes], dtype=np.int64).reshape(-1, 5)
        if not len(array):
            raise ValueError(f"{name or 'image'}: no patch could be cut (an empty image?)")
        # as the dataset builder (`cut_sample`): the mask comes from the original image, the patches from this one
        image = normalize_stain(image, self.patching.stain_norm, name)
        return PatchedImage(image, mask_array, array, mask_source, fallback)

    def crops(self, patched: PatchedImage, rows: Iterable[int] | None = None) -> list[Image.Image]:
        """The patch crops of an image (all, or the given box rows) as PIL images, padded white past the edges."""
        paint = self.patching.paint_background
        rows = range(len(patched.boxes)) if rows is None else rows
        return [crop_patch(patched.image, PatchBox(*map(int, patched.boxes[i])), patched.mask, paint) for i in rows]

    def cut(self, patched: PatchedImage, rows: Sequence[int] | None = None) -> torch.Tensor:
        """The patches of an image (all, or the given box rows) at the processor's size, on the CPU.

        uint8 ``[N, 3, H, W]``: slices of the decoded image (the crops of ``crops``), resized together, one tensor op
        per patch size. Without a `PixelTransform`, the image processor's (normalised) output of ``crops``.
        """
        if self.transform is None:
            return self.image_processor(images=self.crops(patched, rows), return_tensors="pt")["pixel_values"]
        array, paint = np.asarray(patched.image), self.patching.paint_background
        rows = range(len(patched.boxes)) if rows is None else rows
        return stack_patches(
            self.transform,
            [crop_array(array, PatchBox(*map(int, patched.boxes[i])), patched.mask, paint) for i in rows],
        )

    def to_model(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model's input of ``cut`` patches: moved to its device (as uint8), normalised there, in its dtype."""
        pixels = pixels.to(self.device)
        if pixels.dtype == torch.uint8:
            pixels = self.transform.normalize(pixels)
        return pixels.to(dtype=self.model.dtype)

    def preprocess(self, crops: list[Image.Image]) -> torch.Tensor:
        """The model's input of PIL patch crops, on its device and dtype (``to_model`` of their ``cut``)."""
        if self.transform is None:
            return self.to_model(self.image_processor(images=crops, return_tensors="pt")["pixel_values"])
        return self.to_model(stack_patches(self.transform, [np.asarray(crop.convert("RGB")) for crop in crops]))

    def forward(self, pixel_values: torch.Tensor, tta: str | None = None) -> np.ndarray:
        """Patch probabilities ``[B, C]`` (float64) of a processed batch, averaged over the TTA views."""
        return patch_probabilities(self.model, pixel_values, tta or self.tta).cpu().numpy().astype(np.float64)

    def forward_patches(
        self, pixel_values: torch.Tensor, tta: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """`forward`'s probabilities and, for a model with a MIL head, the patch embeddings ``[B, D]`` (TTA mean)."""
        if not self.embeds:
            return self.forward(pixel_values, tta), None
        probs, embeddings = patch_probabilities_and_embeddings(self.model, pixel_values, tta or self.tta)
        return probs.cpu().numpy().astype(np.float64), embeddings.cpu().numpy()

    def load(
        self,
        image: Any,
        mask: Any = None,
        resize_mask: bool = False,
        name: str | None = None,
        timeout: float | None = None,
    ) -> PatchedImage:
        """``decode``, ``patch`` and ``cut`` one image: a `PatchedImage` with its ``patches`` (thread-safe)."""
        with _DECODE_LOCK:  # decoding the image and the mask; the boxes and the stain normalisation run in parallel
            image = self.decode(image, timeout, name)
            resolved = self._resolve_mask(image, mask, resize_mask, name)
        patched = self._select(image, *resolved, name)
        patched.patches = self.cut(patched)
        return patched

    def aggregate(self, patch_probs: np.ndarray, boxes: np.ndarray, aggregation: str | None = None) -> np.ndarray:
        """Image probabilities ``[C]`` from the patch probabilities (mask-weighted votes use the boxes' coverage)."""
        method = check_aggregation(aggregation or self.aggregation)
        weights = boxes[:, 4] / np.maximum(boxes[:, 2] * boxes[:, 3], 1) if method == "mask_weighted" else None
        return aggregate(patch_probs, method, weights=weights)

    def patch_probs(self, patched: PatchedImage, tta: str | None = None, batch_size: int | None = None) -> np.ndarray:
        """Probabilities ``[N, C]`` of every patch of an image, in batches (a MIL head's embeddings: in ``patched``)."""
        batch = batch_size or self.batch_size
        patches = patched.patches if patched.patches is not None else self.cut(patched)
        outputs = [
            self.forward_patches(self.to_model(patches[i : i + batch]), tta) for i in range(0, len(patches), batch)
        ]
        if self.embeds:
            patched.embeddings = np.concatenate([embeddings for _, embeddings in outputs])
        return np.concatenate([probs for probs, _ in outputs])

    def prediction(
        self,
        patched: PatchedImage,
        patch_probs: np.ndarray,
        image_id: str | None = None,
        aggregation: str | None = None,
        tta: str | None = None,
        calibrate: bool | None = None,
    ) -> ImagePrediction:
        """The `ImagePrediction` of a patched image from its patch probabilities (attention: ``patched.embeddings``)."""
        aggregation = check_attention(self.model, aggregation or self.aggregation)
        vote = attention_vote(self.model, patched.embeddings) if aggregation == "attention" else None
        prediction = ImagePrediction(
            labels=self.labels,
            probs=self.aggregate(patch_probs, patched.boxes, aggregation) if vote is None else vote[0],
            patch_probs=patch_probs,
            boxes=patched.boxes,
            mask_source=patched.mask_source,
            fallback=patched.fallback,
            aggregation=aggregation,
            tta=tta or self.tta,
            image_id=image_id,
            attention=None if vote is None else vote[1],
        )
        return self.calibrated(prediction, calibrate)

    def calibrated(self, prediction: ImagePrediction, calibrate: bool | None = None) -> ImagePrediction:
        """Scale a prediction's image probabilities by the temperature (when calibrating) and record it in it."""
        if (self.calibrate if calibrate is None else calibrate) and self.temperature is not None:
            prediction.probs = apply_temperature(prediction.probs, self.temperature)
            prediction.temperature = self.temperature
        return prediction

    # ---- whole images ----------------------------------------------------------------------------------------------
    def predict(
        self,
        image: Any,
        mask: Any = None,
        image_id: str | None = None,
        *,
        resize_mask: bool = False,
        aggregation: str | None = None,
        tta: str | None = None,
    ) -> ImagePrediction:
        """Predict one image (path, PIL image or array) with its optional mask."""
        return next(
            self.predict_many([(image, mask, image_id)], resize_mask=resize_mask, aggregation=aggregation, tta=tta)
        )

    def predict_many(
        self,
        items: Iterable[tuple[Any, Any, str | None]],
        *,
        resize_mask: bool = False,
        aggregation: str | None = None,
        tta: str | None = None,
        return_errors: bool = False,
    ) -> Iterator[ImagePrediction | DataError]:
        """Predict ``(image, mask, image_id)`` items in order; patches of consecutive images share forward batches.

        With ``num_workers`` threads, the next images are decoded, patched and cut (``load``) while the model runs,
        about a batch of patches ahead; the predictions are the same for any number of threads.

        Args:
            items: Images (path, URL, PIL image or array), their masks (or None) and ids (or None).
            resize_mask: Resize masks whose size differs from their image instead of failing.
            aggregation: Override of the engine's aggregation.
            tta: Override of the engine's TTA.
            return_errors: Yield a bad item's `DataError` (its message names the input) in its place and go on
                with the others, as ``asyncio.gather(return_exceptions=True)`` does; otherwise raise it.
        """
        tta = check_tta(tta or self.tta)
        aggregation = check_attention(self.model, check_aggregation(aggregation or self.aggregation))
        # Images in order: (image, id, patch and embedding (MIL head) rows filled by the forwards) or a bad item's error.
        pending: list[tuple[PatchedImage, str | None, list[np.ndarray], list[np.ndarray]] | DataError] = []
        queue: list[tuple[list[np.ndarray], list[np.ndarray], torch.Tensor]] = []  # patches waiting, with their rows
        queued = 0

        def flush() -> None:
            nonlocal queued
            if queue:
                probs, embeddings = self.forward_patches(self.to_model(torch.cat([p for *_, p in queue])), tta)
                for rows, embedding_rows, patches in queue:
                    rows.extend(probs[: len(patches)])
                    probs = probs[len(patches) :]
                    if embeddings is not None:
                        embedding_rows.extend(embeddings[: len(patches)])
                        embeddings = embeddings[len(patches) :]
                queue.clear()
                queued = 0

        def finished() -> Iterator[ImagePrediction | DataError]:
            while pending and (isinstance(pending[0], DataError) or len(pending[0][2]) == len(pending[0][0].boxes)):
                done = pending.pop(0)
                if isinstance(done, DataError):
                    yield done
                else:
                    patched, image_id, rows, embedding_rows = done
                    if embedding_rows:
                        patched.embeddings = np.stack(embedding_rows)
                    yield self.prediction(patched, np.stack(rows), image_id, aggregation, tta)

        def load(item: tuple[Any, Any, str | None]) -> tuple[PatchedImage | DataError, str | None]:
            image, mask, image_id = item
            name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else image_id
            try:
                return self.load(image, mask, resize_mask, name), image_id
            except ITEM_ERRORS as e:
                if not return_errors:
                    raise
                return item_error(e, name), image_id

        loaded = [0, 0]  # images and patches read so far

        def ahead() -> int:
            # Images in flight: one per thread, and a batch of patches' worth more (as many images as a batch took so
            # far), so the threads go on reading while the model runs on a batch.
            return self.num_workers + (math.ceil(self.batch_size * loaded[0] / loaded[1]) if loaded[1] else 0)

        for patched, image_id in read_ahead(load, items, self.num_workers, ahead):
            if isinstance(patched, DataError):
                pending.append(patched)
                yield from finished()
                continue
            loaded[0] += 1
            loaded[1] += len(patched.boxes)
            rows: list[np.ndarray] = []
            embedding_rows: list[np.ndarray] = []
            pending.append((patched, image_id, rows, embedding_rows))
            patches, patched.patches = patched.patches, None  # the forwards hold them from here
            while len(patches):
                take = min(self.batch_size - queued, len(patches))
                queue.append((rows, embedding_rows, patches[:take]))
                queued += take
                patches = patches[take:]
                if queued == self.batch_size:
                    flush()
                    yield from finished()
        flush()
        yield from finished()
