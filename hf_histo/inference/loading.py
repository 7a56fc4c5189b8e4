"""Load a trained model folder (or a CV root as a fold ensemble) into an `InferenceEngine`; check paths before work."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..data.images import DataError
from ..models.ensemble import FoldEnsemble
from .engine import DEFAULT_BATCH_SIZE, InferenceEngine
from .pipeline import TASK, HistoImageClassificationPipeline, register_pipeline_task
from .roi import RoiSegmenter, load_roi

ModelSource = str | os.PathLike | Sequence[str | os.PathLike]


def _is_local_path(value: str) -> bool:
    """Whether a model value can only name a local folder: it is no valid Hub id, or its first part exists here."""
    try:
        validate_repo_id(value)
    except HFValidationError:  # `./x`, `/x`, `~/x`, `a/b/c`, `a\\b`, ...
        return True
    return "/" in value and os.path.isdir(value.split("/", 1)[0])  # `runs/phikon` next to a `runs/` folder


def check_model_source(model: ModelSource) -> None:
    """Raise at once when a model value names a local folder that does not exist, instead of asking the Hub.

    A `Path`, an entry of a list of fold folders, or a string that is no valid Hub id (or whose first part is a
    local folder) names a local folder.

    Raises:
        FileNotFoundError: Such a folder does not exist.
    """
    single = isinstance(model, (str, os.PathLike))
    for value in [model] if single else list(model):
        text = os.fspath(value)
        local = not single or isinstance(value, os.PathLike) or _is_local_path(text)
        if local and not Path(text).expanduser().exists():
            raise FileNotFoundError(
                f"{text}: no such model folder; pass the folder a recipe wrote (it holds config.json), or a Hub id "
                "such as owner/name."
            )


def check_output_file(path: str | os.PathLike, example: str = "out.csv") -> Path:
    """Raise now, before any work, when ``path`` cannot be written as a file: a folder, or below a file.

    Raises:
        DataError: The path (or one of its parents) is unusable; the message names it.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass a file path (e.g. {path / example}).")
    _check_creatable(path.parent)
    return path


def check_output_folder(path: str | os.PathLike) -> Path:
    """Raise now, before any work, when ``path`` cannot be used as an output folder (an existing file, ...).

    Raises:
        DataError: The path (or one of its parents) is unusable; the message names it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: is a file; pass a folder for the outputs.")
    _check_creatable(path)
    return path


def _check_creatable(folder: Path) -> None:
    """The nearest existing ancestor of ``folder`` (or ``folder`` itself) must be a writable folder."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"{parent}: is a file, not a folder; {folder} cannot be created there.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise DataError(f"{parent}: no permission to write there; choose another output path.")
            return


def fold_dirs(source: ModelSource) -> list[Path] | None:
    """The fold folders of a CV root or a list of folders; None for a single model folder (or a Hub id)."""
    if not isinstance(source, (str, os.PathLike)):
        return [Path(p) for p in source]
    root = Path(source)
    if (root / "config.json").is_file() or not root.is_dir():
        return None
    folds = sorted(p for p in root.glob("fold_*") if (p / "config.json").is_file())
    if not folds:
        raise FileNotFoundError(f"{root}: no config.json and no fold_*/config.json; pass a trained model folder.")
    return folds


def load_engine(
    model: ModelSource,
    *,
    device: str | torch.device | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    aggregation: str | None = None,
    tta: str | None = None,
    max_image_pixels: int | None = None,
    calibrate: bool = True,
    roi_model: str | os.PathLike | RoiSegmenter | bool | None = None,
) -> InferenceEngine:
    """The inference engine of a trained hf-histo model folder, Hub id, CV root (fold ensemble) or list of folders.

    Args:
        model: A model folder or Hub id; a cross-validation root (its ``fold_*`` models are averaged); or a list of
            model folders.
        device: Torch device (default: CUDA when available).
        batch_size: Patches per forward pass.
        aggregation: Override of the model's aggregation.
        tta: Override of the model's TTA (``none``, ``flips``, ``d4``).
        max_image_pixels: Raise PIL's decompression-bomb limit for trusted large images.
        calibrate: Apply the model's temperature (``config.calibration_temperature``) to the image probabilities; False: raw
            ones. The folds of a CV root share one temperature (fitted on the out-of-fold images); folds with
            different temperatures are an error.
        roi_model: ROI segmentation model for images without a mask (folder, Hub id or `RoiSegmenter`); None: the
            model config's ``roi_model`` when set (tissue detection otherwise); False: tissue detection.

    Raises:
        FileNotFoundError: A folder that holds no model, or a path-like value that does not exist (raised before
            anything is downloaded).
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from ..models import register_auto_classes

    check_model_source(model)
    register_auto_classes()  # the package registers lazily: the Auto classes must know hf-histo's model type here
    if isinstance(model, str) and model.startswith("~"):
        model = os.path.expanduser(model)
    folds = fold_dirs(model)
    if folds is None:
        if isinstance(model, (str, os.PathLike)) and os.path.exists(model) and not Path(model).is_dir():
            raise FileNotFoundError(f"{model}: not a model folder; pass the folder a recipe wrote.")
        first = os.fspath(model)
        network = AutoModelForImageClassification.from_pretrained(first)
    else:
        for fold in folds:
            if not (fold / "config.json").is_file():
                raise FileNotFoundError(f"{fold}: no config.json; pass trained model folders.")
        first = os.fspath(folds[0])
        network = FoldEnsemble.from_pretrained(folds)
        temperatures = {getattr(m.config, "calibration_temperature", None) for m in network.models}
        if calibrate and len(temperatures) > 1:
            raise ValueError(
                f"the fold models have different temperatures {sorted(map(str, temperatures))}: one CV run's folds "
                "share the one fitted on its out-of-fold images; pass calibrate=False (--no_calibration) to ensemble "
                "them uncalibrated"
            )
    processor = AutoImageProcessor.from_pretrained(first)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    roi_model = getattr(network.config, "roi_model", None) if roi_model is None or roi_model is True else roi_model
    if isinstance(roi_model, (str, os.PathLike)) and not _in_model_folder(first, roi_model):
        check_model_source(roi_model)
    return InferenceEngine(
        network.to(device),
        processor,
        aggregation=aggregation,
        tta=tta,
        batch_size=batch_size,
        max_image_pixels=max_image_pixels,
        calibrate=calibrate,
        roi=load_roi(roi_model or False, network.config, device),
    )


def _in_model_folder(model_dir: str, roi_model: str | os.PathLike) -> bool:
    """Whether a relative ROI model folder is found in the classifier's folder (as `load_roi` looks there too)."""
    path = os.fspath(roi_model)
    return not os.path.isabs(path) and not os.path.exists(path) and os.path.isdir(os.path.join(model_dir, path))


def load_pipeline(
    model: str | os.PathLike,
    *,
    device: int | str | torch.device | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
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
    from transformers import pipeline as hf_pipeline

    from ..models import register_auto_classes

    check_model_source(model)
    register_auto_classes()  # the package registers lazily: the Auto classes must know hf-histo's model type here
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
