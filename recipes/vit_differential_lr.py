"""ViT with a differential learning rate on 224 px tiles: head first, then the last block (seed 001).

The seed's best system (40.7 macro-F1 on the 4-class challenge): 224 x 224 tiles with >= 200 mask pixels, an
ImageNet ViT-B/16 whose head is trained first (head LR 3e-4), then the last transformer block is unfrozen and
trained with backbone LR 1e-5 and head LR 3e-5; dropout 0.2, weight decay 1e-4, no augmentation (every scheme
hurt there), hard voting of tiles. The earlier blocks stay frozen (`--freeze last_n --trainable_blocks 1`); the
last block is gated by ProgressiveUnfreezeCallback until `--unfreeze_every_epochs`.

Launch:

    accelerate launch recipes/vit_differential_lr.py --data_dir DATA --output_dir runs/vit
    python recipes/vit_differential_lr.py --demo --output_dir runs/demo_vit

Any TrainingArguments flag works (--bf16, --num_train_epochs ...); --n_folds 5 runs grouped CV.
"""

from transformers import set_seed

from hf_histo.data.transforms import PatchCollator, build_batch_mixer
from hf_histo.hub import save_run
from hf_histo.training.arguments import parse_args
from hf_histo.training.cross_validation import run_cross_validation
from hf_histo.training.finalize import finalize_run
from hf_histo.training.run import build_datasets, build_model, run_info, setup_logging, with_patch_transforms
from hf_histo.training.summary import print_run_summary
from hf_histo.training.trainer import HistoTrainer

RECIPE_DEFAULTS = dict(
    model_name_or_path="vit-base",  # google/vit-base-patch16-224-in21k; "phikon" for a histology ViT
    demo_model="tiny-vit",
    strategy="grid",  # 224 px tiles with >= 200 mask pixels
    patch_size=224,
    min_foreground=200,
    augment="none",  # the seed found every augmentation harmful on this data
    freeze="last_n",  # blocks before the last one never train
    trainable_blocks=1,
    unfreeze_every_epochs=5,  # head alone for 5 epochs, then the last block joins
    unfreeze_blocks=1,
    frozen_head_learning_rate=3e-4,  # head LR of the head-only phase
    learning_rate=1e-5,  # backbone (last block) after unfreezing
    head_learning_rate=3e-5,  # head after unfreezing
    weight_decay=1e-4,  # the seed's L2 during fine-tuning
    dropout=0.2,
    loss="ce",
    aggregation="hard",  # majority vote of tiles
    num_train_epochs=15,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    lr_scheduler_type="constant",
)


def main(data_args, model_args, training_args):
    setup_logging(training_args)
    set_seed(training_args.seed)
    with training_args.main_process_first(desc="patch dataset"):
        data = build_datasets(data_args, seed=training_args.seed)
    labels = data["train"].features["label"].names
    model, processor = build_model(model_args, labels, patching=data_args.patching(), image_size=data_args.image_size)
    train_dataset, eval_dataset = with_patch_transforms(data, processor, data_args, device=training_args.device)

    trainer = HistoTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PatchCollator(),
        processing_class=processor,
        batch_mixer=build_batch_mixer(len(labels), data_args.cutmix_alpha, data_args.mixup_alpha, data_args.mix_prob),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    info = run_info("vit_differential_lr", data_args, model_args, training_args)
    result = finalize_run(trainer, data, data_args, run_info=info, save_model=False)  # engine on validation images
    save_run(trainer, result, run=info)  # weights, processor, code, card, plots; uploaded with --push_to_hub
    return result


if __name__ == "__main__":
    data_args, model_args, training_args = parse_args(RECIPE_DEFAULTS)
    if data_args.n_folds and data_args.fold is None:
        cv = run_cross_validation(main, data_args, model_args, training_args)
        print_run_summary(training_args, data_args, cv=cv)  # mean ± std over folds, out-of-fold, next commands
    else:
        result = main(data_args, model_args, training_args)
        print_run_summary(training_args, data_args, result=result)  # model folder, kept epoch, next commands
