"""Score a trained model (or a fold ensemble) on labelled images at image and patch level, through the engine."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ..data.images import DataError
from ..data.sources import Sample, read_samples
from .engine import InferenceEngine
from .loading import ModelSource, load_engine
from .plots import plot_confusion_matrix
from .results import ImageLevelResult


def evaluate_samples(
    engine: InferenceEngine,
    samples: Sequence[Sample],
    *,
    split: str = "validation",
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> ImageLevelResult:
    """Predict every sample (image + mask, tissue detection without one) and score the labelled ones.

    Args:
        engine: The model's inference engine.
        samples: The images; a label the model does not know is an error, no label (None) is kept unscored.
        split: Name of the image set in the result.
        n_bootstrap: Resamples of the macro-F1 confidence interval.
        seed: Seed of the resampling.
        progress: Show a progress bar.

    Raises:
        DataError: No image, a label unknown to the model, or an unreadable file (the message names it).
    """
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
    bar = tqdm(total=len(samples), desc="evaluate", unit="image", disable=not progress)
    predictions = []
    for prediction in engine.predict_many(items):
        predictions.append(prediction)
        bar.update()
    bar.close()
    y_true = [index[s.label] if s.label is not None else -1 for s in samples]
    return ImageLevelResult.from_image_predictions(
        predictions, y_true, split=split, n_bootstrap=n_bootstrap, seed=seed
    )


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
) -> ImageLevelResult:
    """Score a model on every labelled image of a folder (``hf-histo evaluate``).

    Patches are cut, classified and aggregated by the inference engine with the model's own patching, TTA and
    aggregation (unless overridden), exactly as the pipeline and the end-of-training evaluation do.

    Args:
        model: A trained model folder, a cross-validation root (its ``fold_*`` models are ensembled), or a list.
        data: A labelled folder in any layout (or a clean manifest CSV).
        out_path: JSON to write (atomically; also ``<stem>_confusion_matrix.png`` next to it); None: do not write.
        layout: Force the folder layout.
        batch_size: Patches per forward pass.
        aggregation: ``"soft"``, ``"hard"`` or ``"mask_weighted"`` (default: the model's).
        tta: ``"none"``, ``"flips"`` or ``"d4"`` (default: the model's).
        device: Device (default: CUDA when available).
        n_bootstrap: Resamples of the macro-F1 confidence interval.
        progress: Show a progress bar.

    Raises:
        DataError: The folder has no labelled image, or labels the model does not know.
    """
    start = time.perf_counter()
    engine = load_engine(model, device=device, batch_size=batch_size, aggregation=aggregation, tta=tta)
    sample_set = read_samples(data, layout=layout)
    labelled = [s for s in sample_set.samples if s.label is not None]
    if not labelled:
        raise DataError(f"{data}: no labelled images to evaluate (found {len(sample_set.samples)} unlabelled)")
    result = evaluate_samples(engine, labelled, split=Path(str(data)).name, n_bootstrap=n_bootstrap, progress=progress)
    if out_path is not None:
        out_path = Path(out_path)
        source = [str(p) for p in model] if isinstance(model, (list, tuple)) else str(model)
        result.save(out_path, model=source, data=str(data), seconds=round(time.perf_counter() - start, 2))
        plot_confusion_matrix(
            result.metrics["confusion_matrix"],
            result.labels,
            out_path.with_name(out_path.stem + "_confusion_matrix.png"),
            title=f"image level ({result.aggregation}, TTA {result.tta}), macro-F1 {result.metrics['macro_f1']:.3f}",
        )
    return result
