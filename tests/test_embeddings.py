"""Tests of the frozen-backbone embedding cache: same predictions as the full model, cache keys, head training."""

import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_histo.data.builder import load_patch_dataset
from hf_histo.data.patching import PatchingConfig
from hf_histo.data.synthetic import make_synthetic_dataset
from hf_histo.data.transforms import PatchCollator, build_transforms, input_spec
from hf_histo.inference.engine import tta_views
from hf_histo.training.arguments import DataArguments, HistoTrainingArguments, ModelArguments
from hf_histo.training.embeddings import (
    HeadOnlyModel,
    cached_views_for,
    compute_embeddings,
    prepare_cached_head,
)
from hf_histo.training.finalize import finalize_run
from hf_histo.training.run import build_model
from hf_histo.training.trainer import HistoTrainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_embeddings")
    data_dir = make_synthetic_dataset(root / "data", n_train=10, n_test=0, size_range=(160, 224), seed=1)
    patching = PatchingConfig(strategy="grid", patch_size=64)
    data = load_patch_dataset(data_dir, patching, val_fraction=0.3, cache_dir=root / "cache")
    labels = data["train"].features["label"].names
    torch.manual_seed(0)
    model, processor = build_model(
        ModelArguments(model_name_or_path="tiny-vit", freeze="backbone", head="deep", head_hidden=16, head_layers=2),
        labels,
        patching=patching,
    )
    return root, data, model.eval(), processor


def _pixels(dataset, processor):
    transform = build_transforms(input_spec(processor), train=False)
    return torch.stack([transform(row["image"].convert("RGB")) for row in dataset])


def test_cached_path_gives_the_full_models_predictions(setup):
    root, data, model, processor = setup
    cached = compute_embeddings(model, data["validation"], processor, views="none", batch_size=7)
    head = HeadOnlyModel(model).eval()
    with torch.no_grad():
        from_cache = head(embeddings=cached[:]["embeddings"]).logits
        full = model(pixel_values=_pixels(data["validation"], processor)).logits
    assert cached[:]["embeddings"].shape[:2] == (len(data["validation"]), 1)
    torch.testing.assert_close(from_cache, full, atol=1e-5, rtol=1e-4)
    assert cached[:]["labels"].tolist() == list(data["validation"]["label"])
    assert list(cached.with_format(None)["image_id"]) == list(data["validation"]["image_id"])


def test_cached_views_give_the_full_models_tta(setup):
    root, data, model, processor = setup
    views, train_views, eval_views = cached_views_for("flips", "flips")
    assert (views, train_views, eval_views) == ("d4", list(range(8)), [0, 4, 6])
    cached = compute_embeddings(model, data["validation"], processor, views=views)
    head = HeadOnlyModel(model, eval_views=eval_views).eval()
    pixels = _pixels(data["validation"], processor)
    with torch.no_grad():
        from_cache = head(embeddings=cached[:]["embeddings"]).logits.exp()
        full = torch.stack([torch.softmax(model(pixel_values=v).logits, -1) for v in tta_views(pixels, "flips")])
    torch.testing.assert_close(from_cache, full.mean(0), atol=1e-5, rtol=1e-4)


def _count_forwards(monkeypatch, model) -> list[int]:
    """Patch `model.embed` to record the batch size of each forward pass (the real pass still runs)."""
    calls: list[int] = []
    embed = model.embed

    def counted(pixel_values, **kwargs):
        calls.append(len(pixel_values))
        return embed(pixel_values, **kwargs)

    monkeypatch.setattr(model, "embed", counted)
    return calls


def test_cache_is_reused_and_keyed_by_the_backbone_weights(setup, monkeypatch):
    root, data, model, processor = setup
    calls = _count_forwards(monkeypatch, model)
    first = compute_embeddings(model, data["train"], processor, batch_size=4)
    assert sum(calls) == len(data["train"]) and max(calls) <= 4
    files = sorted(root.rglob("embeddings-*.arrow"))
    assert files, "the cache is stored next to the dataset's Arrow files"
    assert list(first.features) == ["embeddings", "labels", "image_id", "group_id", "foreground"]
    assert first.features["embeddings"].shape == (1, model.config.backbone_config.hidden_size)

    calls.clear()
    again = compute_embeddings(model, data["train"], processor, batch_size=4)
    assert calls == [], "a cache hit must not run the backbone"
    assert sorted(root.rglob("embeddings-*.arrow")) == files
    torch.testing.assert_close(again[:]["embeddings"], first[:]["embeddings"])
    assert list(again.with_format(None)["image_id"]) == list(data["train"]["image_id"])
    monkeypatch.undo()
    with torch.no_grad():
        model.backbone.embeddings.cls_token.add_(0.5)
    try:
        changed = compute_embeddings(model, data["train"], processor)
        assert len(sorted(root.rglob("embeddings-*.arrow"))) == len(files) + 1
        assert not torch.allclose(changed[:]["embeddings"], first[:]["embeddings"])
    finally:
        with torch.no_grad():
            model.backbone.embeddings.cls_token.sub_(0.5)
    in_memory = compute_embeddings(model, data["train"].select(range(3)).flatten_indices(keep_in_memory=True), 32)
    assert len(in_memory) == 3
    assert not in_memory.cache_files


def test_in_memory_dataset_is_cached_in_cache_dir(setup, tmp_path, monkeypatch):
    """What a second process under `main_process_first` sees: the file the first wrote, loaded, not recomputed."""
    root, data, model, processor = setup
    patches = data["validation"].select(range(5)).flatten_indices(keep_in_memory=True)
    calls = _count_forwards(monkeypatch, model)
    first = compute_embeddings(model, patches, processor, views="flips", cache_dir=tmp_path)
    assert calls and len(list(tmp_path.glob("embeddings-*.arrow"))) == 1
    calls.clear()
    again = compute_embeddings(model, patches, processor, views="flips", cache_dir=tmp_path)
    assert calls == []
    assert again[:]["embeddings"].shape == (5, 3, model.config.backbone_config.hidden_size)
    torch.testing.assert_close(again[:]["embeddings"], first[:]["embeddings"])
    assert [p.name for p in tmp_path.iterdir()] == [f.name for f in tmp_path.glob("embeddings-*.arrow")]


def test_head_trains_on_the_cache_and_saves_a_full_model(setup, tmp_path):
    root, data, model, processor = setup
    head_model, train, evaluation = prepare_cached_head(model, data, processor, augment="flips", tta="none")
    assert set(head_model.state_dict()) == {f"classifier.{k}" for k in model.classifier.state_dict()}
    before = model.classifier[0].weight.detach().clone()
    args = HistoTrainingArguments(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        seed=0,
        num_train_epochs=2,
        learning_rate=1e-2,
        per_device_train_batch_size=16,
        report_to="none",
        disable_tqdm=True,
        n_bootstrap=20,
    )
    trainer = HistoTrainer(
        model=head_model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=PatchCollator(input_name="embeddings"),
        processing_class=processor,
    )
    trainer.train()
    result = finalize_run(trainer, data, DataArguments(data_dir=str(root / "data"), patch_size=64))
    assert not torch.equal(before, model.classifier[0].weight)  # the shared head of the full model trained
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "run").eval()
    with torch.no_grad():
        full = reloaded(pixel_values=_pixels(data["validation"], processor)).logits
        cached = head_model.eval()(embeddings=evaluation[:]["embeddings"]).logits
    torch.testing.assert_close(full, cached, atol=1e-5, rtol=1e-4)
    validation = sorted(set(data["validation"]["image_id"]))
    assert sorted(result.image_ids) == validation and result.metrics["n"] == len(validation)
