"""Phikon frozen + deep head on the top-12 tiles of 128 px, CutMix, flip TTA at evaluation (seed 002's best system).

The seed's best leaderboard system (0.425 on the 4-class challenge): Phikon (a ViT-B/16 pretrained with iBOT on
40M histology tiles) as a frozen feature extractor, a deep head (4 x [Linear, GELU, LayerNorm, Dropout] ->
Linear), the 12 tiles of 128 px (stride 64) with the most mask per image, flips / rotations / colour jitter and
CutMix while training, and the softmax averaged over horizontal/vertical flips at evaluation.

With `--augment flips --cutmix_alpha 0` (or `none`) the backbone sees a finite set of views, so every tile is
embedded once and cached next to the patch dataset; the head then trains on the cached features (one
flip/rotation view drawn per tile and step; TTA averages cached views), typically 50-500x faster per epoch.

Launch:

    accelerate launch recipes/phikon_frozen.py --data_dir DATA --output_dir runs/phikon
    accelerate launch recipes/phikon_frozen.py --data_dir DATA --output_dir OUT --augment flips --cutmix_alpha 0
    python recipes/phikon_frozen.py --demo --output_dir runs/demo_phikon

--model_name_or_path takes a Hub id or a local copy of owkin/phikon; --n_folds 5 runs grouped CV.
"""

from transformers import set_seed

from hf_histo.data.transforms import PatchCollator, build_batch_mixer
from hf_histo.hub import save_run
from hf_histo.training.arguments import parse_args
from hf_histo.training.cross_validation import run_cross_validation
from hf_histo.training.embeddings import prepare_cached_head
from hf_histo.training.finalize import finalize_run
from hf_histo.training.run import (
    build_datasets,
    build_model,
    embedding_cache_applies,
    run_info,
    setup_logging,
    with_patch_transforms,
)
from hf_histo.training.summary import print_run_summary
from hf_histo.training.trainer import HistoTrainer

RECIPE_DEFAULTS = dict(
    model_name_or_path="phikon",  # owkin/phikon; "phikon-v2" or any ViT/DINOv2 folder works the same way
    demo_model="tiny-vit",
    strategy="topk",  # the 12 tiles of 128 px (stride 64) covering the most mask
    patch_size=128,
    stride=64,
    top_k=12,
    freeze="backbone",  # the seed's unfreezing of the last block overfitted and cost compute
    head="deep",  # 4 x [Linear, GELU, LayerNorm, Dropout] -> Linear
    head_hidden=512,
    head_layers=4,
    dropout=0.3,
    augment="histo",  # flips, quarter turns, resized crops, colour + HED jitter; "flips" enables the cache
    crop_scale_min=0.8,
    cutmix_alpha=1.0,  # CutMix between classes with proportional label mixing (0 enables the cache)
    tta="flips",  # average softmax over identity, horizontal and vertical flips
    learning_rate=5e-4,  # the head (nothing else trains)
    weight_decay=1e-4,
    loss="ce",
    aggregation="soft",
    num_train_epochs=30,
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

    mixer = build_batch_mixer(len(labels), data_args.cutmix_alpha, data_args.mixup_alpha, data_args.mix_prob)
    if embedding_cache_applies(model, data_args, training_args):  # embed every tile once, train the head only
        model.to(training_args.device)
        # every process embeds its shard of the tiles (so no main_process_first); the shards join into one cache
        trainable, train_dataset, eval_dataset = prepare_cached_head(
            model,
            data,
            processor,
            data_args.augment,
            training_args.tta,
            batch_size=training_args.per_device_eval_batch_size,
            cache_dir=data_args.cache_dir,
            num_workers=training_args.dataloader_num_workers,
        )
        collator = PatchCollator(input_name="embeddings")
    else:
        trainable, collator = model, PatchCollator()
        train_dataset, eval_dataset = with_patch_transforms(data, processor, data_args, device=training_args.device)

    trainer = HistoTrainer(
        model=trainable,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        batch_mixer=mixer,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    info = run_info("phikon_frozen", data_args, model_args, training_args)
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
