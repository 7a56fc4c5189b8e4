"""Grouped k-fold cross-validation of a recipe: out-of-fold image metrics, mean ± std, fold-model ensembles."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..inference.calibration import calibrate_result, uncalibrated, with_temperature
from ..inference.metrics import CALIBRATION_KEYS, METRIC_KEYS, calibration_metrics
from ..inference.plots import plot_confusion_matrix, plot_reliability_diagram
from ..inference.results import ImageLevelResult
from ..utils import atomic_write_text
from .finalize import last_complete_checkpoint, recover_final_files

logger = logging.getLogger(__name__)


CV_RECORD = "cv_run.json"
# Arguments that do not change a fold's result: where the run writes, logs and saves, what runs it, which folds run now.
_NOT_SETTINGS = re.compile(
    r"(_.*|output_dir|overwrite_output_dir|resume_.*|logging_.*|save_.*|dataloader_.*|num_proc|"
    r"cache_dir|disable_tqdm|report_to|run_name|.*push.*|hub_.*|fold)"
)


def cv_settings(data_args: Any, model_args: Any, training_args: Any) -> dict[str, dict[str, Any]]:
    """The arguments that decide a cross-validation run's folds, as JSON values (``{"data", "model", "training"}``)."""
    settings = {}
    for group, args in (("data", data_args), ("model", model_args), ("training", training_args)):
        items = args.to_dict() if hasattr(args, "to_dict") else vars(args)
        settings[group] = {k: v for k, v in items.items() if not _NOT_SETTINGS.fullmatch(k)}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _field_defaults(*groups: Any) -> dict[str, dict[str, Any]]:
    """The dataclass defaults of the three argument groups, as JSON values, in `cv_settings`' layout."""
    defaults = {}
    for group, args in zip(("data", "model", "training"), groups):
        values = {}
        for f in dataclasses.fields(args):
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
        defaults[group] = values
    return json.loads(json.dumps(defaults, sort_keys=True, default=str))


def _start_record(
    root: Path, settings: dict[str, Any], resume: bool, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run's record (settings, fold wall times): a new one, or with ``resume`` the folder's, if it matches.

    A setting the record lacks (an argument added by a later hf-histo) matches its dataclass default in
    ``defaults``: a new argument's default keeps the behaviour of the version that made the record.
    """
    path = root / CV_RECORD
    if not resume or not root.is_dir() or not any(root.glob("fold_*")):
        return {"settings": settings, "wall_seconds": {}}
    if not path.is_file():
        raise ValueError(
            f"--resume_folds: {root} holds folds but no {CV_RECORD} (a run of an older hf-histo, or not a "
            "cross-validation run): its settings cannot be checked. Pass --overwrite_output_dir to start again."
        )
    record = json.loads(path.read_text(encoding="utf-8"))
    recorded = {group: {**(defaults or {}).get(group, {}), **record["settings"].get(group, {})} for group in settings}
    differ = sorted(
        f"{group}.{key}"
        for group in settings
        for key in set(settings[group]) | set(record["settings"].get(group, {}))
        if settings[group].get(key) != recorded[group].get(key)
    )
    if differ:
        raise ValueError(
            f"--resume_folds: the run in {root} was made with other settings ({', '.join(differ[:8])}); its finished "
            "folds would be mixed with this run's. Resume with the same arguments, or pass --overwrite_output_dir."
        )
    return {**record, "settings": settings}  # written back with the arguments an older record lacked


def score_only_on_heldout(training_args: Any, fold: int) -> None:
    """Turn off checkpoint selection and early stopping on a fold's held-out images, which score the model.

    Both `run_cross_validation` (each fold) and a single ``--n_folds N --fold k`` run apply it, so fold ``k``
    trains and reports the same figure either way.
    """
    if training_args.load_best_model_at_end or getattr(training_args, "early_stopping_patience", None):
        logger.info("fold %d: no checkpoint selection or early stopping on its held-out images (they score it)", fold)
    training_args.load_best_model_at_end = False
    if hasattr(training_args, "early_stopping_patience"):
        training_args.early_stopping_patience = None


def _fold_args(
    data_args: Any, training_args: Any, n_folds: int, fold: int, output_dir: Path, select_on_heldout: bool
) -> tuple[Any, Any]:
    fold_data = copy.copy(data_args)
    fold_data.n_folds, fold_data.fold = n_folds, fold
    fold_training = copy.copy(training_args)
    if not select_on_heldout:
        score_only_on_heldout(fold_training, fold)
    fold_training.push_final_to_hub = False  # fold models stay local (an ensemble); push the one you pick
    fold_training.output_dir = str(output_dir / f"fold_{fold}")
    if getattr(training_args, "logging_dir", None):
        fold_training.logging_dir = str(output_dir / f"fold_{fold}" / "logs")
    fold_training.resume_from_checkpoint = None
    return fold_data, fold_training


def _fold_record(result: ImageLevelResult, temperature: float, n_images: int) -> dict[str, Any]:
    """The calibration record of one fold: before / after the out-of-fold temperature, on the fold's images."""
    y = np.asarray(result.y_true)
    raw, scaled = result.probs_array[y >= 0], with_temperature(result, temperature, None).probs_array[y >= 0]
    return {
        "temperature": temperature,
        "fitted_on": "out_of_fold",
        "n_images": n_images,
        "before": calibration_metrics(y[y >= 0], raw),
        "after_in_sample": calibration_metrics(y[y >= 0], scaled),  # these images helped fit it: see cv_metrics.json
    }


def _rewrite_fold(fold_dir: Path, result: ImageLevelResult) -> None:
    """Write a fold's rescaled result into its metrics.json (other keys kept) and its temperature into config.json."""
    path = fold_dir / "metrics.json"
    extra = {k: v for k, v in json.loads(path.read_text()).items() if k not in ImageLevelResult.__dataclass_fields__}
    result.save(path, **extra)
    config_path = fold_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.get("calibration_temperature") != result.temperature:
            config["calibration_temperature"] = result.temperature
            atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def summarize_folds(
    fold_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    calibrate: bool = True,
) -> dict[str, Any]:
    """Combine finished folds: per-fold image metrics, mean ± std, and out-of-fold (OOF) metrics.

    Calibration: the folds wrote uncalibrated probabilities (`finalize_run` fits no temperature on a fold). One
    temperature is fitted here on all the out-of-fold image probabilities, so that the fold models and their
    ensemble (`hf-histo evaluate --model OUT`, which averages the folds' softmax and applies the folds' shared
    temperature) share it. With ``out_dir``, every fold's `config.json` gets it and its `metrics.json` is rewritten
    with the rescaled probabilities and metrics (so each fold model reproduces its figures) and a `calibration` record
    (before / after on its own images; its uncalibrated probabilities are kept there, so summarizing again starts
    from them). The OOF result's record has the honest, cross-fitted "after" (`calibration_record`).

    Args:
        fold_dirs: Output folders of the folds (each with the `metrics.json` that `finalize_run` wrote).
        out_dir: Where to write `cv_metrics.json`, `oof_image_predictions.csv`, `oof_confusion_matrix.png` and
            `reliability_diagram.png` (OOF, before vs cross-fitted after); also rewrites the folds (see above).
        n_bootstrap: Resamples of the out-of-fold macro-F1 confidence interval.
        seed: Seed of the resampling and of the cross-fitting folds.
        calibrate: Fit the temperature (`--calibrate`); False leaves (or makes) the folds uncalibrated.

    Returns:
        `{"n_folds", "folds": [...], "mean": {...}, "std": {...}, "oof": ImageLevelResult.to_dict(),
        "image_macro_f1": "m ± s", "temperature": T or None}`; `std` is the sample standard deviation over folds
        (ddof=1).
    """
    results, loaded = [], []
    for k, fold_dir in enumerate(fold_dirs):
        path = Path(fold_dir) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the fold did not finish (finalize_run writes it)")
        loaded.append(ImageLevelResult.load(path))
        result = uncalibrated(loaded[-1])
        if results and result.labels != results[0].labels:
            raise ValueError(f"fold {k} has labels {result.labels}, fold 0 has {results[0].labels}")
        seen = {i for r in results for i in r.image_ids}
        overlap = seen & set(result.image_ids)
        if overlap:
            raise ValueError(f"fold {k} evaluates images already held out by another fold: {sorted(overlap)[:5]}")
        results.append(result)
    if not results:
        raise ValueError("no folds to summarize")
    first = results[0]
    oof = ImageLevelResult.from_predictions(
        first.labels,
        [i for r in results for i in r.image_ids],
        [y for r in results for y in r.y_true],
        np.concatenate([r.probs_array for r in results]),
        aggregation=first.aggregation,
        tta=first.tta,
        split="out_of_fold",
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    raw_oof, temperature, crossed = oof, None, None
    if calibrate:
        oof, temperature, crossed = calibrate_result(oof, "out_of_fold", seed=seed)
    if temperature is not None:
        n_oof = oof.calibration["n_images"]
        results = [with_temperature(r, temperature, _fold_record(r, temperature, n_oof)) for r in results]
    folds = [
        {"fold": k, "dir": str(d), "image": r.metrics, "patch": r.patch_metrics}
        for k, (d, r) in enumerate(zip(fold_dirs, results))
    ]
    keys = [k for k in (*METRIC_KEYS, *CALIBRATION_KEYS) if all(f["image"].get(k) is not None for f in folds)]
    values = {k: np.array([f["image"][k] for f in folds], dtype=np.float64) for k in keys}
    mean = {k: float(v.mean()) for k, v in values.items()}
    std = {k: float(v.std(ddof=1)) if v.size > 1 else 0.0 for k, v in values.items()}
    summary = {
        "n_folds": len(folds),
        "labels": first.labels,
        "image_macro_f1": f"{mean.get('macro_f1', float('nan')):.4f} ± {std.get('macro_f1', float('nan')):.4f}",
        "mean": mean,
        "std": std,
        "oof": oof.to_dict(),
        "temperature": temperature,
        "folds": folds,
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        for fold_dir, before, after in zip(fold_dirs, loaded, results):
            if after is not before:  # rescaled now, or uncalibrated now after an earlier summary rescaled it
                _rewrite_fold(Path(fold_dir), after)
        if crossed is not None:
            y = np.asarray(raw_oof.y_true)
            plot_reliability_diagram(
                y[y >= 0],
                raw_oof.probs_array[y >= 0],
                crossed,
                out_dir / "reliability_diagram.png",
                title=f"out-of-fold images, temperature {temperature:.3g} (after: cross-fitted)",
            )
        atomic_write_text(out_dir / "cv_metrics.json", json.dumps(summary, indent=2) + "\n")
        rows = ["image_id,label," + ",".join(f"p_{name}" for name in oof.labels)]
        for image_id, label, row in zip(oof.image_ids, oof.y_true, oof.probs):
            name = oof.labels[label] if label >= 0 else ""
            rows.append(f"{image_id},{name}," + ",".join(f"{v:.6f}" for v in row))
        atomic_write_text(out_dir / "oof_image_predictions.csv", "\n".join(rows) + "\n")
        plot_confusion_matrix(
            oof.metrics["confusion_matrix"],
            oof.labels,
            out_dir / "oof_confusion_matrix.png",
            title=f"out-of-fold images, macro-F1 {oof.metrics['macro_f1']:.3f}",
        )
    return summary


def run_cross_validation(
    train_fn: Callable[[Any, Any, Any], Any],
    data_args: Any,
    model_args: Any,
    training_args: Any,
    n_folds: int | None = None,
    folds: Sequence[int] | None = None,
    select_on_heldout: bool = False,
) -> dict[str, Any]:
    """Run a recipe's `main(data_args, model_args, training_args)` once per grouped fold and summarize.

    Each fold trains into `output_dir/fold_k` on the images outside fold `k` (groups, e.g. patients, never
    straddle folds: the split is done by `load_patch_dataset(n_folds=, fold=)`) and is evaluated on fold `k`.
    The fold models together form an ensemble (`hf-histo evaluate|predict --model output_dir`).

    Args:
        train_fn: The recipe's `main`.
        data_args: Data arguments (`n_folds` taken from here when not given).
        model_args: Model arguments.
        training_args: Training arguments; `output_dir` is the CV root.
        n_folds: Number of folds.
        folds: Subset of folds to run (default: all); the summary covers the folds that have finished.
        select_on_heldout: Allow best-checkpoint selection and early stopping on the held-out fold. Off by
            default: each fold keeps its final model, so out-of-fold metrics are not optimistically biased.

    Returns:
        The summary of `summarize_folds` with `wall_seconds` and `select_on_heldout`, also written to
        `output_dir/cv_metrics.json` (main process; None on the other ranks).
    """
    n_folds = n_folds or data_args.n_folds
    if not n_folds or n_folds < 2:
        raise ValueError("run_cross_validation needs n_folds >= 2 (--n_folds)")
    root = Path(training_args.output_dir)
    resume = bool(getattr(training_args, "resume_folds", False))
    main_process = getattr(training_args, "process_index", 0) == 0
    settings = cv_settings(data_args, model_args, training_args)
    record = _start_record(root, settings, resume, _field_defaults(data_args, model_args, training_args))
    wall = record["wall_seconds"]
    if main_process:  # before the first fold: a run killed in it can be resumed
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / CV_RECORD, json.dumps(record, indent=2) + "\n")
    for fold in folds if folds is not None else range(n_folds):
        fold_data, fold_training = _fold_args(data_args, training_args, n_folds, fold, root, select_on_heldout)
        fold_dir = Path(fold_training.output_dir)
        if resume:
            recover_final_files(fold_dir)  # a publication a kill interrupted is finished (or dropped) first
            if (fold_dir / "metrics.json").is_file():
                logger.info("fold %d/%d finished in the earlier run: kept", fold + 1, n_folds)
                continue
            checkpoint = last_complete_checkpoint(fold_dir)  # a fold a kill stopped goes on from there
            fold_training.resume_from_checkpoint = str(checkpoint) if checkpoint else None
        start = time.perf_counter()
        train_fn(fold_data, model_args, fold_training)
        wall[str(fold)] = round(time.perf_counter() - start, 1)
        logger.info("fold %d/%d done in %.0f s", fold + 1, n_folds, wall[str(fold)])
        if main_process:
            atomic_write_text(root / CV_RECORD, json.dumps(record, indent=2) + "\n")
    fold_dirs = [root / f"fold_{k}" for k in range(n_folds) if (root / f"fold_{k}" / "metrics.json").is_file()]
    summary = None
    if main_process:
        calibrate = getattr(training_args, "calibrate", True)
        summary = summarize_folds(fold_dirs, root, training_args.n_bootstrap, training_args.seed, calibrate)
        summary["wall_seconds"] = dict(sorted(wall.items(), key=lambda item: int(item[0])))  # this run and resumed
        summary["select_on_heldout"] = select_on_heldout
        atomic_write_text(root / "cv_metrics.json", json.dumps(summary, indent=2) + "\n")
        logger.debug(  # the recipes print it in their end-of-run summary (training.summary)
            "cross-validation image macro-F1: %s (OOF %.4f)",
            summary["image_macro_f1"],
            summary["oof"]["metrics"]["macro_f1"],
        )
    return summary


def cv_metrics_file(path: str | Path) -> Path:
    """The `cv_metrics.json` of a cross-validation run's folder (or the file itself); `ValueError` naming the fix."""
    path = Path(path)
    file = path / "cv_metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"--cv_results {path}: no cv_metrics.json there; pass the --output_dir of a run with --n_folds "
            "(same recipe and data) once it has finished"
        )
    return file


def load_cv_result(path: str | Path, labels: Sequence[str]) -> tuple[ImageLevelResult, str]:
    """The out-of-fold result of a cross-validation run, for the card of a model trained on all images.

    Args:
        path: The CV run's output folder (or its `cv_metrics.json`).
        labels: The final model's class names; the CV run must have the same ones, in the same order.

    Returns:
        `(result, fact)`: the out-of-fold `ImageLevelResult` (split `"out_of_fold"`, without the CV's temperature)
        and a sentence for the card.

    Raises:
        ValueError: No `cv_metrics.json` there, or other classes than the final model's.
    """
    file = cv_metrics_file(path)
    summary = json.loads(file.read_text())
    if list(summary["labels"]) != list(labels):
        raise ValueError(
            f"--cv_results {file}: its classes {summary['labels']} are not this model's {list(labels)}; "
            "pass the cross-validation of the same data"
        )
    # The final model is not temperature-scaled (no validation images): its card shows the raw probabilities' scores.
    result = uncalibrated(ImageLevelResult.from_dict(summary["oof"]))
    result.split = "out_of_fold"
    fact = (
        f"all labelled images (no validation split); the results below are the out-of-fold figures of the "
        f"cross-validation run `{file.parent.name}` ({summary['n_folds']} grouped folds, image macro-F1 "
        f"{summary['image_macro_f1']}, mean ± std over folds)"
    )
    return result, fact
