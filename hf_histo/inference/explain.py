"""Explanations: per-image patch probability maps, plus attention rollout (ViT) or Grad-CAM (CNN) on the top patch."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from ..utils import atomic_savefig
from .engine import InferenceEngine, item_error
from .loading import ModelSource, load_engine
from .roi import RoiSegmenter
from .saliency import patch_map, patch_saliency

DISPLAY_MAX_SIDE = 1024  # figures show the image at most this large (boxes are scaled with it)
PATCH_CMAP = "RdYlBu_r"


# ---- the figure ------------------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float):
    # No pyplot: no global state or backend switching; savefig renders with Agg.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def explain_image(
    engine: InferenceEngine,
    image: str | os.PathLike | Image.Image | np.ndarray,
    mask: str | os.PathLike | Image.Image | np.ndarray | None = None,
    *,
    out_path: str | os.PathLike,
    title: str | None = None,
    true_label: str | None = None,
    method: str = "auto",
    batch_size: int | None = None,
) -> Path:
    """Write one explanation PNG for an image.

    Panels: the image with the mask outline (given mask, or detected tissue); every patch coloured by the
    probability of the predicted class, or by its attention weight with ``aggregation="attention"`` (overlapping
    tiles averaged; the top patch outlined); that patch with its attention rollout (ViT) or Grad-CAM (CNN) overlay.

    Args:
        engine: The model's inference engine.
        image: Path, PIL image or array.
        mask: Its mask; None uses the engine's ROI model, else tissue detection, as the pipeline does.
        out_path: PNG to write (atomically).
        title: Figure title (default: the file name when `image` is a path).
        true_label: Shown next to the prediction when known.
        method: `"auto"`, `"rollout"` or `"gradcam"`.
        batch_size: Patches per forward pass.

    Returns:
        `out_path` as a `Path`.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    patched = engine.patch(engine.decode(image), mask, name=name)
    prediction = engine.prediction(patched, engine.patch_probs(patched, batch_size=batch_size))
    pil, mask_arr, boxes = patched.image, patched.mask, patched.boxes
    target = int(np.argmax(prediction.probs))
    target_probs = prediction.patch_probs[:, target]
    # The patch map: each patch's probability of the predicted class, or with attention MIL its attention weight
    # (what the image label was computed from); the top patch is the highest of those values.
    values = target_probs if prediction.attention is None else prediction.attention
    top = int(np.argmax(values))
    (crop,) = engine.crops(patched, [top])
    heat, method_used = patch_saliency(engine.model, engine.preprocess([crop]), target, method)
    predicted = prediction.scores(1)[0]

    scale = min(1.0, DISPLAY_MAX_SIDE / max(pil.size))
    shown = pil if scale == 1.0 else pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BILINEAR)
    shown_mask = mask_arr
    if scale != 1.0:
        shown_mask = np.asarray(Image.fromarray(mask_arr.astype(np.uint8) * 255).resize(shown.size, Image.NEAREST)) > 0

    figure = _new_figure(16, 5.6)
    ax_image, ax_patches, ax_top = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.15, 1]})
    ax_image.imshow(shown)
    if 0 < shown_mask.sum() < shown_mask.size:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax_image.contour(shown_mask.astype(np.float32), levels=[0.5], colors=["#00e000"], linewidths=1.2)
    ax_image.set_title(f"image + mask outline ({prediction.mask_source})", fontsize=10)

    cmap, norm = colormaps[PATCH_CMAP], Normalize(0.0, 1.0 if prediction.attention is None else float(values.max()))
    ax_patches.imshow(shown, alpha=0.45)
    ax_patches.imshow(patch_map(boxes, values, scale, shown.size), cmap=cmap, norm=norm, alpha=0.6)
    x, y, w, h, _ = boxes[top].tolist()
    ax_patches.add_patch(Rectangle((x * scale, y * scale), w * scale, h * scale, fill=False, edgecolor="black", lw=2))
    ax_patches.set_xlim(0, shown.width)
    ax_patches.set_ylim(shown.height, 0)
    figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax_patches, fraction=0.046, pad=0.03).set_label(
        f"P({predicted['label']}) per patch" if prediction.attention is None else "attention weight per patch"
    )
    ax_patches.set_title(
        f"{len(boxes)} patches, {prediction.aggregation} aggregation, TTA {prediction.tta}", fontsize=10
    )

    display = crop.resize((max(heat.shape[1], 224), max(heat.shape[0], 224)), Image.BILINEAR)
    ax_top.imshow(display)
    ax_top.imshow(heat, cmap="jet", alpha=0.45, extent=(0, display.width, display.height, 0), interpolation="bilinear")
    weight = "" if prediction.attention is None else f", attention {values[top]:.2f}"
    ax_top.set_title(f"top patch P={target_probs[top]:.2f}{weight}: {method_used}", fontsize=10)
    for ax in (ax_image, ax_patches, ax_top):
        ax.set_xticks([])
        ax.set_yticks([])

    if title is None and isinstance(image, (str, os.PathLike)):
        title = Path(image).name
    headline = f"predicted {predicted['label']} ({predicted['score']:.2f})"
    if true_label is not None:
        headline += f", true {true_label}"
    if prediction.fallback:
        headline += f"  [fallback: {prediction.fallback}]"
    figure.suptitle(f"{title}: {headline}" if title else headline, fontsize=12)
    figure.tight_layout()
    return atomic_savefig(out_path, figure)


def explain_folder(
    model_dir: ModelSource,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    layout: str | None = None,
    max_images: int | None = None,
    method: str = "auto",
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
    on_error: str = "raise",
    resize_masks: bool = False,
    max_image_pixels: int | None = None,
    masks: str | os.PathLike | None = None,
    calibrate: bool = True,
    roi_model: str | os.PathLike | RoiSegmenter | bool | None = None,
) -> list[Path]:
    """Write one explanation PNG per image of a data folder (`hf-histo explain`); the output folder is checked first.

    Args:
        model_dir: A checkpoint folder (or Hub id) saved by hf-histo.
        data_dir: A data folder in any layout `read_samples` knows (labelled or not; a plain folder of images too), or
            one image file; masks are used when present.
        out_dir: Folder for the PNGs (`<image_id>.png`).
        layout: Force the data layout; detected when None.
        max_images: Explain only the first N images (sorted by image id).
        method: `"auto"` (rollout for ViT-family backbones, Grad-CAM otherwise), `"rollout"` or `"gradcam"`.
        batch_size: Patches per forward pass.
        device: Torch device or index.
        progress: Show a progress bar.
        on_error: `"raise"` stops at the first bad image; `"skip"` goes on and logs the failures in one warning.
        resize_masks: Resize masks whose size differs from their image instead of failing.
        max_image_pixels: Raise PIL's decompression-bomb limit for trusted large images.
        masks: A folder of masks named like the images (`masks/<image name>`), or one mask file when `data_dir` is one
            image file; a given mask overrides the layout's own for its image (see `read_samples`).
        calibrate: Scale the image probabilities by the model's temperature (`config.calibration_temperature`, fitted on its
            validation images), as its reported figures are; False: the raw aggregated probabilities.
        roi_model: ROI segmentation model (folder or Hub id) whose predicted region patches the images without a
            mask; None: the model config's `roi_model` when set, else tissue detection; False: tissue detection.

    Returns:
        The PNG paths written, in sample order.

    Raises:
        DataError: A bad image (with `on_error="raise"`, naming it) or an output folder that cannot be used.
    """
    from tqdm.auto import tqdm

    from ..data.masks import load_mask
    from ..data.sources import read_samples
    from .engine import ITEM_ERRORS
    from .loading import check_output_folder
    from .predict import check_on_error, log_failures, with_skip_hint

    check_on_error(on_error)
    out_dir = check_output_folder(out_dir)
    samples = read_samples(data_dir, layout=layout, on_error=on_error, masks=masks).samples
    if max_images is not None:
        samples = samples[: max(0, int(max_images))]
    engine = load_engine(
        model_dir,
        device=device,
        batch_size=batch_size,
        max_image_pixels=max_image_pixels,
        calibrate=calibrate,
        roi_model=roi_model,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, failed = [], []
    for sample in tqdm(samples, desc="explain", unit="image", disable=not progress):
        name = str(sample.image_path)
        try:
            image = engine.decode(sample.image_path)  # decoded once; the mask is sized (or resized) to it here
            mask = None
            if sample.mask_path is not None:
                mask = load_mask(
                    sample.mask_path,
                    image.size,
                    resize=resize_masks,
                    image_path=name,
                    max_pixels=engine.max_image_pixels,
                )
            path = explain_image(
                engine,
                image,
                mask,
                out_path=out_dir / f"{sample.image_id}.png",
                title=sample.image_path.name,
                true_label=sample.label,
                method=method,
                batch_size=batch_size,
            )
        except ITEM_ERRORS as e:
            if on_error == "raise":
                raise with_skip_hint(e, name, "in a warning") from e
            failed.append((name, str(item_error(e, name))))
            continue
        paths.append(path)
    log_failures(failed, len(samples), f"no PNG in {out_dir}")
    return paths
