"""Score a trained model (or a fold ensemble) on any labelled folder at image and patch level."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.transforms import build_transforms, input_spec, tta_views
from ..utils import atomic_write_text
from .metrics import PatchPredictionAccumulator, plot_confusion_matrix

logger = logging.getLogger(__name__)


def load_model(model_dir: str | Path | Sequence[str | Path], device: str | torch.device | None = None):
    """Load a classifier (or a `FoldEnsemble` from a CV folder / list of folders) and its image processor.

    Returns:
        `(model, processor_or_spec)` with the model in eval mode on `device`.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import hf_histo.models  # noqa: F401  (registers the Auto classes)

    from .cross_validation import FoldEnsemble

    paths = [Path(p) for p in ([model_dir] if isinstance(model_dir, (str, os.PathLike)) else model_dir)]
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {path} does not exist")
    if len(paths) == 1 and (paths[0] / "config.json").is_file():
        model = AutoModelForImageClassification.from_pretrained(str(paths[0]))
        first = paths[0]
    else:
        model = FoldEnsemble.from_pretrained(paths[0] if len(paths) == 1 else paths)
        first = paths[0] if (paths[0] / "config.json").is_file() else sorted(paths[0].glob("fold_*"))[0]
    try:
        processor: Any = AutoImageProcessor.from_pretrained(str(first))
    except (OSError, ValueError):
        size = getattr(model.config.backbone_config, "image_size", 224)
        processor = int(size if isinstance(size, int) else 224)
        logger.warning("%s has no preprocessor_config.json: using %d px and ImageNet statistics", first, processor)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), processor


def _patch_stream(samples, patching, transform) -> Iterator[tuple[str, int, float, torch.Tensor]]:
    """Yield `(image_id, label, foreground, pixel tensor)` for every patch of every sample, image by image."""
    from ..data.masks import resolve_mask
    from ..data.patching import extract_patches
    from ..data.sources import load_image

    for sample, label in samples:
        image = load_image(sample.image_path)
        mask, _ = resolve_mask(
            image, sample.mask_path, empty_fallback=patching.empty_fallback, image_path=sample.image_path
        )
        for box, patch in extract_patches(image, mask, patching):
            area = max(box.w * box.h, 1)
            yield sample.image_id, label, float(box.foreground) / area, transform(patch.convert("RGB"))


@torch.no_grad()
def evaluate_model(
    model_dir: str | Path | Sequence[str | Path],
    data_dir: str | Path,
    out_path: str | Path | None,
    *,
    layout: str | None = None,
    batch_size: int = 64,
    aggregation: str | None = None,
    tta: str = "none",
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Score a model on every labelled image of a folder, at patch and image level.

    Patches are cut exactly as at training time (`config.patching`), streamed batch by batch through the model
    and folded into per-image running sums, so memory stays flat on large folders. This is what
    `hf-histo evaluate --model DIR --data DATA --out metrics.json` runs.

    Args:
        model_dir: A trained hf-histo model folder, a cross-validation root (its `fold_*` models are
            ensembled), or a list of model folders.
        data_dir: A labelled folder in any layout (or a clean manifest CSV).
        out_path: Where to write the JSON (atomically; also a confusion-matrix PNG next to it); None: do not write.
        layout: Force the folder layout.
        batch_size: Patches per forward pass.
        aggregation: `"soft"`, `"hard"` or `"mask_weighted"` (default: the model's `config.aggregation`).
        tta: `"none"`, `"flips"` or `"d4"` test-time augmentation.
        device: Device (default: CUDA when available).

    Returns:
        `{"image": {...}, "patch": {...}, "aggregation", "labels", "n_images", "n_patches", "model", "data"}`;
        `image`/`patch` carry `macro_f1`, `balanced_accuracy`, `accuracy`, `auroc`, `kappa`, `per_class_f1`,
        `confusion_matrix`, `n`.

    Raises:
        DataError: The folder has no labelled image, or labels the model does not know.
    """
    from ..data.patching import PatchingConfig
    from ..data.sources import DataError, read_samples

    start = time.perf_counter()
    model, processor = load_model(model_dir, device)
    config = model.config
    labels = [str(config.id2label[i]) for i in sorted(int(k) for k in config.id2label)]
    aggregation = aggregation or getattr(config, "aggregation", None) or "soft"
    patching = PatchingConfig.from_dict(getattr(config, "patching", None))
    sample_set = read_samples(data_dir, layout=layout)
    labelled = [s for s in sample_set.samples if s.label is not None]
    if not labelled:
        raise DataError(f"{data_dir}: no labelled images to evaluate (found {len(sample_set.samples)} unlabelled)")
    unknown = sorted({s.label for s in labelled} - set(labels))
    if unknown:
        raise DataError(
            f"{data_dir}: labels {unknown} are unknown to the model (it predicts {labels}); evaluate on data with "
            "the model's classes"
        )
    index = {name: i for i, name in enumerate(labels)}
    transform = build_transforms(input_spec(processor), train=False)
    device = next(model.parameters()).device
    accumulator = PatchPredictionAccumulator(len(labels))

    def flush(batch: list[tuple[str, int, float, torch.Tensor]]) -> None:
        pixels = torch.stack([b[3] for b in batch]).to(device)
        probs = None
        views = tta_views(pixels, tta)
        for view in views:
            p = torch.softmax(model(pixel_values=view).logits.float(), dim=-1)
            probs = p if probs is None else probs + p
        accumulator.add(
            [b[0] for b in batch], (probs / len(views)).cpu().numpy(), [b[1] for b in batch], [b[2] for b in batch]
        )

    batch: list[tuple[str, int, float, torch.Tensor]] = []
    for item in _patch_stream([(s, index[s.label]) for s in labelled], patching, transform):
        batch.append(item)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    metrics = accumulator.compute(labels, aggregation)
    result = {
        "image": metrics["image"],
        "patch": metrics["patch"],
        "aggregation": aggregation,
        "labels": labels,
        "n_images": len(accumulator.image_ids),
        "n_patches": len(accumulator),
        "images_without_patches": sorted({s.image_id for s in labelled} - set(accumulator.image_ids)),
        "tta": tta,
        "model": [str(p) for p in model_dir] if isinstance(model_dir, (list, tuple)) else str(model_dir),
        "data": str(data_dir),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if out_path is not None:
        out_path = Path(out_path)
        atomic_write_text(out_path, json.dumps(result, indent=2) + "\n")
        plot_confusion_matrix(
            result["image"]["confusion_matrix"],
            labels,
            out_path.with_name(out_path.stem + "_confusion_matrix.png"),
            title=f"image level ({aggregation}), macro-F1 {result['image']['macro_f1']:.3f}",
        )
    return result
