"""HistoImageClassificationPipeline: image (+ mask) -> the training patches -> batched patch logits -> one label."""

# Ships with checkpoints (flattened next to modeling_histo.py by hf_histo.hub.bundle_code): it imports only stdlib,
# numpy, PIL, torch, transformers and its siblings, relatively, so `trust_remote_code=True` works without hf_histo.

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, Pipeline
from transformers import pipeline as hf_pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from ..data.masks import resolve_mask
from ..data.patching import PatchBox, PatchingConfig, crop_patch
from ..models.aggregation import AGGREGATIONS, aggregate

TASK = "histo-image-classification"
DEFAULT_PATCH_BATCH_SIZE = 32
DEFAULT_TOP_K = 5

# Values of the result's "fallback" key (absent when the image was patched normally).
FALLBACK_BEST_TILE = "best_tile"  # no patch passed the strategy's filters: the best single tile (as in training)
FALLBACK_WHOLE_IMAGE = "whole_image"  # not even one tile: the whole image, resized, is the only patch
MASK_FALLBACKS = ("empty_mask_tissue", "empty_mask_whole", "whole")  # resolve_mask sources other than a real mask

_RELATIVE_IMPORT = re.compile(r"^(\s*)from\s+\.+(?:\w+\.)*(\w+)(\s+import\b)", flags=re.MULTILINE)


# ---- images ---------------------------------------------------------------------------------------------------------
def _array_to_pil(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"an image array must be (H, W), (H, W, 3|4) or (3|4, H, W); got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        top = 1.0 if arr.max(initial=0.0) <= 1.0 else (255.0 if arr.max() <= 255 else 65535.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL image; transparency is composited over white (the colour of an empty slide)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_pil(np.asarray(image)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(image: str | os.PathLike | Image.Image | np.ndarray, timeout: float | None = None) -> Image.Image:
    """Load an image given as a path, URL, PIL image or array (HWC or CHW) as 8-bit RGB.

    Raises:
        ValueError: The file is missing or unreadable (the message names it), or the array has an odd shape.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return to_rgb(_array_to_pil(image))
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        from transformers.image_utils import load_image

        return to_rgb(load_image(image, timeout=timeout))
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{path}: image file not found.")
        try:
            with Image.open(path) as im:
                im.load()
                return to_rgb(im.copy())
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"{path}: not a readable image ({error}); re-export or remove it.") from error
    raise TypeError(f"unsupported image input of type {type(image).__name__}; pass a path, PIL image or array")


# ---- test-time augmentation ------------------------------------------------------------------------------------------
def dihedral_views(pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/90-degree rotations of a [B, C, H, W] batch (only the 4 flips when H != W)."""
    views = [pixel_values, pixel_values.flip(-1), pixel_values.flip(-2), pixel_values.flip(-1, -2)]
    if pixel_values.shape[-1] == pixel_values.shape[-2]:
        rot = pixel_values.rot90(1, dims=(-2, -1))
        views += [rot, rot.flip(-1), rot.flip(-2), rot.flip(-1, -2)]
    return views


# ---- the pipeline ----------------------------------------------------------------------------------------------------
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

    Call arguments:
        inputs: An image (path, URL, PIL image, HWC/CHW array), a dict `{"image": ..., "mask": ...}`, or a list of
            those (a list gives a list of results).
        mask: The region-of-interest mask of the image (path, PIL or array; same size as the image), or a list of
            masks (one per image, `None` for none) when `inputs` is a list. No mask -> tissue detection.
        batch_size: Patches per forward pass (default: the pipeline's `batch_size`, else 32).
        aggregation: `"soft"` (mean probability), `"hard"` (majority vote) or `"mask_weighted"` (mean weighted by
            the foreground fraction of each patch).
        tta: Average the softmax over the 8 flips/90-degree rotations of each patch.
        top_k: Number of labels returned (default 5, at most the number of classes).
        return_patches: Return a dict with per-patch details instead of the plain list (see below).
        resize_mask: Resize a mask of another size to the image (nearest neighbour) instead of raising.

    Returns:
        Like `image-classification`: a list of `{"label", "score"}` sorted by score. When the image could not be
        patched normally, every entry also has `"fallback"`: `"best_tile"` (no patch passed the strategy's filters:
        the single tile with the most mask pixels was used, as in training), `"empty_mask_tissue"` (the mask was
        empty: tissue detection was used), `"empty_mask_whole"` / `"whole"` (empty mask, or no tissue found:
        patches cover the whole image) or `"whole_image"` (no tile at all: the whole image, resized).
        With `return_patches=True`: a dict `{"predictions": that list, "patches": [{"box": [x, y, w, h],
        "foreground": fraction, "probs": {label: p}}], "mask_source": "mask" | "tissue" | ...,
        "aggregation": method, "fallback": str | None}`.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            raise ValueError(
                f"{type(self).__name__} needs the model's image processor: save it next to the model "
                "(preprocessor_config.json) or pass image_processor=..."
            )
        patching = getattr(self.model.config, "patching", None)
        if patching is None:
            raise ValueError(
                "The model config has no `patching` entry: this pipeline needs a checkpoint trained with hf-histo "
                "(HistoClassifierConfig.patching), which records how training patches were cut."
            )
        self.patching_config = PatchingConfig.from_dict(patching)
        self.model.eval()

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
            if mask is not None:
                if not isinstance(mask, (list, tuple)) or len(mask) != len(inputs):
                    raise ValueError("with a list of images, mask= must be a list with one mask (or None) per image")
                inputs = [_as_item(image, m) for image, m in zip(inputs, mask)]
            else:
                inputs = [_as_item(image, None) for image in inputs]
        else:
            inputs = _as_item(inputs, mask)
        return super().__call__(inputs, batch_size=1, **kwargs)

    def _sanitize_parameters(
        self,
        aggregation: str | None = None,
        tta: bool | None = None,
        top_k: int | None = None,
        return_patches: bool | None = None,
        patch_batch_size: int | None = None,
        resize_mask: bool | None = None,
        timeout: float | None = None,
    ) -> tuple[dict, dict, dict]:
        preprocess_params: dict[str, Any] = {}
        forward_params: dict[str, Any] = {}
        postprocess_params: dict[str, Any] = {}
        if resize_mask is not None:
            preprocess_params["resize_mask"] = resize_mask
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if patch_batch_size is not None:
            if int(patch_batch_size) < 1:
                raise ValueError(f"batch_size must be >= 1, got {patch_batch_size}")
            forward_params["patch_batch_size"] = int(patch_batch_size)
        if tta is not None:
            forward_params["tta"] = bool(tta)
        if aggregation is not None:
            if aggregation not in AGGREGATIONS:
                raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {list(AGGREGATIONS)}")
            postprocess_params["aggregation"] = aggregation
        if top_k is not None:
            postprocess_params["top_k"] = int(top_k)
        if return_patches is not None:
            postprocess_params["return_patches"] = bool(return_patches)
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, item: dict, resize_mask: bool = False, timeout: float | None = None) -> dict:
        """Load the image, resolve its mask and select the patch boxes (cropping happens batch by batch later)."""
        source = item["image"]
        image = load_rgb(source, timeout=timeout)
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
        mask, mask_source = resolve_mask(
            image, item.get("mask"), self.patching_config.empty_fallback, resize=resize_mask, image_path=name
        )
        boxes, fell_back = self.patching_config.boxes_with_fallback(mask)  # what the training builder does
        fallback = FALLBACK_BEST_TILE if fell_back else (mask_source if mask_source in MASK_FALLBACKS else None)
        if not boxes:  # only an all-empty mask gets here, and resolve_mask never returns one; kept as a safety net
            boxes = [PatchBox(0, 0, image.width, image.height, int(np.count_nonzero(mask)))]
            fallback = FALLBACK_WHOLE_IMAGE
        return {
            "image": image,
            "mask": mask,
            # An array, not PatchBox tuples: Pipeline's device helper rebuilds tuples as plain tuples.
            "boxes": np.asarray([tuple(b) for b in boxes], dtype=np.int64).reshape(-1, 5),
            "mask_source": mask_source,
            "fallback": fallback,
        }

    def pixel_values(self, crops: list[Image.Image]) -> torch.Tensor:
        """Image-processor tensor of a list of patch crops, on the model's device and dtype."""
        pixels = self.image_processor(images=crops, return_tensors="pt")["pixel_values"]
        return pixels.to(device=self.device, dtype=self.model.dtype)

    def patch_probabilities(self, pixel_values: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Softmax [B, C] of a batch of processed patches, averaged over the dihedral views with `tta`."""
        views = dihedral_views(pixel_values) if tta else [pixel_values]
        logits = self.model(pixel_values=torch.cat(views)).logits.float()
        probs = logits.softmax(dim=-1)
        return probs.view(len(views), pixel_values.shape[0], -1).mean(dim=0)

    def _forward(self, model_inputs: dict, patch_batch_size: int | None = None, tta: bool = False) -> dict:
        batch = patch_batch_size or self._batch_size or DEFAULT_PATCH_BATCH_SIZE
        image, mask, boxes = model_inputs.pop("image"), model_inputs.pop("mask"), model_inputs["boxes"]
        paint = self.patching_config.paint_background
        chunks = []
        for start in range(0, len(boxes), batch):
            crops = [crop_patch(image, PatchBox(*map(int, b)), mask, paint) for b in boxes[start : start + batch]]
            chunks.append(self.patch_probabilities(self.pixel_values(crops), tta=tta).cpu().numpy())
        model_inputs["probs"] = np.concatenate(chunks, axis=0).astype(np.float64)
        return model_inputs

    def postprocess(
        self,
        model_outputs: dict,
        aggregation: str | None = None,
        top_k: int = DEFAULT_TOP_K,
        return_patches: bool = False,
    ) -> list[dict] | dict:
        """Aggregate the patch probabilities into the sorted image-level `[{"label", "score"}]`."""
        config = self.model.config
        method = aggregation or getattr(config, "aggregation", None) or "soft"
        probs, boxes = model_outputs["probs"], model_outputs["boxes"]
        areas = np.maximum(boxes[:, 2] * boxes[:, 3], 1)
        foreground = boxes[:, 4] / areas  # fraction, as the training dataset's `foreground` column
        image_probs = aggregate(probs, method, weights=foreground if method == "mask_weighted" else None)
        labels = [config.id2label[i] for i in range(len(image_probs))]
        fallback = model_outputs["fallback"]
        scores = [{"label": label, "score": float(p)} for label, p in zip(labels, image_probs)]
        scores.sort(key=lambda s: s["score"], reverse=True)
        scores = scores[: max(1, min(top_k, len(scores)))]
        if not return_patches:
            if fallback is not None:
                for entry in scores:
                    entry["fallback"] = fallback
            return scores
        patches = [
            {
                "box": [int(v) for v in box[:4]],
                "foreground": float(frac),
                "probs": {label: float(p) for label, p in zip(labels, row)},
            }
            for box, frac, row in zip(boxes, foreground, probs)
        ]
        return {
            "predictions": scores,
            "patches": patches,
            "mask_source": model_outputs["mask_source"],
            "aggregation": method,
            "fallback": fallback,
        }

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save model, image processor and the flattened code, so the folder loads with `trust_remote_code=True`."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        set_remote_code_config(self.model.config, self.model)
        self.model.save_pretrained(save_directory, **kwargs)
        self.image_processor.save_pretrained(save_directory)
        write_code_bundle(save_directory, [type(self), type(self.model), type(self.model.config)])


def _as_item(image: Any, mask: Any) -> dict:
    if isinstance(image, dict):
        if "image" not in image:
            raise ValueError('a dict input needs an "image" key (and optionally "mask")')
        return {"image": image["image"], "mask": image.get("mask", mask)}
    return {"image": image, "mask": mask}


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


def load_pipeline(
    model: str | os.PathLike,
    *,
    device: int | str | torch.device | None = None,
    batch_size: int = DEFAULT_PATCH_BATCH_SIZE,
    trust_remote_code: bool | None = None,
    **kwargs: Any,
) -> HistoImageClassificationPipeline:
    """Build the pipeline of a saved checkpoint with this module's class (no `trust_remote_code` needed in-process).

    `pipeline("histo-image-classification", model=DIR)` asks for `trust_remote_code=True` because the checkpoint
    declares its pipeline in `custom_pipelines`; this helper uses the installed class instead.

    Args:
        model: Checkpoint folder or Hub id.
        device: Torch device (or index) to run on; the model's device by default.
        batch_size: Patches per forward pass.
        trust_remote_code: Passed to `transformers.pipeline` (model and config classes).
        **kwargs: More `transformers.pipeline` arguments (`dtype`, `revision`, ...).
    """
    register_pipeline_task()
    return hf_pipeline(
        TASK,
        model=os.fspath(model),
        pipeline_class=HistoImageClassificationPipeline,
        device=device,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )


# ---- the code that ships with a checkpoint --------------------------------------------------------------------------
def remote_code_fields(config_class: type, model_class: type | None = None) -> dict[str, dict]:
    """The `auto_map` entries and `custom_pipelines` a checkpoint's config.json needs for remote code."""

    def ref(cls: type) -> str:
        return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"

    auto_map = {"AutoConfig": ref(config_class)}
    if model_class is not None:
        auto_map["AutoModelForImageClassification"] = ref(model_class)
    custom_pipelines = {
        TASK: {
            "impl": ref(HistoImageClassificationPipeline),
            "pt": ["AutoModelForImageClassification"],
            "tf": [],
            "type": "image",
        }
    }
    return {"auto_map": auto_map, "custom_pipelines": custom_pipelines}


def set_remote_code_config(config: Any, model: Any | None = None) -> None:
    """Write `auto_map` and `custom_pipelines` into a config so the checkpoint loads with remote code."""
    fields = remote_code_fields(type(config), type(model) if model is not None else None)
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **fields["auto_map"]}
    config.custom_pipelines = fields["custom_pipelines"]


def _relative_modules(module: ModuleType) -> list[ModuleType]:
    """Modules a module imports relatively (`from .x import`, `from ..data.x import`)."""
    source = Path(module.__file__).read_text(encoding="utf-8")
    package = module.__package__ or module.__name__.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if not node.module:
                raise ValueError(f"{module.__file__}: `from . import x` cannot be flattened; use `from .x import y`.")
            name = importlib.util.resolve_name("." * node.level + node.module, package)
            found.append(sys.modules.get(name) or importlib.import_module(name))
    return found


def flatten_imports(source: str) -> str:
    """Rewrite `from ..pkg.mod import x` / `from .mod import x` into the flat `from .mod import x`."""
    return _RELATIVE_IMPORT.sub(r"\1from .\2\3", source)


def write_code_bundle(folder: str | os.PathLike, classes: list[type]) -> list[Path]:
    """Copy the modules defining `classes`, and everything they import relatively, flat into `folder`.

    Relative imports are rewritten to the flat form, so `transformers.dynamic_module_utils` finds every file next
    to the others. Works from the hf_histo package and from an already flat (remote-code) copy alike.

    Returns:
        The files written, sorted.

    Raises:
        ValueError: Two different modules would get the same file name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [sys.modules[cls.__module__] for cls in classes]
    seen: dict[str, ModuleType] = {}
    while todo:
        module = todo.pop()
        file_name = Path(module.__file__).name
        if file_name in seen:
            # Remote-code copies of one file may live in several hash folders: same content is the same module.
            if Path(seen[file_name].__file__).read_bytes() != Path(module.__file__).read_bytes():
                raise ValueError(
                    f"two shipped modules are both named {file_name}: {seen[file_name].__file__} and "
                    f"{module.__file__}; rename one (the checkpoint folder is flat)."
                )
            continue
        seen[file_name] = module
        todo.extend(_relative_modules(module))
    written = []
    for file_name, module in sorted(seen.items()):
        target = folder / file_name
        target.write_text(flatten_imports(Path(module.__file__).read_text(encoding="utf-8")), encoding="utf-8")
        written.append(target)
    return written
