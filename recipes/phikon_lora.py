"""Phikon with LoRA (r=16) on the attention projections and a trainable head, merged into the weights at save.

A parameter-efficient middle ground between the frozen Phikon probe and full fine-tuning: low-rank adapters on
the query/key/value/output projections of every transformer block learn the task while the pretrained weights
stay frozen; the head is fully trained (peft `modules_to_save`, so it reloads correctly). `finalize_run` merges
the adapters, so the saved checkpoint is a plain classifier that needs no peft at inference.

Launch:

    accelerate launch recipes/phikon_lora.py --data_dir DATA --output_dir runs/phikon_lora
    python recipes/phikon_lora.py --demo --output_dir runs/demo_lora

Any TrainingArguments flag works (--bf16 on GPUs); --n_folds 5 runs grouped CV.
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
    model_name_or_path="phikon",  # owkin/phikon (ViT-B/16, iBOT on 40M TCGA tiles); or a local folder
    demo_model="tiny-vit",
    strategy="topk",  # 12 tiles of 128 px with the most mask (seed 002's patching)
    patch_size=128,
    stride=64,
    top_k=12,
    lora_r=16,
    lora_alpha=16,
    lora_dropout=0.1,
    lora_targets="q_proj,k_proj,v_proj,o_proj",  # transformers 5 ViT attention projections
    head="mlp",
    head_hidden=512,
    dropout=0.2,
    augment="histo",
    learning_rate=2e-4,  # LoRA adapters
    head_learning_rate=1e-3,
    weight_decay=1e-4,
    loss="ce",
    aggregation="soft",
    tta="flips",
    num_train_epochs=15,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
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
    info = run_info("phikon_lora", data_args, model_args, training_args)
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
