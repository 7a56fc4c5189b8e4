"""The fast inference paths change no number: tensor patches, batches across images, read-ahead, embedding workers."""

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import PATCHING, tiny_model, tissue_image
from transformers import ViTImageProcessor

from hf_histo.data.builder import load_patch_dataset
from hf_histo.data.images import DataError
from hf_histo.data.patching import PatchBox, PatchingConfig, crop_array, crop_patch
from hf_histo.data.synthetic import make_synthetic_dataset
from hf_histo.data.transforms import build_transforms, input_spec, make_image_processor
from hf_histo.inference import feed
from hf_histo.inference.engine import InferenceEngine
from hf_histo.inference.feed import PixelTransform, read_ahead
from hf_histo.models.aggregation import aggregate
from hf_histo.training.arguments import ModelArguments
from hf_histo.training.embeddings import compute_embeddings, embedding_cache_key
from hf_histo.training.run import build_model

TOL = 1e-5


def ragged_mask(size: int, seed: int = 0) -> np.ndarray:
    """Two blobs reaching the image edges: partial tiles, components of different sizes."""
    mask = np.zeros((size, size), dtype=bool)
    mask[2 : size // 2, 0 : size // 2 + seed] = True
    mask[size // 2 + 5 :, size // 3 :] = True
    return mask


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def items():
    """Images of different sizes and patch counts, with and without masks."""
    return [
        (tissue_image(96, seed=0), ragged_mask(96), "a"),
        (tissue_image(64, seed=1), None, "b"),
        (tissue_image(120, seed=2), ragged_mask(120, seed=3), "c"),
        (tissue_image(40, seed=3), np.ones((40, 40), dtype=bool), "d"),
        (tissue_image(72, seed=4), ragged_mask(72, seed=1), "e"),
    ]


def reference_probs(engine: InferenceEngine, image, mask, tta: str) -> tuple[np.ndarray, np.ndarray]:
    """The engine before the tensor path: PIL crops through the image processor, one forward per TTA view."""
    patched = engine.patch(engine.decode(image), mask)
    paint = engine.patching.paint_background
    crops = [crop_patch(patched.image, PatchBox(*map(int, b)), patched.mask, paint) for b in patched.boxes]
    pixels = engine.image_processor(images=crops, return_tensors="pt")["pixel_values"]
    views = {
        "none": [pixels],
        "flips": [pixels, pixels.flip(-1), pixels.flip(-2)],
        "d4": [torch.rot90(x, k, dims=(-2, -1)) for x in (pixels, pixels.flip(-1)) for k in range(4)],
    }[tta]
    with torch.no_grad():
        probs = torch.stack([engine.model(pixel_values=v).logits.softmax(-1) for v in views]).mean(0)
    return patched.boxes, probs.double().numpy()


# ---- the tensor path equals the processor on PIL crops ----------------------------------------------------------------
PATCHINGS = {
    "grid, no resize": PATCHING,
    "grid 48 px, shrunk": PatchingConfig(strategy="grid", patch_size=48, stride=24, min_foreground=50),
    "topk 20 px, enlarged": PatchingConfig(strategy="topk", patch_size=20, top_k=5),
    "components past the edges, painted": PatchingConfig(
        strategy="components", min_area=30, pad=6, paint_background=True
    ),
    "whole": PatchingConfig(strategy="whole"),
}


@pytest.mark.parametrize("patching", list(PATCHINGS.values()), ids=list(PATCHINGS))
@pytest.mark.parametrize("tta", ["none", "flips", "d4"])
def test_engine_equals_the_processor_on_pil_crops_for_every_tta_and_aggregation(model, items, patching, tta):
    engine = InferenceEngine(model, make_image_processor(32), patching=patching, tta=tta, batch_size=7)
    assert engine.transform is not None
    many = list(engine.predict_many(items))
    assert [p.image_id for p in many] == ["a", "b", "c", "d", "e"]
    for (image, mask, _), prediction in zip(items, many):
        boxes, expected = reference_probs(engine, image, mask, tta)
        np.testing.assert_array_equal(prediction.boxes, boxes)
        np.testing.assert_allclose(prediction.patch_probs, expected, atol=TOL)
        for method in ("soft", "hard", "mask_weighted"):
            weights = boxes[:, 4] / (boxes[:, 2] * boxes[:, 3]) if method == "mask_weighted" else None
            got = engine.aggregate(prediction.patch_probs, prediction.boxes, method)
            np.testing.assert_allclose(got, aggregate(expected, method, weights=weights), atol=TOL)


@pytest.mark.parametrize(
    "patching",
    [
        PatchingConfig(strategy="grid", patch_size=24, stride=16, min_foreground=50),
        PatchingConfig(strategy="components", min_area=30, pad=6),
    ],
    ids=["grid: patch counts differ", "components: box sizes differ"],
)
def test_patches_batched_across_images_equal_per_image_calls(model, items, patching):
    engine = InferenceEngine(model, make_image_processor(32), patching=patching, batch_size=7)
    counts = [len(engine.patch(engine.decode(image), mask).boxes) for image, mask, _ in items]
    assert len(set(counts)) > 1 and sum(counts) % 7  # batches span images and the last one is short
    for prediction, (image, mask, image_id) in zip(engine.predict_many(items), items):
        single = engine.predict(image, mask, image_id)
        np.testing.assert_allclose(prediction.patch_probs, single.patch_probs, atol=1e-6)
        np.testing.assert_allclose(prediction.probs, single.probs, atol=1e-6)
        patched = engine.patch(engine.decode(image), mask)
        np.testing.assert_allclose(engine.patch_probs(patched, batch_size=2), single.patch_probs, atol=1e-6)


@pytest.mark.parametrize("size", [16, 32, 45, 64])
@pytest.mark.parametrize("native", [True, False])
def test_pixel_transform_equals_the_torchvision_processor_bit_for_bit(size, native, monkeypatch):
    """Up, down and no resize; torchvision's uint8 and float (non-AVX CPUs) resize paths alike."""
    from torchvision.transforms.v2.functional import _geometry

    monkeypatch.setattr(feed, "_NATIVE_UINT8_RESIZE", native)
    monkeypatch.setattr(_geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: native)
    processor = ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.7, 0.5, 0.6], image_std=[0.2, 0.3, 0.1]
    )
    engine = InferenceEngine(tiny_model(), processor)
    rng = np.random.default_rng(size)
    crops = [Image.fromarray(rng.integers(0, 256, (size, size + d, 3), dtype=np.uint8)) for d in (0, 0, 3)]
    expected = processor(images=crops, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(engine.preprocess(crops), expected, atol=0, rtol=0)
    # and training's evaluation transform (same resize; its normalisation rounds differently)
    transform = build_transforms(make_image_processor(processor), train=False)
    torch.testing.assert_close(engine.preprocess(crops), torch.stack([transform(c) for c in crops]), atol=2e-6, rtol=0)


def test_processors_the_tensor_path_does_not_reproduce_are_called_on_the_crops(model, items):
    odd = {
        "centre crop": ViTImageProcessor(size={"height": 40, "width": 40}, do_center_crop=True, crop_size=32),
        "bicubic": ViTImageProcessor(size={"height": 32, "width": 32}, resample=Image.Resampling.BICUBIC),
        "shortest edge": ViTImageProcessor(size={"shortest_edge": 32}),
        "no normalisation": ViTImageProcessor(size={"height": 32, "width": 32}, do_normalize=False),
    }
    assert PixelTransform.of(make_image_processor(32)) == PixelTransform(
        (32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255
    )
    for name, processor in odd.items():
        engine = InferenceEngine(model, processor, batch_size=4)
        assert engine.transform is None, name
        for prediction, (image, mask, _) in zip(engine.predict_many(items[:2]), items[:2]):
            np.testing.assert_allclose(
                prediction.patch_probs, reference_probs(engine, image, mask, "none")[1], atol=TOL
            )


@pytest.mark.parametrize(
    "box",
    [PatchBox(10, 5, 16, 16, 0), PatchBox(-5, -3, 20, 20, 0), PatchBox(30, 28, 20, 20, 0), PatchBox(-2, 4, 44, 9, 0)],
)
@pytest.mark.parametrize("paint", [False, True])
def test_crop_array_is_crop_patch(box, paint):
    image = tissue_image(40, seed=5)
    mask = ragged_mask(40)
    got = crop_array(image, box, mask, paint)
    assert got.shape == (box.h, box.w, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.asarray(crop_patch(Image.fromarray(image), box, mask, paint)))


# ---- read-ahead: same predictions, same order, same per-item errors ---------------------------------------------------
def test_read_ahead_keeps_order_and_raises_at_the_failing_item():
    def slow_square(x):
        time.sleep(0.002 * ((7 * x) % 5))  # finish out of order
        if x == 6:
            raise ValueError("six")
        return x * x

    for workers in (0, 1, 3):
        got = read_ahead(slow_square, range(6), workers)
        assert list(got) == [x * x for x in range(6)]
        stream = read_ahead(slow_square, range(10), workers)
        assert [next(stream) for _ in range(6)] == [x * x for x in range(6)]
        with pytest.raises(ValueError, match="six"):
            next(stream)


def test_read_ahead_is_bounded_and_runs_off_the_calling_thread():
    consumed, threads = [], set()

    def record(x):
        threads.add(threading.get_ident())
        return x

    def lazily():
        for x in range(100):
            consumed.append(x)
            yield x

    stream = read_ahead(record, lazily(), 2)
    assert next(stream) == 0
    assert consumed == [0, 1, 2]  # workers + 1 items submitted, not the whole input
    stream.close()
    assert threading.get_ident() not in threads

    consumed.clear()
    stream = read_ahead(record, lazily(), 1, ahead=lambda: 5)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    assert consumed == list(range(8))  # ahead() more than the items handed over
    stream.close()


def test_predict_many_reads_a_batch_of_patches_ahead(model, monkeypatch):
    """While the model runs on a batch, the threads read the next batch's images (one patch per image here)."""
    consumed, at_forward = [], []
    one_patch = [(tissue_image(32, seed=i), np.ones((32, 32), dtype=bool), str(i)) for i in range(40)]

    def lazily():
        for item in one_patch:
            consumed.append(item[2])
            yield item

    engine = InferenceEngine(model, make_image_processor(32), batch_size=8, num_workers=1)
    forward = engine.forward
    monkeypatch.setattr(
        engine, "forward", lambda pixels, tta=None: at_forward.append(len(consumed)) or forward(pixels)
    )
    predictions = list(engine.predict_many(lazily()))
    assert [p.image_id for p in predictions] == [str(i) for i in range(40)] and all(
        len(p.boxes) == 1 for p in predictions
    )
    # first forward: 8 images handed over, 1 (thread) + 8 (a batch of patches) more submitted
    assert at_forward[0] == 8 + 1 + 8


@pytest.mark.parametrize("num_workers", [1, 2])
def test_predict_many_with_workers_equals_one_thread_and_keeps_errors_in_place(model, items, num_workers, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with_bad = [
        *items[:2],
        (bad, None, "broken"),
        (tissue_image(48), np.zeros((3, 3), bool), "wrong mask"),
        *items[2:],
    ]
    engine = InferenceEngine(model, make_image_processor(32), tta="flips", batch_size=6)
    serial = list(engine.predict_many(with_bad, return_errors=True))
    threaded = InferenceEngine(model, make_image_processor(32), tta="flips", batch_size=6, num_workers=num_workers)
    got = list(threaded.predict_many(with_bad, return_errors=True))
    assert len(got) == len(with_bad)
    assert isinstance(got[2], DataError) and "broken.png" in str(got[2])
    assert isinstance(got[3], DataError) and "wrong mask" in str(got[3])
    assert [str(e) for e in got[2:4]] == [str(e) for e in serial[2:4]]
    for a, b in zip([*serial[:2], *serial[4:]], [*got[:2], *got[4:]]):
        assert a.image_id == b.image_id
        np.testing.assert_allclose(a.patch_probs, b.patch_probs, atol=1e-6)
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
    with pytest.raises(DataError, match="broken.png"):
        list(threaded.predict_many(with_bad))


def test_num_workers_is_checked(model):
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        InferenceEngine(model, make_image_processor(32), num_workers=-1)


# ---- compute_embeddings reads through a DataLoader with workers -------------------------------------------------------
def test_compute_embeddings_with_workers_equals_the_main_process(tmp_path):
    data_dir = make_synthetic_dataset(tmp_path / "data", n_train=4, n_test=0, size_range=(96, 128), seed=2)
    patching = PatchingConfig(strategy="grid", patch_size=48)
    data = load_patch_dataset(data_dir, patching, val_fraction=0.0, cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    model, processor = build_model(
        ModelArguments(model_name_or_path="tiny-vit", freeze="backbone"),
        data["train"].features["label"].names,
        patching=patching,
    )
    model.eval()
    patches = data["train"]
    results = {}
    for workers in (0, 2):
        cache = tmp_path / f"embeddings-{workers}"
        results[workers] = compute_embeddings(
            model, patches, processor, views="flips", batch_size=5, cache_dir=cache, num_workers=workers
        )
        key = embedding_cache_key(model, patches.with_format(None), input_spec(processor), "flips")
        assert [p.name for p in cache.iterdir()] == [f"embeddings-{key}.arrow"]  # the key ignores the workers
    assert len(patches) % 5  # a short last batch
    torch.testing.assert_close(results[2][:]["embeddings"], results[0][:]["embeddings"], atol=0, rtol=0)
    assert results[2][:]["labels"].tolist() == results[0][:]["labels"].tolist() == list(patches["label"])
