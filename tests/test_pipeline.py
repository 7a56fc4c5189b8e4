"""HistoImageClassificationPipeline: patching, batching, aggregation, TTA, fallbacks, batch input, remote code."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import LABELS, PATCHING, tiny_model, tissue_image
from transformers import pipeline as hf_pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from hf_histo.data.patching import PatchingConfig, crop_patch
from hf_histo.data.transforms import make_image_processor
from hf_histo.hub import save_for_hub
from hf_histo.inference.engine import PatchedImage
from hf_histo.inference.loading import load_pipeline
from hf_histo.inference.pipeline import TASK, HistoImageClassificationPipeline, register_pipeline_task


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def processor():
    return make_image_processor(32)


@pytest.fixture(scope="module")
def pipe(model, processor):
    register_pipeline_task()
    return HistoImageClassificationPipeline(model=model, image_processor=processor)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, processor):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-histo"
    save_for_hub(model, folder, image_processor=processor)
    return folder


def hand_views(pixels: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The TTA views built independently of the engine: D4 as the 4 turns of the image and of its mirror."""
    if tta == "none":
        return [pixels]
    if tta == "flips":
        return [pixels, pixels.flip(-1), pixels.flip(-2)]
    return [torch.rot90(x, k, dims=(-2, -1)) for x in (pixels, pixels.flip(-1)) for k in range(4)]


def manual_patch_probs(model, processor, image: np.ndarray, mask: np.ndarray, tta: str = "none"):
    """Patch probabilities computed by hand with the training patching functions, one forward per TTA view."""
    boxes = PatchingConfig.from_dict(model.config.patching).boxes(mask)
    pil = Image.fromarray(image)
    crops = [crop_patch(pil, box, mask) for box in boxes]
    pixels = processor(images=crops, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = torch.stack([model(pixel_values=v).logits.softmax(-1) for v in hand_views(pixels, tta)]).mean(0)
    return boxes, probs.double().numpy()


def half_mask(size: int = 160) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[: size // 2, 10:150] = True
    return mask


# ---- aggregation on hand-computed patch probabilities -----------------------------------------------------------------
HAND_PROBS = np.array([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
HAND_BOXES = np.array([[0, 0, 32, 32, 1024], [32, 0, 32, 32, 512], [64, 0, 32, 32, 1024]])  # fractions 1, .5, 1


def hand_outputs(probs: np.ndarray, tta: str = "none") -> dict:
    """What `_forward` hands to `postprocess`: the patched image and its patch probabilities."""
    patched = PatchedImage(image=None, mask=None, boxes=HAND_BOXES, mask_source="mask", fallback=None)
    return {"patched": patched, "probs": probs, "tta": tta}


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("soft", [1.3 / 3, 0.8 / 3, 0.9 / 3]),  # mean
        ("hard", [2 / 3, 0.0, 1 / 3]),  # votes: 2 x HER2(+), 1 x Luminal B
        ("mask_weighted", [1.0 / 2.5, 0.65 / 2.5, 0.85 / 2.5]),  # weights 1, 0.5, 1 (foreground fractions)
    ],
)
def test_postprocess_aggregations_hand_computed(pipe, method, expected):
    result = pipe.postprocess(hand_outputs(HAND_PROBS), aggregation=method, top_k=3)
    scores = {entry["label"]: entry["score"] for entry in result}
    np.testing.assert_allclose([scores[LABELS[i]] for i in range(3)], expected, atol=1e-9)
    assert [e["score"] for e in result] == sorted((e["score"] for e in result), reverse=True)
    assert all(set(entry) == {"label", "score"} for entry in result)


def test_hard_and_soft_disagree_as_computed_by_hand(pipe):
    probs = np.array([[0.4, 0.35, 0.25], [0.4, 0.35, 0.25], [0.0, 1.0, 0.0]])
    outputs = hand_outputs(probs)
    assert pipe.postprocess(outputs, aggregation="soft")[0]["label"] == "Luminal A"  # (0.35+0.35+1)/3 = 0.567
    assert pipe.postprocess(outputs, aggregation="hard")[0]["label"] == "HER2(+)"  # 2 of 3 votes


def test_aggregation_defaults_to_the_config(processor):
    model = tiny_model(aggregation="hard")
    pipe = HistoImageClassificationPipeline(model=model, image_processor=processor)
    outputs = hand_outputs(HAND_PROBS)
    assert pipe.postprocess(outputs, return_patches=True)["aggregation"] == "hard"
    assert pipe.postprocess(outputs, top_k=1)[0]["score"] == pytest.approx(2 / 3)
    assert pipe.postprocess(hand_outputs(HAND_PROBS, "d4"), return_patches=True)["tta"] == "d4"  # as forwarded


# ---- end to end: same patches, same probabilities -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["soft", "hard", "mask_weighted"])
def test_pipeline_matches_manual_patching_and_aggregation(pipe, model, processor, method):
    from hf_histo.models.aggregation import aggregate

    image, mask = tissue_image(), half_mask()
    boxes, probs = manual_patch_probs(model, processor, image, mask)
    result = pipe(image, mask=mask, aggregation=method, top_k=3, return_patches=True)
    assert [p["box"] for p in result["patches"]] == [[b.x, b.y, b.w, b.h] for b in boxes]
    np.testing.assert_allclose([list(p["probs"].values()) for p in result["patches"]], probs, atol=1e-5)
    weights = np.array([b.fraction for b in boxes])
    expected = aggregate(probs, method, weights if method == "mask_weighted" else None)
    got = {e["label"]: e["score"] for e in result["predictions"]}
    np.testing.assert_allclose([got[LABELS[i]] for i in range(3)], expected, atol=1e-5)
    assert result["mask_source"] == "mask" and result["fallback"] is None
    assert [p["foreground"] for p in result["patches"]] == pytest.approx(weights.tolist())


def test_batch_size_does_not_change_results(pipe):
    image, mask = tissue_image(), half_mask()
    reference = pipe(image, mask=mask, batch_size=64, return_patches=True)
    assert len(reference["patches"]) > 7
    for batch_size in (1, 7):
        other = pipe(image, mask=mask, batch_size=batch_size, return_patches=True)
        for a, b in zip(reference["patches"], other["patches"]):
            assert a["box"] == b["box"]
            np.testing.assert_allclose(list(a["probs"].values()), list(b["probs"].values()), atol=1e-5)


@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_tta_averages_the_views_computed_by_hand(pipe, model, processor, tta):
    image, mask = tissue_image(), half_mask()
    _, expected = manual_patch_probs(model, processor, image, mask, tta=tta)
    _, plain = manual_patch_probs(model, processor, image, mask)
    result = pipe(image, mask=mask, tta=tta, return_patches=True)
    got = np.array([list(p["probs"].values()) for p in result["patches"]])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, plain, atol=1e-4)  # a random ViT is not rotation invariant
    assert result["tta"] == tta
    assert pipe(image, mask=mask, return_patches=True)["tta"] == "none"  # the model's config.tta


def test_tta_defaults_to_the_config_and_refuses_a_bool(processor):
    pipe = HistoImageClassificationPipeline(model=tiny_model(tta="flips"), image_processor=processor)
    image, mask = tissue_image(), half_mask()
    _, flips = manual_patch_probs(pipe.model, processor, image, mask, tta="flips")
    result = pipe(image, mask=mask, return_patches=True)
    assert result["tta"] == "flips"
    np.testing.assert_allclose([list(p["probs"].values()) for p in result["patches"]], flips, atol=1e-5)
    assert pipe(image, mask=mask, tta="none", return_patches=True)["tta"] == "none"  # the call wins
    for bad in (True, "rot90"):
        with pytest.raises(ValueError, match="unknown TTA"):
            pipe(image, mask=mask, tta=bad)


def test_tta_of_a_symmetric_patch_is_a_no_op(pipe):
    image = np.full((64, 64, 3), (180, 80, 160), dtype=np.uint8)  # constant colour: all 8 views are equal
    mask = np.ones((64, 64), dtype=bool)
    plain = pipe(image, mask=mask, top_k=3)
    tta = pipe(image, mask=mask, top_k=3, tta="d4")
    assert [e["label"] for e in plain] == [e["label"] for e in tta]
    np.testing.assert_allclose([e["score"] for e in plain], [e["score"] for e in tta], atol=1e-6)


# ---- outputs, inputs and fallbacks ----------------------------------------------------------------------------------
def test_output_format_top_k_and_input_kinds(pipe, tmp_path):
    image, mask = tissue_image(), half_mask()
    result = pipe(image, mask=mask)
    assert len(result) == 3 and all(set(e) == {"label", "score"} for e in result)
    assert sum(e["score"] for e in result) == pytest.approx(1.0)
    assert len(pipe(image, mask=mask, top_k=1)) == 1
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    from_path = pipe(str(tmp_path / "image.png"), mask=str(tmp_path / "mask.png"))
    from_pil = pipe(Image.fromarray(image), mask=Image.fromarray(mask))
    from_chw = pipe(np.moveaxis(image, -1, 0), mask=mask)
    for other in (from_path, from_pil, from_chw):
        assert [e["label"] for e in other] == [e["label"] for e in result]
        np.testing.assert_allclose([e["score"] for e in other], [e["score"] for e in result], atol=1e-6)


def test_list_input_gives_one_result_per_image(pipe):
    images = [tissue_image(seed=s) for s in range(3)]
    masks = [half_mask(), None, np.ones((160, 160), dtype=bool)]
    batch = pipe(images, mask=masks, top_k=3)
    assert isinstance(batch, list) and len(batch) == 3
    for image, mask, result in zip(images, masks, batch):
        single = pipe(image, mask=mask, top_k=3)
        assert [e["label"] for e in single] == [e["label"] for e in result]
        np.testing.assert_allclose([e["score"] for e in single], [e["score"] for e in result], atol=1e-6)
    as_dicts = pipe([{"image": i, "mask": m} for i, m in zip(images, masks)], top_k=3)
    assert [r[0]["label"] for r in as_dicts] == [r[0]["label"] for r in batch]
    with pytest.raises(ValueError, match="one mask"):
        pipe(images, mask=masks[:2])


def test_no_mask_uses_tissue_detection(pipe):
    result = pipe(tissue_image(), return_patches=True)
    assert result["mask_source"] == "tissue" and result["fallback"] is None
    assert "fallback" not in pipe(tissue_image())[0]
    boxes = [p["box"] for p in result["patches"]]
    assert 0 < len(boxes) < 25 and [0, 0, 32, 32] not in boxes  # white corners hold no tissue


def test_empty_mask_falls_back_to_tissue_and_says_so(pipe):
    result = pipe(tissue_image(), mask=np.zeros((160, 160), dtype=bool), return_patches=True)
    assert result["fallback"] == "empty_mask_tissue" and result["patches"]
    assert all(e["fallback"] == "empty_mask_tissue" for e in pipe(tissue_image(), mask=np.zeros((160, 160))))


def test_empty_mask_whole_fallback_as_configured(processor):
    model = tiny_model(patching={**PATCHING.to_dict(), "empty_fallback": "whole"})
    pipe = HistoImageClassificationPipeline(model=model, image_processor=processor)
    result = pipe(tissue_image(), mask=np.zeros((160, 160), dtype=bool), return_patches=True)
    assert result["fallback"] == "empty_mask_whole"
    assert len(result["patches"]) == 25  # 160 / 32 = 5 x 5 tiles, all "foreground"


def test_no_qualifying_patch_falls_back_to_the_best_tile_as_in_training(pipe, model, processor):
    image = tissue_image(size=8)  # 64 pixels < min_foreground=100: no grid tile qualifies
    mask = np.ones((8, 8), dtype=bool)
    result = pipe(image, mask=mask, return_patches=True)
    assert result["fallback"] == "best_tile"
    expected_boxes, fell_back = PatchingConfig.from_dict(model.config.patching).boxes_with_fallback(mask)
    assert fell_back and [p["box"] for p in result["patches"]] == [[b.x, b.y, b.w, b.h] for b in expected_boxes]
    assert result["patches"][0]["box"] == [0, 0, 32, 32]  # padded with white past the edge
    crop = crop_patch(Image.fromarray(image), expected_boxes[0], mask)
    pixels = processor(images=[crop], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.softmax(-1)[0].numpy()
    got = {e["label"]: e["score"] for e in result["predictions"]}
    np.testing.assert_allclose([got[LABELS[i]] for i in range(3)], expected, atol=1e-5)
    assert all(e["fallback"] == "best_tile" for e in pipe(image, mask=mask))


def test_an_image_without_any_box_is_refused_clearly(pipe, monkeypatch):
    # boxes_with_fallback returns a tile whenever the mask has a pixel and resolve_mask never returns an empty mask,
    # so this only guards against a future strategy: the old "whole_image" safety net is gone, the engine refuses.
    # (tests/test_engine.py checks that InferenceEngine.predict says so.)
    monkeypatch.setattr(pipe.engine.patching, "boxes_with_fallback", lambda mask: ([], True))
    with pytest.raises(ValueError, match="no patch could be cut"):
        pipe(tissue_image(size=40), mask=np.ones((40, 40), dtype=bool))


def test_blank_image_without_tissue_is_patched_whole(pipe):
    result = pipe(np.full((64, 64, 3), 255, dtype=np.uint8), return_patches=True)
    assert result["fallback"] == "whole" and len(result["patches"]) == 4


def test_bad_inputs_raise_clear_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        pipe(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="mask shape"):
        pipe(tissue_image(), mask=np.ones((10, 10), dtype=bool))
    with pytest.raises(ValueError, match="unknown aggregation"):
        pipe(tissue_image(), aggregation="max")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pipe(tissue_image(), batch_size=0)


# ---- registration, loading, saving ----------------------------------------------------------------------------------
def test_register_pipeline_task_is_idempotent_and_loud_on_conflict():
    register_pipeline_task()
    register_pipeline_task()
    entry = PIPELINE_REGISTRY.supported_tasks[TASK]
    assert entry["impl"] is HistoImageClassificationPipeline and entry["type"] == "image"
    assert "image-classification" in PIPELINE_REGISTRY.supported_tasks  # the built-in task is untouched

    class Other(HistoImageClassificationPipeline):
        pass

    PIPELINE_REGISTRY.supported_tasks[TASK] = {**entry, "impl": Other}
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_pipeline_task()
    finally:
        PIPELINE_REGISTRY.supported_tasks[TASK] = entry


def test_load_pipeline_and_registered_task(saved, pipe):
    image, mask = tissue_image(), half_mask()
    expected = pipe(image, mask=mask)
    loaded = load_pipeline(saved, batch_size=5)
    assert isinstance(loaded, HistoImageClassificationPipeline)
    assert loaded.engine.patching == PATCHING and loaded.engine.batch_size == 5
    got = loaded(image, mask=mask)
    np.testing.assert_allclose([e["score"] for e in got], [e["score"] for e in expected], atol=1e-5)
    # The registered task also builds from a model object and its processor.
    by_task = hf_pipeline(TASK, model=loaded.model, image_processor=loaded.image_processor)
    assert type(by_task) is HistoImageClassificationPipeline


def test_plain_image_classification_pipeline_classifies_patches(saved, model, processor):
    patch = Image.fromarray(tissue_image(size=32))
    plain = hf_pipeline("image-classification", model=str(saved))
    result = plain(patch, top_k=3)
    pixels = processor(images=[patch], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.softmax(-1)[0].numpy()
    got = {e["label"]: e["score"] for e in result}
    np.testing.assert_allclose([got[LABELS[i]] for i in range(3)], expected, atol=1e-5)


CHILD = textwrap.dedent(
    """
    import json, sys

    # hf_histo is installed (editable) in this venv: make it unimportable, as on a machine without it.
    sys.modules["hf_histo"] = None
    import numpy as np
    from transformers import pipeline

    image = np.load("image.npy")
    mask = np.load("mask.npy")
    pipe = pipeline("histo-image-classification", model="tiny-histo", trust_remote_code=True)
    result = pipe(image, mask=mask, top_k=3, return_patches=True)
    tta = pipe(image, mask=mask, top_k=3, tta="d4")
    report = {
        "pipeline_module": type(pipe).__module__,
        "model_module": type(pipe.model).__module__,
        "result": result,
        "tta": tta,
        "hf_histo_loaded": sorted(m for m, mod in sys.modules.items() if mod and m.startswith("hf_histo")),
    }
    json.dump(report, open("report.json", "w"))
    """
)


@pytest.mark.slow
def test_trust_remote_code_pipeline_without_hf_histo(saved, pipe):
    folder = saved.parent
    image, mask = tissue_image(), half_mask()
    np.save(folder / "image.npy", image)
    np.save(folder / "mask.npy", mask)
    (folder / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(folder / "modules"), HF_HOME=str(folder / "hf_home"))
    done = subprocess.run(
        [sys.executable, "-I", "child.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((folder / "report.json").read_text())
    assert report["hf_histo_loaded"] == []
    assert report["pipeline_module"].startswith("transformers_modules.") and report["pipeline_module"].endswith(
        ".pipeline"
    )
    assert report["model_module"].endswith(".modeling_histo")
    expected = pipe(image, mask=mask, top_k=3, return_patches=True)
    assert [e["label"] for e in report["result"]["predictions"]] == [e["label"] for e in expected["predictions"]]
    np.testing.assert_allclose(
        [e["score"] for e in report["result"]["predictions"]],
        [e["score"] for e in expected["predictions"]],
        atol=1e-6,
    )
    assert [p["box"] for p in report["result"]["patches"]] == [p["box"] for p in expected["patches"]]
    assert report["result"]["tta"] == "none"
    expected_tta = pipe(image, mask=mask, top_k=3, tta="d4")
    np.testing.assert_allclose([e["score"] for e in report["tta"]], [e["score"] for e in expected_tta], atol=1e-6)
