"""Tests of HistoTrainer and its pieces: arguments, gated unfreezing, sampler, streaming metrics, artefacts, resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification, EvalPrediction, TrainerCallback

from hf_histo.data.builder import load_patch_dataset
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.synthetic import make_synthetic_dataset
from hf_histo.data.transforms import PatchCollator
from hf_histo.inference.evaluate import evaluate_model
from hf_histo.inference.metrics import classification_metrics
from hf_histo.inference.results import ImageLevelResult
from hf_histo.models.aggregation import aggregate_by_image
from hf_histo.models.ensemble import FoldEnsemble
from hf_histo.training.arguments import DataArguments, HistoTrainingArguments, ModelArguments, parse_args
from hf_histo.training.callbacks import ProgressiveUnfreezeCallback, logged_evaluation
from hf_histo.training.cross_validation import summarize_folds
from hf_histo.training.finalize import finalize_run
from hf_histo.training.metrics import ImageLevelMetrics
from hf_histo.training.run import build_model, with_patch_transforms
from hf_histo.training.trainer import (
    BalancedSampler,
    HistoTrainer,
    build_training_loss,
)

METRIC_KEYS = {"macro_f1", "balanced_accuracy", "accuracy", "auroc", "kappa", "per_class_f1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """12 synthetic images of ~200 px cut into 64 px tiles: (data_dir, DatasetDict, cache_dir)."""
    root = tmp_path_factory.mktemp("tiny_training")
    data_dir = make_synthetic_dataset(root / "data", n_train=12, n_test=2, size_range=(160, 224), seed=0)
    patching = PatchingConfig(strategy="grid", patch_size=64, min_foreground=200)
    data = load_patch_dataset(data_dir, patching, val_fraction=0.34, cache_dir=root / "cache")
    return data_dir, data, root / "cache"


def _trainer(tiny, out_dir: Path, family: str = "vit", model_kw=None, data_kw=None, callbacks=None, **train_kw):
    data_dir, data, cache = tiny
    data_args = DataArguments(
        **{"data_dir": str(data_dir), "patch_size": 64, "augment": "none", "cache_dir": str(cache), **(data_kw or {})}
    )
    model_args = ModelArguments(model_name_or_path=f"tiny-{family}", **(model_kw or {}))
    defaults = dict(
        output_dir=str(out_dir),
        use_cpu=True,
        seed=0,
        data_seed=0,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        num_train_epochs=2,
        learning_rate=1e-3,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_total_limit=None,
        n_bootstrap=50,
    )
    defaults.update(train_kw)
    args = HistoTrainingArguments(**defaults)
    torch.manual_seed(0)
    labels = data["train"].features["label"].names
    model, processor = build_model(model_args, labels, patching=data_args.patching())
    train_dataset, eval_dataset = with_patch_transforms(data, processor, data_args)
    return HistoTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PatchCollator(),
        processing_class=processor,
        callbacks=callbacks,
    )


# ---- arguments -----------------------------------------------------------------------------------------------
def test_argument_precedence_recipe_demo_config_cli(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.002\nstrategy: topk\nnum_train_epochs: 7\n")
    defaults = {"learning_rate": 1e-5, "optim_name": "lion", "unfreeze_every_epochs": 20, "num_train_epochs": 60}
    data_args, model_args, args = parse_args(
        defaults,
        ["--data_dir", "D", "--output_dir", str(tmp_path), "--config", str(config), "--num_train_epochs", "2"],
    )
    assert (args.learning_rate, args.optim_name, data_args.strategy, args.num_train_epochs) == (
        2e-3,
        "lion",
        "topk",
        2,
    )
    assert args.metric_for_best_model == "image_macro_f1" and args.greater_is_better and args.load_best_model_at_end
    assert args.batch_eval_metrics and not args.remove_unused_columns
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"loss": "weighted_ce", "class_weights": [1, 2, 3, 4]}))
    data_args, model_args, args = parse_args(defaults, ["--demo", f"--config={config}", "--output_dir", str(tmp_path)])
    assert args.loss == "weighted_ce" and args.class_weights == [1, 2, 3, 4]
    assert model_args.model_name_or_path == "tiny-vit" and data_args.data_dir == str(tmp_path / "demo_data")
    assert args.num_train_epochs == 3 and args.unfreeze_every_epochs == 1  # demo defaults


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategy", "random"], "--strategy='random' is not supported"),
        (["--fold", "3"], "--fold 3 needs --n_folds"),
        (["--n_folds", "1"], "--n_folds must be >= 2"),
        (["--freeze", "last_n"], "--freeze last_n needs --trainable_blocks"),
        (["--lora_r", "8", "--freeze", "backbone"], "leave --freeze none"),
        (["--optim_name", "adam"], "--optim_name='adam' is not supported"),
        (["--layer_decay", "0"], "--layer_decay must be in"),
        (["--frozen_head_learning_rate", "1e-3"], "need --unfreeze_every_epochs"),
        (["--class_weights", "1", "2"], "--class_weights needs --loss weighted_ce or focal"),
        (["--early_stopping_patience", "2", "--eval_strategy", "no"], "needs an eval strategy"),
        (["--tta", "five_crop"], "--tta='five_crop' is not supported"),
        (["--ema_decay", "1"], "--ema_decay must be in"),
    ],
)
def test_bad_arguments_name_the_fix(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_args({}, ["--data_dir", "D", "--output_dir", str(tmp_path), *argv])


def test_one_fold_of_a_cv_run_chooses_nothing_on_its_held_out_images(tmp_path):
    """`--n_folds 5 --fold k` trains fold k as the whole `--n_folds 5` run does: the held-out images only score it."""
    argv = ["--data_dir", "D", "--n_folds", "5", "--fold", "2", "--early_stopping_patience", "2"]
    _, _, args = parse_args({}, [*argv, "--output_dir", str(tmp_path / "fold")])
    assert not args.load_best_model_at_end and args.early_stopping_patience is None
    _, _, single = parse_args({}, ["--data_dir", "D", "--output_dir", str(tmp_path / "single")])
    assert single.load_best_model_at_end  # a plain run keeps choosing on its own validation split


def test_unknown_names_in_a_config_file_are_rejected(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("lerning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown argument names \\['lerning_rate'\\]"):
        parse_args({}, ["--data_dir", "D", "--config", str(config)])
    with pytest.raises(ValueError, match="--data_dir is required"):
        parse_args({}, ["--output_dir", str(tmp_path)])


# ---- progressive unfreezing ------------------------------------------------------------------------------------
def test_unfreeze_schedule_from_the_output_side():
    callback = ProgressiveUnfreezeCallback(every_epochs=20, blocks_per_step=2)
    blocks = ["embeddings", "b0", "b1", "b2", "b3", "b4", "post_backbone"]
    assert callback.schedule(blocks) == {
        "b4": 20,
        "b3": 20,
        "post_backbone": 20,
        "b2": 40,
        "b1": 40,
        "b0": 60,
        "embeddings": 60,
    }
    assert ProgressiveUnfreezeCallback(5, 1, start_epoch=2).schedule(["b0", "b1"]) == {"b1": 2, "b0": 7}


def test_gated_blocks_train_exactly_like_frozen_ones(tiny, tmp_path):
    """Gating (LR 0, no gradients) gives the same head as requires_grad=False freezing and leaves blocks intact."""
    common = dict(num_train_epochs=1, eval_strategy="no", save_strategy="no", weight_decay=0.1, max_grad_norm=0.5)
    gated = _trainer(tiny, tmp_path / "gated", unfreeze_every_epochs=5, **common)
    initial = {n: p.detach().clone() for n, p in gated.model.named_parameters()}
    gated.train()
    frozen = _trainer(tiny, tmp_path / "frozen", model_kw={"freeze": "backbone"}, **common)
    frozen.train()
    for name, param in gated.model.named_parameters():
        if name.startswith("backbone."):
            assert torch.equal(param, initial[name]), name
            assert param.requires_grad  # in the optimizer and under DDP all along
            assert not gated.optimizer.state.get(param)  # no moments accumulated while gated
        else:
            torch.testing.assert_close(param, dict(frozen.model.named_parameters())[name], atol=1e-6, rtol=1e-5)
    assert not torch.equal(gated.model.classifier[-1].weight, initial["classifier.1.weight"])


def test_blocks_unfreeze_at_their_epoch_and_then_train(tiny, tmp_path):
    from digests import ParamDigestCallback

    digests = ParamDigestCallback(str(tmp_path / "digests"))
    trainer = _trainer(
        tiny,
        tmp_path / "out",
        family="convnext",
        callbacks=[digests],
        num_train_epochs=3,
        eval_strategy="no",
        save_strategy="no",
        unfreeze_every_epochs=1,
        unfreeze_blocks=2,
        block_granularity="stage",
    )
    trainer.train()
    begin, (epoch1, epoch2, epoch3) = digests.record["begin"], digests.record["epochs"]
    moved = {
        e: {k for k, v in d["digests"].items() if v != begin[k]} for e, d in zip((1, 2, 3), (epoch1, epoch2, epoch3))
    }
    assert moved[1] == {"head"}
    assert moved[2] == {"head", "post_backbone", "encoder.stages.3", "encoder.stages.2"}
    assert moved[3] == set(begin)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressiveUnfreezeCallback))
    assert [len(e["trainable_blocks"]) for e in callback.history] == [0, 3, 6]
    assert (tmp_path / "digests" / "rank0.json").is_file()


# ---- sampler, loss, metrics ------------------------------------------------------------------------------------
def test_balanced_sampler_is_balanced_and_seeded():
    labels = [0] * 90 + [1] * 10
    sampler = BalancedSampler(labels, seed=1, num_samples=4000)
    draws = list(sampler)
    share = np.mean([labels[i] for i in draws])
    assert 0.45 < share < 0.55
    assert draws == list(sampler)
    sampler.set_epoch(1)
    assert draws != list(sampler)


def test_weighted_loss_from_training_counts():
    args = HistoTrainingArguments(output_dir="unused", loss="weighted_ce", use_cpu=True, report_to="none")
    loss = build_training_loss(args, [0, 0, 0, 1], num_labels=2)
    torch.testing.assert_close(loss.weight, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="3 values for 2 classes"):
        args.class_weights = [1.0, 2.0, 3.0]
        build_training_loss(args, None, num_labels=2)


def test_streaming_metrics_match_the_batch_metrics():
    rng = np.random.default_rng(0)
    ids = [f"img{i // 5}" for i in range(40)]
    labels = np.array([int(i[3:]) % 3 for i in ids])
    logits = rng.normal(size=(40, 3)) + np.eye(3)[labels] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    foreground = rng.uniform(0.1, 1.0, 40)
    ds = __import__("datasets").Dataset.from_dict({"image_id": ids, "foreground": foreground})
    for aggregation in ("soft", "hard", "mask_weighted"):
        metrics = ImageLevelMetrics(["a", "b", "c"], aggregation)
        metrics.start(ds)
        out = {}
        for start in range(0, 40, 16):
            stop = min(start + 16, 40)
            pred = EvalPrediction(
                predictions=torch.tensor(probs[start:stop]), label_ids=torch.tensor(labels[start:stop])
            )
            out = metrics(pred, compute_result=stop == 40)
        weights = foreground if aggregation == "mask_weighted" else None
        image_ids, image_probs = aggregate_by_image(ids, probs, aggregation, weights)
        expected = classification_metrics([int(i[3:]) % 3 for i in image_ids], image_probs, ["a", "b", "c"])
        for key in ("macro_f1", "accuracy", "balanced_accuracy", "auroc"):
            assert out[f"image_{key}"] == pytest.approx(expected[key]), (aggregation, key)
        assert out["image_n"] == 8 and out["patch_n"] == 40
        patch = classification_metrics(labels, probs, ["a", "b", "c"])
        assert out["patch_macro_f1"] == pytest.approx(patch["macro_f1"])


# ---- end to end ------------------------------------------------------------------------------------------------
def test_train_finalize_and_evaluate(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path / "run", loss="weighted_ce", tta="flips", model_kw={"aggregation": "hard"})
    trainer.train()
    best = AutoModelForImageClassification.from_pretrained(trainer.state.best_model_checkpoint)
    for (name, a), b in zip(trainer.model.named_parameters(), best.parameters()):
        assert torch.equal(a, b), f"load_best_model_at_end did not restore {name}"
    data_args = DataArguments(data_dir=str(tiny[0]), patch_size=64)
    result = finalize_run(trainer, tiny[1], data_args, run_info={"recipe": "test"})
    out = tmp_path / "run"
    for name in ("metrics.json", "splits.json", "confusion_matrix.png", "training_curves.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics["metrics"]) and METRIC_KEYS <= set(metrics["patch_metrics"])
    low, high = metrics["ci"]["macro_f1"]
    assert 0 <= low <= metrics["metrics"]["macro_f1"] <= high <= 1
    assert metrics["aggregation"] == "hard" and metrics["tta"] == "flips" and metrics["run"] == {"recipe": "test"}
    assert ImageLevelResult.load(out / "metrics.json") == result
    validation = sorted(set(tiny[1]["validation"]["image_id"]))
    assert sorted(result.image_ids) == validation == json.loads((out / "splits.json").read_text())["validation"]
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.patching["patch_size"] == 64 and model.config.aggregation == "hard"
    assert model.config.tta == "flips"
    assert (out / "preprocessor_config.json").is_file()

    evaluated = evaluate_model(out, tiny[0], tmp_path / "eval.json", progress=False)
    assert METRIC_KEYS <= set(evaluated.metrics) and METRIC_KEYS <= set(evaluated.patch_metrics)
    assert evaluated.n_images == 12 and evaluated.tta == "flips" and evaluated.aggregation == "hard"
    assert json.loads((tmp_path / "eval.json").read_text())["image_ids"] == evaluated.image_ids
    by_id = dict(zip(evaluated.image_ids, evaluated.probs_array))
    for image_id, probs in zip(result.image_ids, result.probs_array):
        np.testing.assert_allclose(by_id[image_id], probs, atol=1e-5)


class _StopAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_gives_the_same_final_metrics(tiny, tmp_path):
    """A run killed after a mid-epoch checkpoint and resumed ends like the uninterrupted run (random augmentation,
    dropout, class-weighted loss, progressive unfreezing across the resumed epochs included)."""
    kw = dict(
        num_train_epochs=3,
        unfreeze_every_epochs=1,
        loss="weighted_ce",
        data_kw={"augment": "histo"},
        model_kw={"dropout": 0.2},
        full_determinism=True,
    )
    steps_per_epoch = -(-len(tiny[1]["train"]) // 8)
    kw.update(save_strategy="steps", eval_strategy="steps", save_steps=3, eval_steps=3)
    stop = 3 * (steps_per_epoch // 3 + 1)
    assert stop % steps_per_epoch and stop > steps_per_epoch, "the checkpoint must fall inside the second epoch"
    full = _trainer(tiny, tmp_path / "full", **kw)
    full.train()
    final_full = full.evaluate()

    killed = _trainer(tiny, tmp_path / "resumed", callbacks=[_StopAfter(stop)], **kw)
    killed.train()
    checkpoint = tmp_path / "resumed" / f"checkpoint-{stop}"
    assert checkpoint.is_dir()
    resumed = _trainer(tiny, tmp_path / "resumed", **kw)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final_resumed = resumed.evaluate()
    for key in ("eval_loss", "eval_image_macro_f1", "eval_patch_macro_f1", "eval_patch_auroc"):
        assert final_resumed[key] == pytest.approx(final_full[key], abs=1e-6), key
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_fold_summary_and_ensemble(tiny, tmp_path):
    dirs = []
    for fold, seed in ((0, 0), (1, 1)):
        trainer = _trainer(
            tiny,
            tmp_path / f"fold_{fold}",
            num_train_epochs=1,
            seed=seed,
            save_strategy="no",
            load_best_model_at_end=False,
        )
        trainer.train()
        finalize_run(trainer, tiny[1], DataArguments(data_dir=str(tiny[0]), patch_size=64))
        dirs.append(tmp_path / f"fold_{fold}")
    # Both "folds" scored the same validation images here: summarize_folds must refuse the overlap.
    with pytest.raises(ValueError, match="already held out"):
        summarize_folds(dirs)
    for fold_dir in dirs:  # finalize_run(save_model=True) wrote each fold's model and processor
        assert (fold_dir / "config.json").is_file() and (fold_dir / "preprocessor_config.json").is_file()
    ensemble = FoldEnsemble.from_pretrained(tmp_path)
    assert len(ensemble.models) == 2
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(pixel_values=x).logits, -1) for m in ensemble.models]).mean(0)
        torch.testing.assert_close(ensemble(x).logits.exp(), expected)


# ---- weight EMA ------------------------------------------------------------------------------------------------
class _RawWeights(TrainerCallback):
    """The training weights after each optimizer step (callbacks passed in run before `WeightEmaCallback`)."""

    def __init__(self):
        self.states = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def test_the_model_ends_with_the_warmed_up_average_of_its_steps(tiny, tmp_path):
    raw = _RawWeights()
    trainer = _trainer(tiny, tmp_path / "run", ema_decay=0.9, eval_strategy="no", save_strategy="no", callbacks=[raw])
    trainer.train()
    expected = None
    for step, weights in enumerate(raw.states, start=1):
        decay = 0.0 if step == 1 else min(0.9, 1 - step ** (-2 / 3))  # timm's warm-up: 1 - (1 + (step - 1))^-2/3
        if expected is None:
            expected = {k: v.clone() for k, v in weights.items()}
        for k, v in weights.items():
            expected[k] = expected[k] * decay + v * (1 - decay) if v.is_floating_point() else v.clone()
    final = trainer.model.state_dict()
    assert len(raw.states) > 5
    for k, v in final.items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=1e-5, msg=k)
    last = raw.states[-1]
    assert any(not torch.allclose(final[k], last[k]) for k in last if last[k].is_floating_point())


def test_evaluations_score_the_average_and_the_best_checkpoint_keeps_its_own(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path / "run", ema_decay=0.8, num_train_epochs=3, metric_for_best_model="eval_loss")
    trainer.args.greater_is_better = False
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best and (Path(best) / "ema.pt").is_file()
    logged = logged_evaluation(trainer.state.log_history, trainer.state.best_global_step, "eval_loss")
    again = trainer.evaluate()  # the model now holds the best checkpoint's average, scored as during training
    assert again["eval_loss"] == pytest.approx(logged["eval_loss"], abs=1e-5)
    assert again["eval_image_macro_f1"] == pytest.approx(logged["eval_image_macro_f1"])


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_continues_the_average(tiny, tmp_path, ema_decay):
    kw = dict(ema_decay=ema_decay, save_strategy="steps", save_steps=3, eval_strategy="no", full_determinism=True)
    full = _trainer(tiny, tmp_path / "full", **kw)
    full.train()
    _trainer(tiny, tmp_path / "resumed", callbacks=[_StopAfter(3)], **kw).train()
    resumed = _trainer(tiny, tmp_path / "resumed", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    if ema_decay:  # a checkpoint without the average cannot continue one
        plain = _trainer(tiny, tmp_path / "plain", callbacks=[_StopAfter(3)], **{**kw, "ema_decay": 0.0})
        plain.train()
        with pytest.raises(FileNotFoundError, match="saved without --ema_decay"):
            _trainer(tiny, tmp_path / "plain", **kw).train(resume_from_checkpoint=str(tmp_path / "plain/checkpoint-3"))


# ---- precise BatchNorm -----------------------------------------------------------------------------------------
class _BatchNormInputs:
    """Per-channel means and unbiased variances of the batches a BatchNorm layer sees while the hook is on."""

    def __init__(self, layer: torch.nn.Module):
        self.means, self.variances, self.samples = [], [], 0
        self.handle = layer.register_forward_pre_hook(self)

    def __call__(self, module, args):
        x = args[0].detach()
        self.means.append(x.mean(dim=(0, 2, 3)))
        self.variances.append(x.var(dim=(0, 2, 3), unbiased=True))
        self.samples += x.shape[0]


def test_precise_bn_gives_the_final_weights_the_average_statistics_of_one_pass(tiny, tmp_path):
    no_jitter = {"color_jitter": 0.0, "hed_jitter": 0.0}
    kw = dict(family="resnet", data_kw=no_jitter, eval_strategy="no", save_strategy="no", num_train_epochs=2)
    plain = _trainer(tiny, tmp_path / "plain", **kw)
    plain.train()
    trainer = _trainer(tiny, tmp_path / "precise", precise_bn=True, **kw)
    layers = [m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen = [_BatchNormInputs(m) for m in layers]
    trainer.train()  # trains exactly as `plain`, then one pass to recompute the statistics
    for layer, inputs in zip(layers, seen):
        inputs.handle.remove()
        assert inputs.samples == (kw["num_train_epochs"] + 1) * len(trainer.train_dataset)  # the pass sees each once
        n = len(inputs.means) - trainer.state.global_step  # its batches come after the training steps' ones
        torch.testing.assert_close(layer.running_mean, torch.stack(inputs.means[-n:]).mean(0))
        torch.testing.assert_close(layer.running_var, torch.stack(inputs.variances[-n:]).mean(0))
    plain_layers = [m for m in plain.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for a, b in zip(layers, plain_layers):
        torch.testing.assert_close(a.weight, b.weight)  # the same training: only the statistics differ
    assert not all(torch.allclose(a.running_mean, b.running_mean) for a, b in zip(layers, plain_layers))


def test_precise_bn_keeps_gated_blocks_and_leaves_models_without_batchnorm(tiny, tmp_path):
    off = dict(num_train_epochs=1, eval_strategy="no", save_strategy="no")
    gated = _trainer(tiny, tmp_path / "gated", family="resnet", unfreeze_every_epochs=5, **off)
    gated.train()
    before = {k: v.clone() for k, v in gated.model.state_dict().items() if "running" in k}
    assert before and gated.recompute_batchnorm_statistics() == 0  # the whole backbone is still gated
    assert all(torch.equal(v, gated.model.state_dict()[k]) for k, v in before.items())
    vit = _trainer(tiny, tmp_path / "vit", precise_bn=True, **off)
    vit.train()
    assert vit.recompute_batchnorm_statistics() == 0
