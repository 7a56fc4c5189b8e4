"""timm EfficientNet-B0, frozen except its normalisation layers, with an MLP head (seed 002).

The seed's first transfer-learning system (0.396 on the challenge leaderboard): ImageNet EfficientNet-B0 with
the convolutional backbone frozen but BatchNorm/GroupNorm affine parameters trainable (domain adaptation of the
feature statistics), a new head Linear -> ReLU -> Dropout -> Linear, trained on the 12 tiles of 128 px (stride
64) with the most mask, with flips, rotations and colour jitter. Any `timm/...` Hub id works as the backbone.

Launch:

    accelerate launch recipes/efficientnet_frozen_norm.py --data_dir DATA --output_dir runs/effnet
    python recipes/efficientnet_frozen_norm.py --demo --output_dir runs/demo_effnet

Any TrainingArguments flag works; --n_folds 5 runs grouped CV.
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
    model_name_or_path="efficientnet-b0",  # timm/efficientnet_b0.ra_in1k through transformers' TimmWrapper
    demo_model="tiny-timm",
    strategy="topk",  # the 12 tiles of 128 px (stride 64) covering the most mask
    patch_size=128,
    stride=64,
    top_k=12,
    freeze="backbone_except_norm",  # norm layers adapt to H&E statistics, the convolutions stay ImageNet's
    head="mlp",
    head_hidden=256,
    head_activation="relu",
    dropout=0.4,
    augment="histo",  # flips, quarter turns, resized crops, colour and HED stain jitter
    learning_rate=1e-3,  # head + norm parameters
    weight_decay=1e-4,
    loss="ce",
    aggregation="soft",
    num_train_epochs=20,
    per_device_train_batch_size=64,
    per_device_eval_batch_size=128,
    lr_scheduler_type="cosine",
    warmup_steps=0.05,
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
    info = run_info("efficientnet_frozen_norm", data_args, model_args, training_args)
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
