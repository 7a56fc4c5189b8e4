"""End of a run: score the final model on the validation images through the inference engine, write the run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import Trainer

from ..data.sources import read_samples
from ..data.transforms import make_image_processor
from ..inference.engine import InferenceEngine
from ..inference.evaluate import evaluate_samples
from ..inference.plots import plot_confusion_matrix, plot_training_curves
from ..inference.results import ImageLevelResult
from ..utils import atomic_write_text
from .metrics import dataset_column
from .trainer import final_model

SPLITS_NAME = "splits.json"


def split_image_ids(data: Any) -> dict[str, list[str]]:
    """``{split: [image_id, ...]}`` (sorted, unique) of a patch `DatasetDict`."""
    return {name: sorted({str(i) for i in dataset_column(split, "image_id") or []}) for name, split in data.items()}


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

    Writes (main process): `splits.json` (`{"train": [image_id, ...], "validation": [...], "test": [...]}`),
    `metrics.json` (the `ImageLevelResult` plus `run`, `best_checkpoint`, `global_step`, `epoch`),
    `confusion_matrix.png`, `training_curves.png`, and with `save_model` the model (LoRA merged) and its image
    processor.

    Args:
        trainer: A trained `HistoTrainer`.
        data: The patch `DatasetDict` the run trained on (its `image_id` columns give the splits).
        data_args: The run's `DataArguments` (where the images are: `data_dir`, `layout`, `exclude`).
        run_info: JSON-able facts stored under `"run"` (recipe name, data and model arguments).
        save_model: Save the model and processor.

    Returns:
        The validation `ImageLevelResult` on the main process when there is a validation split; None otherwise.
    """
    args = trainer.args
    output_dir = Path(args.output_dir)
    model = final_model(trainer)
    model.config.tta = getattr(args, "tta", "none")
    splits = split_image_ids(data)
    result = None
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / SPLITS_NAME, json.dumps(splits, indent=1) + "\n")
        processor = make_image_processor(trainer.processing_class)
        validation = set(splits.get("validation", []))
        if validation:
            sample_set = read_samples(data_args.data_dir, layout=data_args.layout, exclude=data_args.exclude)
            samples = [s for s in sample_set.samples if s.image_id in validation]
            engine = InferenceEngine(model, processor, batch_size=args.per_device_eval_batch_size)
            result = evaluate_samples(engine, samples, n_bootstrap=getattr(args, "n_bootstrap", 1000), seed=args.seed)
            result.save(
                output_dir / "metrics.json",
                run=run_info or {},
                best_checkpoint=trainer.state.best_model_checkpoint,
                global_step=trainer.state.global_step,
                epoch=trainer.state.epoch,
            )
            plot_confusion_matrix(
                result.metrics["confusion_matrix"],
                result.labels,
                output_dir / "confusion_matrix.png",
                title=f"image level ({result.aggregation}, TTA {result.tta}), macro-F1 {result.metrics['macro_f1']:.3f}",
            )
        plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
        if save_model:
            model.save_pretrained(output_dir)
            processor.save_pretrained(output_dir)
    trainer.accelerator.wait_for_everyone()
    return result
