"""HistoImageClassificationPipeline: a thin `transformers.Pipeline` over the inference engine (image -> one label)."""

# Ships with checkpoints (flattened next to modeling_histo.py by hf_histo.hub.bundle): it imports only stdlib,
# numpy, PIL, torch, transformers and its siblings, relatively, so `trust_remote_code=True` works without hf_histo.

from __future__ import annotations

import copy
import os
from typing import Any

from transformers import AutoModelForImageClassification, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .engine import (
    DEFAULT_BATCH_SIZE,
    ITEM_ERRORS,
    ImagePrediction,
    InferenceEngine,
    check_aggregation,
    check_tta,
    item_error,
)
from .roi import RoiSegmenter, load_roi

TASK = "histo-image-classification"
DEFAULT_TOP_K = 5


class HistoImageClassificationPipeline(Pipeline):
    """Classify whole histology images with a patch classifier, exactly as it was trained.

    Each image is cut into patches with the patching parameters stored in `model.config.patching` (mask given, or
    tissue detection as in training), the patches run through the model in batches of `batch_size`, and their
    probabilities are aggregated into one image prediction (`model.config.aggregation` unless `aggregation=` says
    otherwise).

    Loading: `pipeline("histo-image-classification", model=DIR_OR_HUB_ID, trust_remote_code=True)` works anywhere
    (the code ships with the checkpoint, see `hf_histo.hub.bundle_code`). With hf_histo installed,
    `load_pipeline(DIR)` uses this class without remote code; a plain `pipeline(task, model=DIR)` without
    `trust_remote_code` is refused by transformers because the checkpoint declares `custom_pipelines`. The task
    name is registered by `register_pipeline_task()`, so `pipeline("histo-image-classification", model=model,
    image_processor=processor)` also works on in-memory objects.

    Region of interest: `pipeline(..., roi_model=SEG)` (a segmentation folder, Hub repo id or `RoiSegmenter`)
    patches an image given without a mask on the region that model predicts instead of detected tissue; without
    `roi_model=`, the model config's `roi_model` is used when set; `roi_model=False` turns it off (tissue detection).
    It is a call argument too (for that call only). A given mask always wins.

    Call arguments:
        inputs: An image (path, URL, PIL image, HWC/CHW array), a dict `{"image": ..., "mask": ...}`, or a list of
            those (a list gives a list of results; an image that cannot be read or patched gets `{"error": message}`
            in its place, the message naming the file or `image <position>`, and the others are still classified).
        mask: The region-of-interest mask of the image (path, PIL or array; same size as the image; any non-zero
            value is the region), or a list of masks (one per image, `None` for none) when `inputs` is a list. No
            mask -> tissue detection.
        batch_size: Patches per forward pass (default: the pipeline's `batch_size`, else 32).
        aggregation: `"soft"` (mean probability), `"hard"` (majority vote), `"mask_weighted"` (mean weighted by
            the foreground fraction of each patch) or `"attention"` (the model's attention-MIL head over the patch
            embeddings; models trained with it); default: the one the model's reported figures used.
        tta: `"none"`, `"flips"` (identity + horizontal + vertical) or `"d4"` (the 8 flips and quarter turns),
            averaged per patch; default: the one the model's reported figures used (`config.tta`).
        calibrate: Scale the image probabilities by the model's fitted temperature (`config.calibration_temperature`), as its
            reported figures are (default True; False: the raw aggregated probabilities; same labels either way).
        top_k: Number of labels returned (default 5, at most the number of classes).
        return_patches: Return a dict with per-patch details instead of the plain list (see below).
        resize_mask: Resize a mask of another size to the image (nearest neighbour) instead of raising.
        roi_model: The ROI model of this call (see above; False: tissue detection; True: the pipeline's).

    Returns:
        Like `image-classification`: a list of `{"label", "score"}` sorted by score. When the image could not be
        patched normally, every entry also has `"fallback"`: `"best_tile"` (no patch passed the strategy's filters:
        the single tile with the most mask pixels was used, as in training), `"empty_mask_tissue"` (the mask was
        empty: tissue detection was used), `"empty_roi_tissue"` (the ROI model found no region: tissue detection)
        or `"empty_mask_whole"` / `"whole"` (empty mask, or no tissue found: patches cover the whole image).
        With `return_patches=True`: a dict `{"predictions": that list, "patches": [{"box": [x, y, w, h],
        "foreground": fraction, "probs": {label: p}, "attention": weight (attention aggregation only, summing to 1
        over the image's patches)}], "mask_source": "mask" | "roi_model" | "tissue" | ...,
        "aggregation": method, "tta": mode, "fallback": str | None, "temperature": T | None}`.
        In a list result, `{"error": message}` stands for an image that could not be read or patched.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, roi_model: str | os.PathLike | RoiSegmenter | bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            raise ValueError(
                f"{type(self).__name__} needs the model's image processor: save it next to the model "
                "(preprocessor_config.json) or pass image_processor=..."
            )
        self._roi_models: dict[str, RoiSegmenter] = {}  # the ROI models of calls, loaded once each
        self.engine = InferenceEngine(
            self.model,
            self.image_processor,
            batch_size=self._batch_size or DEFAULT_BATCH_SIZE,
            roi=load_roi(roi_model, self.model.config, self.device),
        )

    def __call__(self, inputs: Any = None, mask: Any = None, **kwargs: Any) -> list | dict:
        """Classify one image or a list of images; see the class docstring for arguments and results."""
        if "images" in kwargs:
            inputs = kwargs.pop("images")
        if inputs is None:
            raise ValueError(f"Cannot call the {TASK} pipeline without an image.")
        # `batch_size` means patches per forward here; images always go one by one through Pipeline's loader.
        batch_size = kwargs.pop("batch_size", None)
        if batch_size is not None:
            kwargs["patch_batch_size"] = batch_size
        if isinstance(inputs, (list, tuple)):
            if mask is None:
                mask = [None] * len(inputs)
            elif not isinstance(mask, (list, tuple)) or len(mask) != len(inputs):
                raise ValueError("with a list of images, mask= must be a list with one mask (or None) per image")
            inputs = [_as_item(image, m, position) for position, (image, m) in enumerate(zip(inputs, mask))]
        else:
            inputs = _as_item(inputs, mask)
        return super().__call__(inputs, batch_size=1, **kwargs)

    def _sanitize_parameters(
        self,
        aggregation: str | None = None,
        tta: str | None = None,
        top_k: int | None = None,
        return_patches: bool | None = None,
        patch_batch_size: int | None = None,
        resize_mask: bool | None = None,
        timeout: float | None = None,
        calibrate: bool | None = None,
        roi_model: str | os.PathLike | RoiSegmenter | bool | None = None,
    ) -> tuple[dict, dict, dict]:
        preprocess_params: dict[str, Any] = {}
        forward_params: dict[str, Any] = {}
        postprocess_params: dict[str, Any] = {}
        if resize_mask is not None:
            preprocess_params["resize_mask"] = resize_mask
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if roi_model is not None and roi_model is not True:  # True: the pipeline's own
            preprocess_params["roi"] = self._call_roi(roi_model)
        if patch_batch_size is not None:
            if int(patch_batch_size) < 1:
                raise ValueError(f"batch_size must be >= 1, got {patch_batch_size}")
            forward_params["patch_batch_size"] = int(patch_batch_size)
        if tta is not None:
            forward_params["tta"] = check_tta(tta)
        if aggregation is not None:
            postprocess_params["aggregation"] = check_aggregation(aggregation)
        if top_k is not None:
            postprocess_params["top_k"] = int(top_k)
        if return_patches is not None:
            postprocess_params["return_patches"] = bool(return_patches)
        if calibrate is not None:
            postprocess_params["calibrate"] = bool(calibrate)
        return preprocess_params, forward_params, postprocess_params

    def _call_roi(self, roi_model: str | os.PathLike | RoiSegmenter | bool) -> RoiSegmenter | bool | None:
        """A call's ROI model: loaded (once per path), or False for none."""
        if roi_model is False:
            return False
        if not isinstance(roi_model, (str, os.PathLike)):  # a loaded segmenter
            return roi_model
        key = os.fspath(roi_model)
        if key not in self._roi_models:
            self._roi_models[key] = load_roi(key, self.model.config, self.device)
        return self._roi_models[key]

    def preprocess(
        self,
        item: dict,
        resize_mask: bool = False,
        timeout: float | None = None,
        roi: RoiSegmenter | bool | None = None,
    ) -> dict:
        """Decode the image (the builder's decode), resolve its mask, select the patch boxes and cut the patches.

        An item of a list that cannot be read or patched becomes ``{"error": DataError}`` (a single image raises).
        ``roi``: the call's ROI model (False: none); None: the pipeline's.
        """
        engine = self.engine
        if roi is not None:
            engine = copy.copy(self.engine)
            engine.roi = roi or None
        source = item["image"]
        position = item.get("position")
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
        if name is None and position is not None:
            name = f"image {position}"
        try:
            patched = engine.load(source, item.get("mask"), resize_mask, name, timeout)
        except ITEM_ERRORS as e:
            if position is None:
                raise
            return {"error": item_error(e, name)}
        return {"patched": patched}

    def _forward(self, model_inputs: dict, patch_batch_size: int | None = None, tta: str | None = None) -> dict:
        if "error" in model_inputs:
            return model_inputs
        tta = tta or self.engine.tta
        probs = self.engine.patch_probs(model_inputs["patched"], tta, patch_batch_size)
        return {"patched": model_inputs["patched"], "probs": probs, "tta": tta}

    def postprocess(
        self,
        model_outputs: dict,
        aggregation: str | None = None,
        top_k: int = DEFAULT_TOP_K,
        return_patches: bool = False,
        calibrate: bool | None = None,
    ) -> list[dict] | dict:
        """Aggregate the patch probabilities into the sorted image-level `[{"label", "score"}]`."""
        if "error" in model_outputs:
            return {"error": str(model_outputs["error"])}
        prediction = self.engine.prediction(
            model_outputs["patched"],
            model_outputs["probs"],
            aggregation=aggregation,
            tta=model_outputs["tta"],
            calibrate=calibrate,
        )
        return format_prediction(prediction, top_k, return_patches)


def format_prediction(prediction: ImagePrediction, top_k: int = DEFAULT_TOP_K, return_patches: bool = False):
    """The pipeline's output of an `ImagePrediction`: the sorted `[{"label", "score"}]`, or the dict with patches."""
    scores = prediction.scores(max(1, min(top_k, len(prediction.labels))))
    if not return_patches:
        if prediction.fallback is not None:
            for entry in scores:
                entry["fallback"] = prediction.fallback
        return scores
    patches = [
        {
            "box": [int(v) for v in box[:4]],
            "foreground": float(fraction),
            "probs": {label: float(p) for label, p in zip(prediction.labels, row)},
        }
        for box, fraction, row in zip(prediction.boxes, prediction.foreground, prediction.patch_probs)
    ]
    if prediction.attention is not None:
        for entry, weight in zip(patches, prediction.attention):
            entry["attention"] = float(weight)
    return {
        "predictions": scores,
        "patches": patches,
        "mask_source": prediction.mask_source,
        "aggregation": prediction.aggregation,
        "tta": prediction.tta,
        "fallback": prediction.fallback,
        "temperature": prediction.temperature,
    }


def _as_item(image: Any, mask: Any, position: int | None = None) -> dict:
    """The pipeline's item of one input; ``position`` (in a list input) makes a bad image an error entry."""
    if isinstance(image, dict):
        if "image" not in image:
            raise ValueError('a dict input needs an "image" key (and optionally "mask")')
        image, mask = image["image"], image.get("mask", mask)
    return {"image": image, "mask": mask, "position": position}


# ---- registration and loading ---------------------------------------------------------------------------------------
def _same_class(a: type, b: type) -> bool:
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_pipeline_task() -> None:
    """Register the `histo-image-classification` task with transformers' `pipeline()` (idempotent).

    Raises:
        ValueError: Another pipeline class already claims the task name.
    """
    existing = PIPELINE_REGISTRY.supported_tasks.get(TASK)
    if existing is not None:
        if _same_class(existing["impl"], HistoImageClassificationPipeline):
            return
        impl = existing["impl"]
        raise ValueError(
            f"Pipeline task {TASK!r} is already registered to {impl.__module__}.{impl.__qualname__}; "
            f"refusing to replace it with {HistoImageClassificationPipeline.__module__}."
            f"{HistoImageClassificationPipeline.__qualname__}."
        )
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=HistoImageClassificationPipeline, pt_model=AutoModelForImageClassification, type="image"
    )
