"""The few lines a recipe prints when it ends: the model folder, the kept epoch and its figures, the next commands."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..inference.results import ImageLevelResult
from .callbacks import format_epoch

__all__ = ["macro_f1_text", "next_commands", "print_run_summary", "run_summary"]


def macro_f1_text(result: ImageLevelResult) -> str:
    """`0.812 (95% CI 0.600 to 0.950, 20 images)`: the image macro-F1 of a result with its bootstrap interval."""
    value = result.metrics.get("macro_f1")
    text = f"{value:.3f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"
    ci = (result.ci or {}).get("macro_f1") or []
    parts = [f"95% CI {ci[0]:.3f} to {ci[1]:.3f}"] if len(ci) == 2 and all(math.isfinite(v) for v in ci) else []
    n = result.metrics.get("n") or result.n_images
    return f"{text} ({', '.join([*parts, f'{n} images'])})"


def calibration_text(result: ImageLevelResult) -> str | None:
    """``temperature T (ECE a -> b cross-fitted, on n validation images)``, or None when no temperature was fitted."""
    record = result.calibration or {}
    if record.get("temperature") is None or not record.get("after"):
        return None
    before, after = record["before"].get("ece"), record["after"].get("ece")
    ece = f"ECE {before:.3f} -> {after:.3f} cross-fitted, " if before is not None and after is not None else ""
    where = str(record.get("fitted_on", "")).replace("_", "-")
    return f"temperature {record['temperature']:.3g} ({ece}on {record.get('n_images')} {where} images)"


def next_commands(
    model: str | Path,
    data: str | Path | None,
    explain_model: str | Path | None = None,
    test_data: str | Path | None = None,
) -> list[str]:
    """The `hf-histo` commands that use a trained model: evaluate, predict, explain, and the web app.

    Args:
        model: The model folder (or a cross-validation root: its folds are ensembled by evaluate and predict).
        data: The data the run trained on (predict/explain run on it: in the challenge layout, predict writes the
            test images' rows); None writes `DATA`.
        explain_model: The folder for `explain` (one model, e.g. a fold), when not `model`.
        test_data: Labelled images the model never saw, for `evaluate`; None writes `LABELLED_TEST_DATA`.
    """
    q = shlex.quote
    data_arg = q(str(data)) if data is not None else "DATA"
    test_arg = q(str(test_data)) if test_data is not None else "LABELLED_TEST_DATA"
    note = "" if test_data is not None else "   # labelled images it never trained on"
    # Outputs go to the working folder, not into the model folder (whose files are what --push_to_hub uploads).
    return [
        f"hf-histo evaluate {test_arg} --model {q(str(model))} --out test_metrics.json{note}",
        f"hf-histo predict {data_arg} --model {q(str(model))} --out submission.csv",
        f"hf-histo explain {data_arg} --model {q(str(explain_model or model))} --out explain/",
        f"hf-histo app --model {q(str(model))}   # in the browser: label, patch map, explanation",
    ]


def _kept(output_dir: Path, best_metric: str | None) -> str:
    """Which epoch the final model is, from `metrics.json` (`finalize_run`) and the checkpoints' trainer states.

    Args:
        output_dir: The run folder.
        best_metric: `metric_for_best_model` when the best checkpoint was reloaded at the end, else None.
    """
    from .finalize import last_complete_checkpoint

    def state_of(checkpoint: Path | None) -> dict[str, Any]:
        path = None if checkpoint is None else checkpoint / "trainer_state.json"
        return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}

    metrics_path = output_dir / "metrics.json"
    facts = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    best = facts.get("best_checkpoint")
    if best_metric and best:
        epoch = state_of(Path(best)).get("epoch")
        where = f"epoch {format_epoch(float(epoch))} ({Path(best).name})" if epoch is not None else Path(best).name
        return f"{where}: the best {best_metric.removeprefix('eval_')} on validation, reloaded at the end"
    epoch = facts.get("epoch", state_of(last_complete_checkpoint(output_dir)).get("epoch"))
    return f"epoch {format_epoch(float(epoch))}, the last" if epoch is not None else "the last epoch"


def run_summary(
    training_args: Any,
    data_args: Any,
    result: ImageLevelResult | None = None,
    cv: Mapping[str, Any] | None = None,
) -> str:
    """The end-of-run summary of a recipe.

    Args:
        training_args: The run's `HistoTrainingArguments` (`output_dir`, `load_best_model_at_end`, push options).
        data_args: The run's `DataArguments` (`data_dir`, `val_fraction`).
        result: What `main` returned: the validation `ImageLevelResult` (None without a validation split).
        cv: What `run_cross_validation` returned (then `result` is not used).

    Returns:
        The text, ending with the next commands.
    """
    out = Path(training_args.output_dir)
    rows: list[tuple[str, str]] = []
    if cv is not None:
        n = cv["n_folds"]
        folds = ", ".join(f"{f['image'].get('macro_f1', float('nan')):.2f}" for f in cv["folds"])
        oof = ImageLevelResult.from_dict(cv["oof"])
        selection = (
            "best epoch on its held-out fold"
            if cv.get("select_on_heldout")
            else "last epoch (no model selection on the held-out fold)"
        )
        rows += [
            ("models", f"{out}/fold_0 .. fold_{n - 1} ({n} folds; {out} as --model is their ensemble)"),
            ("cross-validation", f"image macro-F1 {cv['image_macro_f1']} (mean ± std over {n} folds: {folds})"),
            ("out-of-fold", f"image macro-F1 {macro_f1_text(oof)}"),
            ("calibrated", calibration_text(oof) or "no (--no_calibrate, or too few labelled images)"),
            ("kept", f"each fold's {selection}"),
            ("figures", str(out / "cv_metrics.json")),
        ]
        commands = next_commands(out, data_args.data_dir, explain_model=out / "fold_0")
    else:
        rows.append(("model", str(out)))
        reloaded = getattr(training_args, "load_best_model_at_end", False)
        rows.append(("kept", _kept(out, getattr(training_args, "metric_for_best_model", None) if reloaded else None)))
        if result is not None:
            rows.append((f"{result.split}", f"image macro-F1 {macro_f1_text(result)}, TTA {result.tta}"))
            if calibration_text(result):
                rows.append(("calibrated", calibration_text(result)))
            rows.append(("figures", str(out / "metrics.json")))
        else:
            reason = "--val_fraction 0" if not getattr(data_args, "val_fraction", None) else "no validation images"
            rows.append(("validation", f"none ({reason}): no validation figure; evaluate on held-out images"))
        commands = next_commands(out, data_args.data_dir)
    if getattr(training_args, "push_final_to_hub", False):
        rows.append(("hub", f"uploaded to https://huggingface.co/{training_args.hub_model_id}"))
    width = max(len(name) for name, _ in rows)
    lines = ["", "hf-histo run summary", *(f"  {name:<{width}}  {value}" for name, value in rows), "next:"]
    return "\n".join(lines + [f"  {c}" for c in commands])


def print_run_summary(
    training_args: Any,
    data_args: Any,
    result: ImageLevelResult | None = None,
    cv: Mapping[str, Any] | None = None,
) -> None:
    """Print `run_summary` once, from the main process (the other DDP ranks print nothing)."""
    if getattr(training_args, "process_index", 0) != 0:
        return
    print(run_summary(training_args, data_args, result=result, cv=cv), flush=True)
