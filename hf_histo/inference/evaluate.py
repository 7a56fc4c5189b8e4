"""Score a trained model (or a fold ensemble) on labelled images at image and patch level, through the engine."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ..data.images import DataError
from ..data.sources import Sample, read_samples
from .engine import DEFAULT_NUM_WORKERS, ITEM_ERRORS, InferenceEngine, check_num_workers
from .loading import ModelSource, check_output_file, load_engine
from .plots import plot_confusion_matrix
from .predict import check_on_error, log_failures, with_skip_hint
from .results import ImageLevelResult
from .roi import RoiSegmenter
from .trained_images import trained_on


def evaluate_samples(
    engine: InferenceEngine,
    samples: Sequence[Sample],
    *,
    split: str = "validation",
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = False,
    on_error: str = "raise",
    resize_masks: bool = False,
) -> ImageLevelResult:
    """Predict every sample (image + mask, tissue detection without one) and score the labelled ones.

    Args:
        engine: The model's inference engine (its ``num_workers`` threads read ahead).
        samples: The images; a label the model does not know is an error, no label (None) is kept unscored.
        split: Name of the image set in the result.
        n_bootstrap: Resamples of the macro-F1 confidence interval.
        seed: Seed of the resampling.
        progress: Show a progress bar.
        on_error: ``"raise"`` stops at the first bad image; ``"skip"`` scores the others and logs the failures.
        resize_masks: Resize masks whose size differs from their image instead of failing.

    Raises:
        DataError: No image, a label unknown to the model, or an unreadable file (the message names it).
    """
    return _evaluate(engine, samples, split, n_bootstrap, seed, progress, on_error, resize_masks)[0]


def _evaluate(
    engine: InferenceEngine,
    samples: Sequence[Sample],
    split: str,
    n_bootstrap: int,
    seed: int,
    progress: bool,
    on_error: str,
    resize_masks: bool,
) -> tuple[ImageLevelResult, list[tuple[str, str]], list[str]]:
    """`evaluate_samples`, the ``(file, error)`` of each image that failed with ``on_error="skip"``, and the
    ``mask_source`` of each image of the result."""
    check_on_error(on_error)
    if not samples:
        raise DataError("no images to evaluate")
    index = {name: i for i, name in enumerate(engine.labels)}
    unknown = sorted({s.label for s in samples if s.label is not None} - set(index))
    if unknown:
        raise DataError(
            f"labels {unknown} are unknown to the model (it predicts {engine.labels}); evaluate on data with the "
            "model's classes"
        )
    items = ((s.image_path, s.mask_path, s.image_id) for s in samples)
    results = engine.predict_many(items, resize_mask=resize_masks, return_errors=on_error == "skip")
    predictions, y_true, failed = [], [], []
    with tqdm(total=len(samples), desc="evaluate", unit="image", disable=not progress) as bar:
        for sample in samples:
            try:
                result = next(results)
            except ITEM_ERRORS as e:  # the engine reads ahead: the message names the file, not `sample`
                raise with_skip_hint(e, None, "in the metrics JSON's failed list") from e
            bar.update()
            if isinstance(result, DataError):
                failed.append((str(sample.image_path), str(result)))
            else:
                predictions.append(result)
                y_true.append(index[sample.label] if sample.label is not None else -1)
    if not predictions:
        raise DataError(f"every image failed, e.g. {failed[0][1]}")
    log_failures(failed, len(samples), "left out of the metrics")
    result = ImageLevelResult.from_image_predictions(
        predictions, y_true, split=split, n_bootstrap=n_bootstrap, seed=seed
    )
    return result, failed, [p.mask_source for p in predictions]


def evaluate_model(
    model: ModelSource,
    data: str | Path,
    out_path: str | Path | None = None,
    *,
    layout: str | None = None,
    batch_size: int = 32,
    aggregation: str | None = None,
    tta: str | None = None,
    device: str | None = None,
    n_bootstrap: int = 1000,
    progress: bool = True,
    on_error: str = "raise",
    resize_masks: bool = False,
    max_image_pixels: int | None = None,
    masks: str | Path | None = None,
    num_workers: int = DEFAULT_NUM_WORKERS,
    calibrate: bool = True,
    roi_model: str | Path | RoiSegmenter | bool | None = None,
) -> ImageLevelResult:
    """Score a model on every labelled image of a folder (``hf-histo evaluate``).

    Patches are cut, classified and aggregated by the inference engine with the model's own patching, TTA and
    aggregation (unless overridden), exactly as the pipeline and the end-of-training evaluation do. The output
    path is checked before any work. Images the model trained on (its splits.json, or any fold's, says which) are
    named in one warning and in ``result.trained_on``: their figures are optimistic. ``result.table()`` is the
    short text summary.

    Args:
        model: A trained model folder, a cross-validation root (its ``fold_*`` models are ensembled), or a list.
        data: A labelled folder in any layout (or a clean manifest CSV).
        out_path: JSON to write (atomically; also ``<stem>_confusion_matrix.png`` next to it); None: do not write.
            Its ``failed`` list holds ``{"file", "error"}`` of every image or data row left out (``on_error="skip"``),
            its ``trained_on`` list the ids of the images the model trained on.
        layout: Force the folder layout.
        batch_size: Patches per forward pass.
        aggregation: ``"soft"``, ``"hard"`` or ``"mask_weighted"`` (default: the model's).
        tta: ``"none"``, ``"flips"`` or ``"d4"`` (default: the model's).
        device: Device (default: CUDA when available).
        n_bootstrap: Resamples of the macro-F1 confidence interval.
        progress: Show a progress bar.
        on_error: ``"raise"`` stops at the first bad image or data row; ``"skip"`` scores the others (the metrics
            then cover fewer images: the failures are logged and listed in the JSON).
        resize_masks: Resize masks whose size differs from their image instead of failing.
        max_image_pixels: Raise PIL's decompression-bomb limit for trusted large images.
        masks: A folder of masks named like the images (``masks/<image name>``); a given mask overrides the
            layout's own for its image (see ``read_samples``).
        num_workers: Threads that decode and patch the next images while the model runs (0: none); the metrics
            are the same for any value.
        calibrate: Scale the image probabilities by the model's temperature (``config.calibration_temperature``, fitted on its
            validation images), as its reported figures are; False: the raw aggregated probabilities.
        roi_model: ROI segmentation model (folder or Hub id) whose predicted region patches the images without a
            mask; None: the model config's ``roi_model`` when set, else tissue detection; False: tissue detection.
            With one, the JSON's ``mask_source`` list says per image (in ``image_ids`` order) where its region came
            from.

    Raises:
        DataError: The folder has no labelled image, labels the model does not know, a bad image (with
            ``on_error="raise"``), or an output path that cannot be written.
    """
    start = time.perf_counter()
    check_on_error(on_error)
    num_workers = check_num_workers(num_workers)
    if out_path is not None:
        out_path = check_output_file(out_path, "metrics.json")
    engine = load_engine(
        model,
        device=device,
        batch_size=batch_size,
        aggregation=aggregation,
        tta=tta,
        max_image_pixels=max_image_pixels,
        calibrate=calibrate,
        roi_model=roi_model,
    )
    engine.num_workers = num_workers
    sample_set = read_samples(data, layout=layout, on_error=on_error, masks=masks)
    labelled = [s for s in sample_set.samples if s.label is not None]
    if not labelled:
        raise DataError(
            f"{data}: no labelled images to evaluate (found {len(sample_set.samples)} unlabelled, "
            f"{sample_set.layout} layout); give labels (e.g. images/ + labels.csv), or use `hf-histo predict`"
        )
    trained = set(trained_on(model, labelled))  # warned before the long part, so that it can be stopped
    result, failed, mask_sources = _evaluate(
        engine, labelled, Path(str(data)).name, n_bootstrap, 0, progress, on_error, resize_masks
    )
    result.trained_on = [i for i in result.image_ids if i in trained]
    log_failures(sample_set.skipped, len(sample_set.samples) + len(sample_set.skipped), "data rows left out")
    if out_path is not None:
        source = [str(p) for p in model] if isinstance(model, (list, tuple)) else str(model)
        result.save(
            out_path,
            model=source,
            data=str(data),
            seconds=round(time.perf_counter() - start, 2),
            failed=[{"file": file, "error": error} for file, error in [*sample_set.skipped, *failed]],
            **({"mask_source": mask_sources} if engine.roi is not None else {}),
        )
        plot_confusion_matrix(
            result.metrics["confusion_matrix"],
            result.labels,
            out_path.with_name(out_path.stem + "_confusion_matrix.png"),
            title=f"image level ({result.aggregation}, TTA {result.tta}), macro-F1 {result.metrics['macro_f1']:.3f}",
        )
    return result
