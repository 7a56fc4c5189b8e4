"""End of a run: score the final model through the inference engine; write the final files all at once."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from transformers import Trainer

from ..data.sources import read_samples
from ..data.transforms import make_image_processor
from ..inference.calibration import calibrate_result
from ..inference.engine import InferenceEngine
from ..inference.evaluate import evaluate_samples
from ..inference.plots import plot_confusion_matrix, plot_reliability_diagram, plot_training_curves
from ..inference.results import ImageLevelResult
from ..inference.trained_images import SPLITS_NAME, splits_record
from ..utils import atomic_write_text
from .metrics import dataset_column
from .mil import train_run_mil_head
from .trainer import final_model

logger = logging.getLogger(__name__)

# A final save is written into STAGING_NAME inside the output folder, then published: its files are moved into place
# (renames, no copy) and the names are listed in INDEX_NAME, so that the next publication removes the ones it lacks.
STAGING_NAME = ".final-tmp"
INDEX_NAME = ".final_files.json"
_COMMITTED = ".committed"  # inside the staging folder: everything in it is written, publishing has begun
# What a run writes into its output folder: checkpoints, cross-validation folds and the final save's bookkeeping
# (removed by --overwrite_output_dir, with the files INDEX_NAME lists), and final files of folders written before
# INDEX_NAME existed (left to be replaced by the next final save: a README.md may be the user's).
OWNED_ENTRIES = ("checkpoint-*", "fold_*", STAGING_NAME, INDEX_NAME)
RUN_ENTRIES = (
    *OWNED_ENTRIES,
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "README.md",
    "metrics.json",
    SPLITS_NAME,
    "plots",
    "confusion_matrix.png",
    "training_curves.png",
    "reliability_diagram.png",
    "cv_metrics.json",
    "cv_run.json",  # run_cross_validation's settings and fold times
    "oof_image_predictions.csv",
    "oof_confusion_matrix.png",
)
_staged: set[Path] = set()  # output folders whose staging finalize_run(save_model=False) began in this process


def _published(output_dir: Path) -> list[str]:
    index = output_dir / INDEX_NAME
    return json.loads(index.read_text()) if index.is_file() else []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _roll_forward(output_dir: Path) -> None:
    """Move a committed staging folder's files into place; idempotent: a call a kill interrupted is finished later."""
    staging = output_dir / STAGING_NAME
    names = json.loads((staging / _COMMITTED).read_text())
    for name in names:
        if (staging / name).exists():  # else moved by an interrupted earlier call
            if (staging / name).is_dir() or (output_dir / name).is_dir():  # a rename replaces files only
                _remove(output_dir / name)
            os.replace(staging / name, output_dir / name)
    for name in set(_published(output_dir)) - set(names):
        _remove(output_dir / name)  # a file of the previous final save that this one does not write
    atomic_write_text(output_dir / INDEX_NAME, json.dumps(names) + "\n")
    shutil.rmtree(staging)


def recover_final_files(output_dir: str | os.PathLike) -> None:
    """Finish a publication that a kill interrupted, or drop an abandoned staging folder (its save never finished)."""
    output_dir = Path(output_dir)
    staging = output_dir / STAGING_NAME
    if (staging / _COMMITTED).is_file():
        _roll_forward(output_dir)
    elif staging.exists() and output_dir.resolve() not in _staged:
        shutil.rmtree(staging)


@contextmanager
def final_files(output_dir: str | os.PathLike, publish: bool = True) -> Iterator[Path]:
    """Write the final files of a run into a staging folder that is published when the block ends.

    A kill before the publication leaves the output folder's previous final files (or none) as they were; the
    publication itself is a few renames, and one interrupted there is finished by the next final save. Checkpoints
    stay where `Trainer` writes them.

    Args:
        output_dir: The run's output folder.
        publish: Publish when the block ends; False keeps the staging folder for the next block of this process on
            the same folder (`finalize_run(save_model=False)`, then `hub.save_run`), which publishes both.

    Yields:
        The staging folder to write into.
    """
    output_dir = Path(output_dir)
    key = output_dir.resolve()
    if key not in _staged:
        recover_final_files(output_dir)
    staging = output_dir / STAGING_NAME
    staging.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
    except BaseException:
        _staged.discard(key)  # the next save starts afresh (and removes this abandoned staging)
        raise
    if publish:
        _staged.discard(key)
        names = sorted(p.name for p in staging.iterdir() if p.name != _COMMITTED)
        atomic_write_text(staging / _COMMITTED, json.dumps(names))
        _roll_forward(output_dir)
    else:
        _staged.add(key)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The output folder's latest `checkpoint-N` whose save finished (it holds `trainer_state.json`)."""

    def step(path: Path) -> int:
        suffix = path.name.removeprefix("checkpoint-")
        return int(suffix) if suffix.isdigit() else -1

    complete = [p for p in Path(output_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(complete, key=step, default=None)


def run_entries(output_dir: str | os.PathLike) -> list[Path]:
    """What an earlier run left in an output folder (`RUN_ENTRIES` and the final files it published)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    published = set(_published(output_dir))
    return sorted(
        p
        for p in output_dir.iterdir()
        if p.name in published or any(fnmatch.fnmatchcase(p.name, pattern) for pattern in RUN_ENTRIES)
    )


def check_output_dir(
    output_dir: str | os.PathLike,
    overwrite: bool,
    resume_from_checkpoint: str | bool | None,
    main_process: bool = True,
) -> None:
    """Refuse an output folder that holds another run, unless this run resumes it or overwrites it.

    A new run there would rotate the old run's checkpoints away and mix its final files with the old ones. Other
    files (a config file, the demo data, a dataset cache) are not a run and are left alone.

    Args:
        output_dir: `--output_dir`.
        overwrite: `--overwrite_output_dir`: remove the earlier run's checkpoints, folds and listed final files (main
            process); its other files are replaced by this run's final save.
        resume_from_checkpoint: `--resume_from_checkpoint`: a checkpoint of this folder continues its run; True
            (`--resume_folds`): the cross-validation run of this folder continues (`run_cross_validation` checks it).
        main_process: Whether this process removes the files (the others only check).

    Raises:
        ValueError: The folder holds another run; the message names it and the flags that resolve it.
    """
    output_dir = Path(output_dir)
    found = run_entries(output_dir)
    if not found:
        return
    if overwrite:
        owned = set(_published(output_dir))
        removed = [p for p in found if p.name in owned or any(fnmatch.fnmatchcase(p.name, x) for x in OWNED_ENTRIES)]
        if main_process and removed:
            logger.warning("--overwrite_output_dir: removing the earlier run in %s: %s", output_dir, removed)
            for path in removed:
                _remove(path)
        return
    if resume_from_checkpoint is True:
        return
    if resume_from_checkpoint and Path(resume_from_checkpoint).resolve().parent == output_dir.resolve():
        return
    checkpoint = last_complete_checkpoint(output_dir)
    names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
    raise ValueError(
        f"--output_dir {output_dir} holds another run ({names}); a new run there would rotate its checkpoints away "
        "and mix its files with the new ones. Pass --overwrite_output_dir to replace it, "
        f"--resume_from_checkpoint {checkpoint or output_dir / 'checkpoint-N'} to continue it (--resume_folds: "
        "a cross-validation run), "
        "or choose another --output_dir."
    )


def split_image_ids(data: Any) -> dict[str, list[str]]:
    """``{split: [image_id, ...]}`` (sorted, unique) of a patch `DatasetDict`."""
    return {name: sorted({str(i) for i in dataset_column(split, "image_id") or []}) for name, split in data.items()}


def _fit_temperature(
    result: ImageLevelResult, config: Any, args: Any, data_args: Any, staging: Path
) -> ImageLevelResult:
    """`result` scaled by a temperature fitted on its labelled images (stored in ``config``), with its diagram.

    Nothing is fitted with `--no_calibrate`, on fewer than 2 labelled images, or on a cross-validation fold: there
    `summarize_folds` fits one temperature on the out-of-fold images of all folds and rewrites the folds.
    """
    if not getattr(args, "calibrate", True):
        return result
    if getattr(data_args, "fold", None) is not None:
        logger.info(
            "fold %s: the temperature is fitted on the out-of-fold images once the folds are done", data_args.fold
        )
        return result
    calibrated, temperature, crossed = calibrate_result(result, "validation", seed=args.seed)
    if temperature is None:
        logger.warning("fewer than 2 labelled validation images: no temperature fitted")
        return result
    config.calibration_temperature = temperature
    record = calibrated.calibration
    logger.info(
        "temperature %.3g fitted on %d validation images: ECE %.3f -> %.3f, NLL %.3f -> %.3f (cross-fitted)",
        temperature,
        record["n_images"],
        record["before"]["ece"],
        record["after"]["ece"],
        record["before"]["nll"],
        record["after"]["nll"],
    )
    y, raw = np.asarray(result.y_true), result.probs_array
    plot_reliability_diagram(
        y[y >= 0],
        raw[y >= 0],
        crossed,
        staging / "reliability_diagram.png",
        title=f"validation images, temperature {temperature:.3g} (after: cross-fitted)",
    )
    return calibrated


def finalize_run(
    trainer: Trainer,
    data: Any,
    data_args: Any,
    run_info: dict[str, Any] | None = None,
    save_model: bool = True,
) -> ImageLevelResult | None:
    """Evaluate the final (best) model on the validation images and write the run's artefacts to its output folder.

    The validation images are read again from the data folder and run through the inference engine, with the
    model's patching, the run's `--tta` and its aggregation, so `metrics.json` holds the figures that
    `hf-histo evaluate` and `pipeline(...)` reproduce from the raw images named in `splits.json`. The model config
    records that TTA (`config.tta`) so every inference entry point uses it by default.

    Attention MIL (`--aggregation attention`): before that evaluation, the model's MIL head is trained on the train
    split's patch embeddings (`hf_histo.training.mil.train_run_mil_head`, on every process), so any recipe trains
    the patch model, then the MIL head; validation images never train it.

    Calibration (`--calibrate`, default): the validation images are evaluated uncalibrated, a temperature is fitted
    on their image probabilities (`fit_temperature`) and stored in `config.calibration_temperature`, which every inference entry
    point applies; `metrics.json` then holds the calibrated probabilities and metrics (what the pipeline returns) and
    a `calibration` record (ECE, Brier, NLL before and after, the "after" cross-fitted: see `calibration_record`).
    No validation split, `--no_calibrate` or a cross-validation fold (one temperature is fitted on the out-of-fold
    images by `summarize_folds`): no temperature.

    Writes (main process): `splits.json` (`{"train": [image_id, ...], "validation": [...], "test": [...]}` and the
    content fingerprint of each image under `"fingerprints"`, which `hf-histo evaluate` matches to warn about
    images the model trained on),
    `metrics.json` (the `ImageLevelResult` plus `run`, `best_checkpoint`, `global_step`, `epoch`),
    `confusion_matrix.png`, `training_curves.png`, `reliability_diagram.png` (when a temperature was fitted), and
    with `save_model` the model (LoRA merged) and its image processor. They appear at once (`final_files`): with
    `save_model` when this call ends, without it when
    `hf_histo.hub.save_run` has added the Hub files (weights, processor, code, card), so a kill in between leaves
    the folder's previous final files, never a mix.

    Args:
        trainer: A trained `HistoTrainer`.
        data: The patch `DatasetDict` the run trained on (its `image_id` columns give the splits).
        data_args: The run's `DataArguments` (where the images are: `data_dir`, `layout`, `exclude`).
        run_info: JSON-able facts stored under `"run"` (recipe name, data and model arguments).
        save_model: Save the model and processor, and publish; False leaves the files for `hub.save_run`.

    Returns:
        The validation `ImageLevelResult` on the main process when there is a validation split; None otherwise.
    """
    args = trainer.args
    output_dir = Path(args.output_dir)
    model = final_model(trainer)
    model.config.tta = getattr(args, "tta", "none")
    train_run_mil_head(trainer, model, data, data_args)  # --aggregation attention: the MIL head's stage (all ranks)
    model.config.calibration_temperature = None  # fitted below on the validation images, when there are some
    splits = split_image_ids(data)
    result = None
    if trainer.is_world_process_zero():
        with final_files(output_dir, publish=save_model) as staging:  # published at once, see above
            sample_set = read_samples(
                data_args.data_dir, layout=data_args.layout, on_error=data_args.on_error, exclude=data_args.exclude
            )
            record = splits_record(splits, sample_set.samples)
            atomic_write_text(staging / SPLITS_NAME, json.dumps(record, indent=1) + "\n")
            processor = make_image_processor(trainer.processing_class)
            validation = set(splits.get("validation", []))
            if validation:
                samples = [s for s in sample_set.samples if s.image_id in validation]
                engine = InferenceEngine(
                    model,
                    processor,
                    batch_size=args.per_device_eval_batch_size,
                    max_image_pixels=data_args.max_image_pixels,
                    calibrate=False,  # raw probabilities: the temperature is fitted on them
                )
                n_bootstrap = getattr(args, "n_bootstrap", 1000)
                result = evaluate_samples(
                    engine, samples, n_bootstrap=n_bootstrap, seed=args.seed, resize_masks=data_args.resize_masks
                )
                result = _fit_temperature(result, model.config, args, data_args, staging)
                result.save(
                    staging / "metrics.json",
                    run=run_info or {},
                    best_checkpoint=trainer.state.best_model_checkpoint,
                    global_step=trainer.state.global_step,
                    epoch=trainer.state.epoch,
                )
                plot_confusion_matrix(
                    result.metrics["confusion_matrix"],
                    result.labels,
                    staging / "confusion_matrix.png",
                    title=f"image level ({result.aggregation}, TTA {result.tta}), "
                    f"macro-F1 {result.metrics['macro_f1']:.3f}",
                )
            elif getattr(args, "calibrate", True):
                logger.info("no validation split: no temperature fitted, the model's probabilities stay uncalibrated")
            plot_training_curves(trainer.state.log_history, staging / "training_curves.png")
            if save_model:
                model.save_pretrained(staging)
                processor.save_pretrained(staging)
    trainer.accelerator.wait_for_everyone()
    return result
