"""The model card (README.md) of a saved ROI segmentation folder: how to use it, what it was trained on, its scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..utils import atomic_write_text

_USAGE = """\
## How to use

```python
from transformers import pipeline

segment = pipeline("image-segmentation", model="{repo}", trust_remote_code=True)
masks = segment("tissue.png")  # one mask per class, at the image's size
```

`pipeline("image-segmentation")` runs the whole image in one pass. hf-histo runs it the way it was scored,
over overlapping {window} px windows with blended logits, on images of any size:

```bash
hf-histo segment --model {repo} --data IMAGES --out MASKED   # masks/*.png + a data folder every command reads
hf-histo predict --model CLASSIFIER --data IMAGES --out OUT --roi_model {repo}  # patches where this model says
```
"""


def _scores_table(record: dict[str, Any]) -> str:
    scores = record.get("validation")
    if not scores:
        return (
            "Trained on all labelled images (no validation split): see the cross-validation figures of the run "
            "that chose the settings (`cv_metrics.json` of `--n_folds` runs).\n"
        )
    rows = ["| class | IoU | Dice |", "|---|---|---|"]
    rows += [f"| {name} | {scores['iou'][name]:.3f} | {scores['dice'][name]:.3f} |" for name in record["labels"]]
    return (
        f"Validation: {record['n_validation_images']} whole images (patient-grouped split), sliding-window "
        f"inference, pixels pooled. Mean IoU (background excluded) **{scores['mean_iou']:.3f}**, mean Dice "
        f"**{scores['mean_dice']:.3f}**, pixel accuracy {scores['pixel_accuracy']:.3f}.\n\n" + "\n".join(rows) + "\n"
    )


def write_segmentation_card(output_dir: str | Path, record: dict[str, Any], settings: dict[str, Any]) -> Path:
    """Write ``output_dir/README.md`` (atomically) for a segmentation folder.

    Args:
        output_dir: The saved model folder.
        record: The run's metrics record (`train_segmentation`).
        settings: The run's `SegmentationArguments` as a dict.
    """
    output_dir = Path(output_dir)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=["histopathology", "hf-histo", "semantic-segmentation", "roi"],
    )
    architecture = f"{record['architecture']} ({record['encoder']} encoder)"
    body = "\n".join(
        [
            "---",
            data.to_yaml(),
            "---",
            "",
            f"# ROI segmentation: {architecture}",
            "",
            f"Predicts the region of interest of histology images ({', '.join(record['labels'])}), trained with "
            f"hf-histo's `recipes/roi_segmentation.py` on {record['n_train_images']} images "
            f"({settings.get('crop_size')} px random crops, flips, quarter turns, colour jitter; class-weighted "
            f"cross-entropy + {settings.get('dice_weight')} x Dice) in {record['train_seconds']:.0f} s.",
            "",
            "## Results",
            "",
            _scores_table(record),
            _USAGE.format(repo=output_dir.name, window=settings.get("window_size")),
        ]
    )
    path = output_dir / "README.md"
    ModelCard(body)  # validates the metadata block
    atomic_write_text(path, body)
    return path
