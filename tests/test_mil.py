"""Attention MIL: the gated-attention head, its training on bags, the engine/pipeline path and the Hub folder."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from tiny_models import HIDE_HF_HISTO, tiny_model, tissue_image

from hf_histo.data.transforms import make_image_processor
from hf_histo.hub import save_for_hub
from hf_histo.inference.engine import InferenceEngine
from hf_histo.inference.pipeline import HistoImageClassificationPipeline
from hf_histo.models import HistoClassifierConfig
from hf_histo.models.ensemble import FoldEnsemble
from hf_histo.models.mil import GatedAttentionMIL
from hf_histo.training.losses import build_loss
from hf_histo.training.mil import Bags, bags_from_embeddings, pad_bags, train_mil_head

TOL = 1e-5


def signal_bags(n_bags: int, seed: int, n_patches: int = 20, n_signal: int = 2, dim: int = 16, classes: int = 3):
    """Bags of noise patches where only ``n_signal`` patches carry the class (a shift along the class's axis)."""
    rng = np.random.default_rng(seed)
    embeddings, labels, signal = [], [], []
    for i in range(n_bags):
        label = i % classes
        bag = rng.normal(size=(n_patches, dim)).astype(np.float32)
        where = rng.choice(n_patches, n_signal, replace=False)
        bag[where, label] += 4.0
        embeddings.append(torch.from_numpy(bag))
        labels.append(label)
        signal.append(where)
    return Bags([f"img{i}" for i in range(n_bags)], embeddings, torch.tensor(labels)), signal


def test_mil_classifies_bags_by_their_few_signal_patches_and_attends_to_them():
    train, _ = signal_bags(90, seed=0)
    test, signal = signal_bags(60, seed=1)
    torch.manual_seed(0)
    head = GatedAttentionMIL(16, 32, 3, dropout=0.1)
    history = train_mil_head(head, train, build_loss("ce"), epochs=30, learning_rate=3e-3, batch_size=8, seed=0)
    assert history[-1] < history[0] / 3 and bool(head.trained)
    head.eval()
    embeddings, mask = pad_bags(test.embeddings)
    with torch.no_grad():
        logits, attention = head(embeddings, mask)
    accuracy = float((logits.argmax(-1) == test.labels).float().mean())
    on_signal = np.mean([attention[i, where].sum().item() for i, where in enumerate(signal)])
    assert accuracy >= 0.9, accuracy  # chance: 1/3
    assert on_signal > 0.6, on_signal  # uniform attention would put 2/20 = 0.1 there


def test_mil_training_is_deterministic_and_leaves_the_global_rng_alone():
    bags, _ = signal_bags(12, seed=3)
    heads = []
    for _ in range(2):
        torch.manual_seed(5)
        head = GatedAttentionMIL(16, 8, 3)
        before = torch.get_rng_state()
        train_mil_head(head, bags, build_loss("ce"), epochs=3, seed=7)
        assert torch.equal(before, torch.get_rng_state())
        heads.append(head.state_dict())
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_mil_is_permutation_invariant():
    torch.manual_seed(0)
    head = GatedAttentionMIL(16, 8, 3).eval()
    bag = torch.randn(1, 11, 16)
    order = torch.randperm(11)
    with torch.no_grad():
        logits, attention = head(bag)
        shuffled_logits, shuffled_attention = head(bag[:, order])
    torch.testing.assert_close(shuffled_logits, logits)
    torch.testing.assert_close(shuffled_attention, attention[:, order])
    assert attention.sum().item() == pytest.approx(1.0, abs=TOL)


def test_padded_batch_of_bags_equals_each_bag_alone():
    torch.manual_seed(0)
    head = GatedAttentionMIL(16, 8, 3).eval()
    bags = [torch.randn(n, 16) for n in (3, 9, 1, 6)]
    embeddings, mask = pad_bags(bags)
    assert embeddings.shape == (4, 9, 16) and mask.sum(1).tolist() == [3, 9, 1, 6]
    with torch.no_grad():
        logits, attention = head(embeddings, mask)
        for i, bag in enumerate(bags):
            alone_logits, alone_attention = head(bag)
            torch.testing.assert_close(logits[i], alone_logits[0])
            torch.testing.assert_close(attention[i, : len(bag)], alone_attention[0])
            assert (attention[i, len(bag) :] == 0).all()


def test_bags_group_cached_embeddings_by_image_and_average_views():
    import datasets

    rows = {
        "embeddings": [np.full((2, 3), v, np.float32) + [[0], [2]] for v in (0.0, 1.0, 5.0)],
        "labels": [1, 0, 1],
        "image_id": ["a", "b", "a"],
    }
    bags = bags_from_embeddings(datasets.Dataset.from_dict(rows))
    assert bags.image_ids == ["a", "b"] and bags.labels.tolist() == [1, 0]
    torch.testing.assert_close(bags.embeddings[0], torch.tensor([[1.0] * 3, [6.0] * 3]))
    with pytest.raises(ValueError, match="several labels"):
        bags_from_embeddings(datasets.Dataset.from_dict({**rows, "labels": [1, 0, 0]}))


def test_config_defaults_the_mil_width_with_attention():
    assert HistoClassifierConfig(aggregation="attention").mil_hidden == 128
    assert HistoClassifierConfig().mil_hidden is None
    assert tiny_model().mil is None and tiny_model(aggregation="attention", mil_hidden=8).mil is not None
    with pytest.raises(ValueError, match="mil_hidden must be"):
        HistoClassifierConfig(mil_hidden=0)


@pytest.fixture(scope="module")
def mil_model():
    model = tiny_model(seed=3, aggregation="attention", mil_hidden=16)
    with torch.no_grad():  # a non-uniform attention: larger random attention weights
        model.mil.attention_w.weight.normal_(0, 2.0)
    return model


@pytest.fixture(scope="module")
def processor():
    return make_image_processor(32)


def test_engine_returns_attention_weights_and_keeps_the_patch_vote(mil_model, processor):
    engine = InferenceEngine(mil_model, processor, batch_size=5, tta="flips")
    images = [tissue_image(160, seed=i) for i in range(3)]
    together = list(engine.predict_many([(image, None, str(i)) for i, image in enumerate(images)]))
    for image, many in zip(images, together):
        one = engine.predict(image)
        assert one.aggregation == "attention" and one.attention.shape == (len(one.boxes),)
        assert one.attention.sum() == pytest.approx(1.0, abs=TOL) and one.attention.std() > 0
        np.testing.assert_allclose(many.probs, one.probs, atol=TOL)  # cross-image batches: same embeddings
        np.testing.assert_allclose(many.attention, one.attention, atol=TOL)
        # soft on the MIL model: the patch vote of the same patch probabilities
        soft = engine.predict(image, aggregation="soft")
        assert soft.attention is None
        np.testing.assert_allclose(soft.patch_probs, one.patch_probs, atol=1e-12)
        np.testing.assert_allclose(soft.probs, one.patch_probs.mean(0), atol=1e-12)
    plain_model = tiny_model(seed=3)
    plain_model.load_state_dict({k: v for k, v in mil_model.state_dict().items() if not k.startswith("mil.")})
    plain = InferenceEngine(plain_model, processor, tta="flips")  # no MIL head: the unchanged forward path
    np.testing.assert_allclose(plain.predict(images[0]).patch_probs, together[0].patch_probs, atol=TOL)


def test_attention_without_a_mil_head_names_the_fix(processor):
    with pytest.raises(ValueError, match="attention-MIL head: train one with --aggregation attention"):
        InferenceEngine(tiny_model(), processor, aggregation="attention")
    engine = InferenceEngine(tiny_model(), processor)
    with pytest.raises(ValueError, match="--aggregation attention, or choose aggregation soft"):
        engine.predict(tissue_image(), aggregation="attention")


def test_pipeline_returns_each_patchs_attention(mil_model, processor):
    classify = HistoImageClassificationPipeline(model=mil_model, image_processor=processor)
    out = classify(tissue_image(seed=4), return_patches=True)
    weights = [patch["attention"] for patch in out["patches"]]
    assert out["aggregation"] == "attention" and sum(weights) == pytest.approx(1.0, abs=TOL)
    soft = classify(tissue_image(seed=4), return_patches=True, aggregation="soft")
    assert "attention" not in soft["patches"][0]


def test_explain_draws_the_attention_weights(mil_model, processor, tmp_path):
    from hf_histo.inference.explain import explain_image

    path = explain_image(InferenceEngine(mil_model, processor), tissue_image(seed=7), out_path=tmp_path / "x.png")
    assert path.is_file() and path.stat().st_size > 1000


def test_fold_ensemble_averages_the_folds_mil_heads(processor):
    folds = [tiny_model(seed=s, aggregation="attention", mil_hidden=8) for s in (1, 2)]
    ensemble = FoldEnsemble(folds).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ensemble.classify_embeddings(ensemble.embed(x)), ensemble(x).logits)
    image = tissue_image(seed=5)
    got = InferenceEngine(ensemble, processor).predict(image)
    each = [InferenceEngine(fold, processor).predict(image) for fold in folds]
    np.testing.assert_allclose(got.probs, np.mean([p.probs for p in each], axis=0), atol=TOL)
    np.testing.assert_allclose(got.attention, np.mean([p.attention for p in each], axis=0), atol=TOL)
    assert got.attention.sum() == pytest.approx(1.0, abs=TOL)


REMOTE = HIDE_HF_HISTO + textwrap.dedent(
    """
    classify = pipeline("histo-image-classification", model=sys.argv[1], trust_remote_code=True)
    out = classify(np.load(sys.argv[2]), return_patches=True, top_k=10)
    assert not any(m.startswith("hf_histo") for m in sys.modules)
    print(json.dumps({"scores": {s["label"]: s["score"] for s in out["predictions"]},
                      "attention": [p["attention"] for p in out["patches"]], "aggregation": out["aggregation"],
                      "temperature": out["temperature"]}))
    """
)


def test_hub_folder_with_attention_and_a_temperature_predicts_without_hf_histo(mil_model, processor, tmp_path):
    mil_model.config.calibration_temperature = 1.7  # the folder ships a fitted temperature too
    try:
        folder = save_for_hub(mil_model, tmp_path / "model", image_processor=processor)
        expected = InferenceEngine(mil_model, processor).predict(tissue_image(seed=6))
        raw = InferenceEngine(mil_model, processor, calibrate=False).predict(tissue_image(seed=6))
    finally:
        mil_model.config.calibration_temperature = None
    assert expected.temperature == pytest.approx(1.7)
    assert not np.allclose(expected.probs, raw.probs)  # the temperature changes the probabilities
    assert {"mil.py", "forward.py"} <= {p.name for p in folder.iterdir()}
    image = tissue_image(seed=6)
    np.save(tmp_path / "image.npy", image)
    (tmp_path / "remote.py").write_text(REMOTE)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(folder), str(tmp_path / "image.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            "HF_HOME": str(tmp_path / "hf_home"),
            "HIDE_ALSO": "torchstain",  # needed only by a model that normalises stain: this one loads without it
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["aggregation"] == "attention"
    assert remote["temperature"] == pytest.approx(1.7)
    np.testing.assert_allclose(remote["attention"], expected.attention, atol=TOL)
    for label, score in zip(expected.labels, expected.probs):
        assert remote["scores"][label] == pytest.approx(score, abs=TOL)


@pytest.mark.slow
def test_recipe_with_attention_trains_the_mil_head_on_train_images_only(tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    import hf_histo.training.mil as mil_training
    from hf_histo.data.synthetic import make_synthetic_dataset
    from hf_histo.inference.loading import load_engine

    make_synthetic_dataset(tmp_path / "data", n_train=12, n_test=2, size_range=(160, 240), seed=0)
    seen = {}
    train = mil_training.train_mil_head

    def spy(head, bags, *args, **kwargs):
        seen["images"] = list(bags.image_ids)
        return train(head, bags, *args, **kwargs)

    monkeypatch.setattr(mil_training, "train_mil_head", spy)
    out = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "resnet_scratch.py"
    argv = ["--demo", "--data_dir", str(tmp_path / "data"), "--cache_dir", str(tmp_path / "cache")]
    argv += ["--output_dir", str(out), "--aggregation", "attention", "--mil_epochs", "3", "--tta", "flips"]
    argv += ["--max_steps", "2", "--use_cpu", "--image_size", "32", "--per_device_train_batch_size", "8"]
    argv += ["--dataloader_num_workers", "0", "--n_bootstrap", "20", "--disable_tqdm", "true"]
    monkeypatch.setattr(sys, "argv", [str(recipe), *argv])
    runpy.run_path(str(recipe), run_name="__main__")

    splits = json.loads((out / "splits.json").read_text())
    assert sorted(seen["images"]) == splits["train"]  # validation images never train the MIL head
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert metrics["aggregation"] == "attention" and config["aggregation"] == "attention"
    assert config["mil_hidden"] == 128 and (out / "mil.py").is_file()
    engine = load_engine(out)
    assert bool(engine.model.mil.trained)
    image = sorted((tmp_path / "data" / "test_data").glob("img_*.png"))[0]
    prediction = engine.predict(image)
    assert prediction.attention.sum() == pytest.approx(1.0, abs=TOL)
    assert engine.predict(image, aggregation="soft").attention is None
