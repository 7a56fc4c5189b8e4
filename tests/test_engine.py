"""InferenceEngine: shared batches, TTA views, config defaults and overrides, mask-weighted votes, fold ensembles."""

import numpy as np
import pytest
import torch
from tiny_models import LABELS, PATCHING, tiny_model, tissue_image

from hf_histo.data.transforms import make_image_processor
from hf_histo.hub import save_for_hub
from hf_histo.inference.engine import InferenceEngine, patch_probabilities, tta_views
from hf_histo.inference.loading import load_engine
from hf_histo.inference.pipeline import HistoImageClassificationPipeline, register_pipeline_task
from hf_histo.models.aggregation import aggregate
from hf_histo.models.ensemble import FoldEnsemble
from hf_histo.training.embeddings import D4_SUBSETS


def ragged_mask(size: int = 96) -> np.ndarray:
    """Covers tiles partially: foreground fractions differ from tile to tile."""
    mask = np.zeros((size, size), dtype=bool)
    mask[4 : size - 20, 10 : size - 7] = True
    return mask


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def processor():
    return make_image_processor(32)


@pytest.fixture(scope="module")
def items():
    """Images of different sizes and patch counts (not multiples of 3), with and without masks."""
    return [
        (tissue_image(96, seed=0), ragged_mask(96), "a"),
        (tissue_image(64, seed=1), None, "b"),
        (tissue_image(64, seed=2), np.ones((64, 64), dtype=bool), "c"),
        (tissue_image(40, seed=3), np.ones((40, 40), dtype=bool), "d"),
    ]


def hand_probs(model, pixels: torch.Tensor, views: list[torch.Tensor] | None = None) -> np.ndarray:
    """Softmax averaged over views, one forward pass per view."""
    with torch.no_grad():
        probs = [model(pixel_values=v).logits.softmax(-1) for v in (views or [pixels])]
    return torch.stack(probs).mean(0).double().numpy()


# ---- (a) predict_many shares forward batches across images, without changing a number --------------------------------
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_predict_many_equals_predict_and_the_pipeline(model, processor, items, batch_size, monkeypatch):
    engine = InferenceEngine(model, processor, batch_size=batch_size)
    forwarded = []
    original = engine.forward
    monkeypatch.setattr(
        engine, "forward", lambda pixels, tta=None: forwarded.append(len(pixels)) or original(pixels, tta)
    )
    many = list(engine.predict_many(items))
    n_patches = [len(p.boxes) for p in many]
    assert [p.image_id for p in many] == ["a", "b", "c", "d"] and len(set(n_patches)) > 2
    # Patches of consecutive images share batches: every forward is full but the last.
    total = sum(n_patches)
    assert forwarded == [batch_size] * (total // batch_size) + ([total % batch_size] if total % batch_size else [])

    register_pipeline_task()
    pipe = HistoImageClassificationPipeline(model=model, image_processor=processor)
    for (image, mask, image_id), prediction in zip(items, many):
        single = engine.predict(image, mask, image_id)
        np.testing.assert_array_equal(single.boxes, prediction.boxes)
        np.testing.assert_allclose(single.patch_probs, prediction.patch_probs, atol=1e-6)
        np.testing.assert_allclose(single.probs, prediction.probs, atol=1e-6)
        assert (single.mask_source, single.fallback) == (prediction.mask_source, prediction.fallback)
        result = pipe(image, mask=mask, batch_size=batch_size, top_k=3, return_patches=True)
        assert [p["box"] for p in result["patches"]] == prediction.boxes[:, :4].tolist()
        got = [[p["probs"][name] for name in LABELS.values()] for p in result["patches"]]
        np.testing.assert_allclose(got, prediction.patch_probs, atol=1e-6)
        scores = {e["label"]: e["score"] for e in result["predictions"]}
        np.testing.assert_allclose([scores[name] for name in LABELS.values()], prediction.probs, atol=1e-6)
        assert result["mask_source"] == prediction.mask_source and result["fallback"] == prediction.fallback


def test_predict_many_is_the_same_for_every_batch_size_and_streams(model, processor, items):
    reference = list(InferenceEngine(model, processor, batch_size=64).predict_many(items))
    for batch_size in (1, 3):
        engine = InferenceEngine(model, processor, batch_size=batch_size)
        for a, b in zip(reference, engine.predict_many(items)):
            np.testing.assert_allclose(a.patch_probs, b.patch_probs, atol=1e-6)
    consumed = []

    def lazily():
        for item in items:
            consumed.append(item[2])
            yield item

    stream = InferenceEngine(model, processor, batch_size=1).predict_many(lazily())
    assert next(stream).image_id == "a" and consumed == ["a"]  # a folder is not read ahead of the predictions


def test_an_image_without_any_box_is_refused(model, processor, monkeypatch):
    engine = InferenceEngine(model, processor)
    monkeypatch.setattr(engine.patching, "boxes_with_fallback", lambda mask: ([], True))
    with pytest.raises(ValueError, match="slide_3: no patch could be cut"):
        engine.predict(tissue_image(40), np.ones((40, 40), dtype=bool), "slide_3")


# ---- (b) TTA views and patch probabilities ----------------------------------------------------------------------------
def test_tta_views():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)  # no symmetry: 8 distinct views
    (none,) = tta_views(x, "none")
    assert none is x
    flips = tta_views(x, "flips")
    assert len(flips) == 3
    for got, want in zip(flips, [x, x.flip(-1), x.flip(-2)]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    d4 = tta_views(x, "d4")
    assert len(d4) == 8 and torch.equal(d4[0], x)
    by_hand = {tuple(torch.rot90(v, k, dims=(-2, -1)).flatten().tolist()) for v in (x, x.flip(-2)) for k in range(4)}
    assert {tuple(v.flatten().tolist()) for v in d4} == by_hand and len(by_hand) == 8
    for name in ("five_crop", "D4", "", True):
        with pytest.raises(ValueError, match="unknown TTA"):
            tta_views(x, name)


def test_the_d4_subsets_of_the_embedding_cache_pick_the_engines_views():
    # The frozen-backbone cache stores the 8 d4 views and trains/evaluates on subsets of them by position.
    x = torch.rand(2, 3, 4, 4)
    d4 = tta_views(x, "d4")
    for mode, positions in D4_SUBSETS.items():
        views = tta_views(x, mode)
        assert len(views) == len(positions)
        for view, j in zip(views, positions):
            torch.testing.assert_close(view, d4[j], rtol=0, atol=0)


@pytest.mark.parametrize("tta", ["none", "flips", "d4"])
def test_patch_probabilities_average_the_softmax_of_the_views(model, tta):
    torch.manual_seed(1)
    pixels = torch.randn(5, 3, 32, 32)
    views = {
        "none": [pixels],
        "flips": [pixels, pixels.flip(-1), pixels.flip(-2)],
        "d4": [torch.rot90(v, k, dims=(-2, -1)) for v in (pixels, pixels.flip(-1)) for k in range(4)],
    }[tta]
    got = patch_probabilities(model, pixels, tta)
    assert got.shape == (5, 3) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), hand_probs(model, pixels, views), atol=1e-6)
    if tta != "none":
        assert not np.allclose(got.numpy(), hand_probs(model, pixels), atol=1e-4)  # the views do change the result


# ---- (c) defaults from the config, overrides per engine and per call ------------------------------------------------
def test_defaults_come_from_the_config_and_overrides_win(processor):
    model = tiny_model(seed=2, tta="flips", aggregation="hard")
    image, mask = tissue_image(96), ragged_mask(96)
    engine = InferenceEngine(model, processor)
    assert (engine.tta, engine.aggregation, engine.patching) == ("flips", "hard", PATCHING)
    patched = engine.patch(engine.decode(image), mask)
    pixels = engine.preprocess(engine.crops(patched))
    flips = hand_probs(model, pixels, [pixels, pixels.flip(-1), pixels.flip(-2)])
    plain = hand_probs(model, pixels)

    default = engine.predict(image, mask)
    assert (default.tta, default.aggregation) == ("flips", "hard")
    np.testing.assert_allclose(default.patch_probs, flips, atol=1e-6)
    np.testing.assert_allclose(default.probs, aggregate(flips, "hard"), atol=1e-9)

    called = engine.predict(image, mask, tta="none", aggregation="soft")
    assert (called.tta, called.aggregation) == ("none", "soft")
    np.testing.assert_allclose(called.patch_probs, plain, atol=1e-6)
    np.testing.assert_allclose(called.probs, plain.mean(0), atol=1e-6)
    assert not np.allclose(called.probs, default.probs, atol=1e-4)

    built = InferenceEngine(
        model, processor, tta="none", aggregation="soft", patching={**PATCHING.to_dict(), "stride": 16}
    )
    assert (built.tta, built.aggregation, built.patching.stride) == ("none", "soft", 16)
    prediction = built.predict(image, mask)
    assert (prediction.tta, prediction.aggregation) == ("none", "soft") and len(prediction.boxes) > len(called.boxes)
    assert built.predict(image, mask, tta="flips").tta == "flips"  # the call beats the engine

    unset = tiny_model()  # HistoClassifierConfig defaults
    assert (InferenceEngine(unset, processor).tta, InferenceEngine(unset, processor).aggregation) == ("none", "soft")


def test_bad_settings_raise_clear_errors(model, processor):
    with pytest.raises(ValueError, match="unknown TTA 'rot'"):
        InferenceEngine(model, processor, tta="rot")
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        InferenceEngine(model, processor, aggregation="max")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        InferenceEngine(model, processor, batch_size=0)
    engine = InferenceEngine(model, processor)
    with pytest.raises(ValueError, match="unknown TTA"):
        engine.predict(tissue_image(40), tta="yes")
    with pytest.raises(ValueError, match="unknown aggregation"):
        engine.predict(tissue_image(40), aggregation="mean")
    no_patching = tiny_model(patching=None)
    with pytest.raises(ValueError, match="no `patching` entry"):
        InferenceEngine(no_patching, processor)


# ---- (d) mask-weighted votes weigh each patch by its foreground fraction --------------------------------------------
def test_mask_weighted_aggregation_uses_the_boxes_foreground_fraction(model, processor):
    image, mask = tissue_image(96), ragged_mask(96)
    engine = InferenceEngine(model, processor, aggregation="mask_weighted")
    prediction = engine.predict(image, mask)
    counted = [mask[y : y + h, x : x + w].sum() for x, y, w, h, _ in prediction.boxes.tolist()]
    assert prediction.boxes[:, 4].tolist() == counted
    fractions = np.array([c / (w * h) for c, (_, _, w, h, _) in zip(counted, prediction.boxes.tolist())])
    np.testing.assert_allclose(prediction.foreground, fractions)
    assert fractions.min() < 0.5 < fractions.max() <= 1.0  # partial tiles: the weights matter
    expected = fractions @ prediction.patch_probs / fractions.sum()
    np.testing.assert_allclose(prediction.probs, expected, atol=1e-12)
    soft = engine.predict(image, mask, aggregation="soft").probs
    assert not np.allclose(prediction.probs, soft, atol=1e-5)
    np.testing.assert_allclose(engine.aggregate(prediction.patch_probs, prediction.boxes), expected, atol=1e-12)


# ---- (e) a fold ensemble averages its models' patch probabilities -----------------------------------------------------
@pytest.fixture(scope="module")
def fold_dirs(tmp_path_factory, processor):
    root = tmp_path_factory.mktemp("cv")
    return [save_for_hub(tiny_model(seed=10 + k), root / f"fold_{k}", image_processor=processor) for k in range(2)]


def test_fold_ensemble_averages_the_engines_patch_probabilities(fold_dirs, items):
    engines = [load_engine(d, device="cpu", tta="flips") for d in fold_dirs]
    ensemble = load_engine([str(d) for d in fold_dirs], device="cpu", tta="flips", batch_size=5)
    assert isinstance(ensemble.model, FoldEnsemble) and len(ensemble.model.models) == 2
    from_root = load_engine(fold_dirs[0].parent, device="cpu", tta="flips")  # a CV root: its fold_* folders
    assert isinstance(from_root.model, FoldEnsemble)
    for image, mask, image_id in items[:2]:
        folds = [e.predict(image, mask, image_id) for e in engines]
        assert not np.allclose(folds[0].patch_probs, folds[1].patch_probs, atol=1e-4)  # two different models
        for engine in (ensemble, from_root):
            got = engine.predict(image, mask, image_id)
            np.testing.assert_array_equal(got.boxes, folds[0].boxes)
            np.testing.assert_allclose(got.patch_probs, (folds[0].patch_probs + folds[1].patch_probs) / 2, atol=1e-6)
            np.testing.assert_allclose(got.probs, (folds[0].probs + folds[1].probs) / 2, atol=1e-6)  # soft: linear
