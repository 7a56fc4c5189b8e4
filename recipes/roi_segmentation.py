"""ROI segmentation: a U-Net learns the region-of-interest masks, so new images without masks get mask-guided patches.

Seed 004's system (U-Net, class-weighted cross-entropy, mean IoU without the background, resumable runs) on the
image+mask pairs of any layout: random full-resolution crops with quarter turns, flips and colour jitter, weighted
cross-entropy + Dice, a patient-grouped split or k-fold CV, scored on whole validation images by the same
sliding-window inference `hf-histo segment` and `--roi_model` use. The default (U-Net, ResNet-18 encoder, light
decoder, from scratch) was chosen against SegFormer-B0 on GlaS CV (recipes/README.md). Binary masks (any non-zero
value is ROI) or multi-class index masks (`--mask_mode multiclass --classes background,tumour,stroma`, unannotated
pixels `--ignore_index 255`).

Launch:

    python recipes/roi_segmentation.py --data_dir ../shared/data/glas_train --output_dir runs/roi
    python recipes/roi_segmentation.py --data_dir DATA --output_dir OUT --n_folds 5        # grouped 5-fold CV
    python recipes/roi_segmentation.py --data_dir DATA --output_dir OUT --val_fraction 0   # the model you ship
    accelerate launch recipes/roi_segmentation.py --data_dir DATA --output_dir OUT --encoder_weights imagenet
    python recipes/roi_segmentation.py --demo --output_dir runs/roi_demo                   # generated data, ~1 min

An interrupted run resumes from its last checkpoint (rerun the same command); a CV run skips the folds already
finished; a finished run is replaced only with --overwrite_output_dir true. Any TrainingArguments flag works.
"""

import sys

from transformers import HfArgumentParser, TrainingArguments, set_seed

from hf_histo.hub import write_segmentation_card
from hf_histo.training.arguments import exit_on_data_error
from hf_histo.training.run import setup_logging
from hf_histo.training.segmentation import cross_validate_segmentation, segmentation_splits, train_segmentation
from hf_histo.training.segmentation_data import SegmentationArguments, data_folder

RECIPE_DEFAULTS = dict(
    num_train_epochs=8,  # 8 x 6 crops of 256 px per image: ~14 min for 68 GlaS images on 2 CPU cores
    per_device_train_batch_size=8,
    learning_rate=1e-3,  # AdamW from scratch
    weight_decay=1e-4,
    lr_scheduler_type="cosine",
    warmup_steps=0.05,
    logging_steps=10,
    save_strategy="epoch",  # resumable: the last epoch's checkpoint is kept until the folder is complete
    save_total_limit=1,
    report_to="none",
    dataloader_num_workers=0,
)
DEMO_DEFAULTS = dict(
    num_train_epochs=4, encoder_depth=3, decoder_channels="16,8,8", crop_size=128, crops_per_image=4, window_size=256
)


def parse() -> tuple[SegmentationArguments, TrainingArguments]:
    """Recipe defaults < --demo defaults < command line."""
    if sys.excepthook is sys.__excepthook__:  # data errors end as `error: <message>`, status 2
        sys.excepthook = exit_on_data_error
    parser = HfArgumentParser((SegmentationArguments, TrainingArguments))
    parser.set_defaults(**RECIPE_DEFAULTS)
    if "--demo" in sys.argv:
        parser.set_defaults(**DEMO_DEFAULTS)
    return parser.parse_args_into_dataclasses()


def main(args: SegmentationArguments, training_args: TrainingArguments) -> dict:
    setup_logging()
    set_seed(training_args.seed)
    args.data_dir = data_folder(args, training_args.output_dir)
    if args.n_folds:
        summary = cross_validate_segmentation(args, training_args, write_segmentation_card)
        print(
            f"{args.n_folds}-fold CV: mean Dice {summary['mean']['mean_dice']:.3f} ± {summary['std']['mean_dice']:.3f}, "
            f"mean IoU {summary['mean']['mean_iou']:.3f} ± {summary['std']['mean_iou']:.3f} "
            f"({training_args.output_dir}/cv_metrics.json)"
        )
        return summary
    train, validation = segmentation_splits(args, training_args.seed)
    record = train_segmentation(args, training_args, train, validation, write_segmentation_card)
    if "validation" in record:
        scores = record["validation"]
        print(
            f"validation ({len(validation)} images): mean Dice {scores['mean_dice']:.3f}, mean IoU {scores['mean_iou']:.3f}"
        )
    print(
        f"model: {training_args.output_dir}  (next: hf-histo segment IMAGES --model {training_args.output_dir} --out OUT)"
    )
    return record


if __name__ == "__main__":
    main(*parse())
