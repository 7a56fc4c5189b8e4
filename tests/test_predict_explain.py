"""`predict_folder` (submission CSV) and `explain_folder` (PNG per image: patch map + rollout/Grad-CAM)."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from hf_histo.data.images import DataError
from hf_histo.data.transforms import make_image_processor
from hf_histo.hub import save_for_hub
from hf_histo.inference.engine import InferenceEngine
from hf_histo.inference.explain import explain_folder, explain_image
from hf_histo.inference.loading import load_pipeline
from hf_histo.inference.predict import predict_folder
from hf_histo.inference.saliency import attention_rollout, grad_cam, patch_saliency
from hf_histo.models import HistoClassifierConfig, HistoClassifierForImageClassification, tiny_backbone_config

LABELS = {0: "HER2(+)", 1: "Luminal A", 2: "Luminal B", 3: "Triple negative"}


def tiny_model(family: str = "vit", patch_size: int = 32, **config_kwargs) -> HistoClassifierForImageClassification:
    torch.manual_seed(0)
    config = HistoClassifierConfig(
        backbone_config=tiny_backbone_config(family),
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        patching={"strategy": "grid", "patch_size": patch_size, "min_foreground": 200},
        **config_kwargs,
    )
    return HistoClassifierForImageClassification(config).eval()


def save(model, folder):
    return save_for_hub(model, folder, image_processor=make_image_processor(32))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return save(tiny_model("vit"), tmp_path_factory.mktemp("vit") / "model")


def write_image(path, seed, size=(96, 80)):
    rng = np.random.default_rng(seed)
    image = np.full((size[1], size[0], 3), 240, dtype=np.uint8)
    image[10:70, 10:86] = rng.integers(60, 220, size=(60, 76, 3))
    Image.fromarray(image).save(path)
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[10:70, 10 + seed : 60 + seed] = 255
    return mask


@pytest.fixture(scope="module")
def challenge(tmp_path_factory):
    """Challenge layout: train_data/img_XXXX.png + mask_XXXX.png, train_labels.csv, test_data/ without labels."""
    root = tmp_path_factory.mktemp("challenge")
    (root / "train_data").mkdir()
    (root / "test_data").mkdir()
    rows = ["sample_index,label"]
    for i in range(3):
        mask = write_image(root / "train_data" / f"img_{i:04d}.png", i)
        Image.fromarray(mask).save(root / "train_data" / f"mask_{i:04d}.png")
        rows.append(f"img_{i:04d}.png,{LABELS[i]}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    for i in range(2):
        mask = write_image(root / "test_data" / f"img_{i + 3:04d}.png", 10 + i)
        Image.fromarray(mask).save(root / "test_data" / f"mask_{i + 3:04d}.png")
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


# ---- predict --------------------------------------------------------------------------------------------------------
def test_predict_writes_the_submission_format(vit_dir, challenge, tmp_path):
    out = predict_folder(vit_dir, challenge, tmp_path / "submission.csv", split="all", progress=False)
    rows = read_csv(out)
    assert rows[0] == ["sample_index", "label"]
    assert [r[0] for r in rows[1:]] == [f"img_{i:04d}.png" for i in range(5)]  # train and test, file names
    assert all(r[1] in LABELS.values() for r in rows[1:])

    pipe = load_pipeline(vit_dir)
    expected = pipe(str(challenge / "test_data" / "img_0004.png"), mask=str(challenge / "test_data" / "mask_0004.png"))
    assert rows[5][1] == expected[0]["label"]


def test_predict_probs_adds_one_column_per_class(vit_dir, challenge, tmp_path):
    out = predict_folder(
        vit_dir, challenge, tmp_path / "probs.csv", probs=True, tta="d4", batch_size=3, split="all", progress=False
    )
    rows = read_csv(out)
    assert rows[0] == ["sample_index", "label", *LABELS.values()]
    for row in rows[1:]:
        probs = np.array(row[2:], dtype=float)
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert row[1] == list(LABELS.values())[int(np.argmax(probs))]

    pipe = load_pipeline(vit_dir)
    image, mask = challenge / "train_data" / "img_0001.png", challenge / "train_data" / "mask_0001.png"
    expected = {e["label"]: e["score"] for e in pipe(str(image), mask=str(mask), tta="d4", top_k=4)}
    np.testing.assert_allclose(np.array(rows[2][2:], dtype=float), [expected[v] for v in LABELS.values()], atol=1e-5)
    plain = {e["label"]: e["score"] for e in pipe(str(image), mask=str(mask), top_k=4)}
    assert not np.allclose([plain[v] for v in LABELS.values()], np.array(rows[2][2:], dtype=float), atol=1e-5)


def test_predict_uses_the_models_tta_and_aggregation_unless_told(challenge, tmp_path):
    model_dir = save(tiny_model(tta="flips", aggregation="hard"), tmp_path / "model")
    image, mask = challenge / "train_data" / "img_0002.png", challenge / "train_data" / "mask_0002.png"
    pipe = load_pipeline(model_dir)

    def row_probs(path):
        return np.array(read_csv(path)[3][2:], dtype=float)

    def pipe_probs(**kwargs):
        scores = {e["label"]: e["score"] for e in pipe(str(image), mask=str(mask), top_k=4, **kwargs)}
        return [scores[v] for v in LABELS.values()]

    default = row_probs(
        predict_folder(model_dir, challenge, tmp_path / "a.csv", probs=True, split="all", progress=False)
    )
    np.testing.assert_allclose(default, pipe_probs(tta="flips", aggregation="hard"), atol=1e-5)
    told = predict_folder(
        model_dir,
        challenge,
        tmp_path / "b.csv",
        probs=True,
        tta="none",
        aggregation="soft",
        split="all",
        progress=False,
    )
    np.testing.assert_allclose(row_probs(told), pipe_probs(tta="none", aggregation="soft"), atol=1e-5)
    assert not np.allclose(row_probs(told), default, atol=1e-5)
    with pytest.raises(ValueError, match="unknown TTA"):
        predict_folder(model_dir, challenge, tmp_path / "c.csv", tta="rot90", progress=False)


def test_predict_unlabelled_class_free_folder_and_bad_mask(vit_dir, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i, name in enumerate(["b.png", "a.png"]):
        write_image(data / "images" / name, i)
    out = predict_folder(vit_dir, data, tmp_path / "out.csv", aggregation="hard", progress=False)
    assert [r[0] for r in read_csv(out)[1:]] == ["a.png", "b.png"]  # no masks: tissue detection

    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(data / "masks" / "a.png")  # wrong size
    with pytest.raises(DataError, match="a.png"):
        predict_folder(vit_dir, data, tmp_path / "bad.csv", progress=False)
    assert not (tmp_path / "bad.csv").exists()  # nothing half-written
    out = predict_folder(vit_dir, data, tmp_path / "resized.csv", resize_masks=True, progress=False)
    assert len(read_csv(out)) == 3


# ---- explain --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "method"), [("vit", "attention rollout"), ("convnext", "Grad-CAM")])
def test_explain_folder_writes_one_png_per_image(family, method, challenge, tmp_path, monkeypatch):
    model_dir = save(tiny_model(family), tmp_path / "model")
    used = []
    import hf_histo.inference.explain as explain

    original = explain.patch_saliency

    def spy(*args, **kwargs):
        heat, name = original(*args, **kwargs)
        used.append(name)
        return heat, name

    monkeypatch.setattr(explain, "patch_saliency", spy)
    paths = explain_folder(model_dir, challenge, tmp_path / "explain", max_images=2, progress=False)
    assert [p.name for p in paths] == ["img_0000.png", "img_0001.png"]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 800 and im.height > 300
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
            assert pixels.std() > 10  # a real figure, not a blank canvas
    assert used == [method, method]
    assert not list((tmp_path / "explain").glob(".*"))  # atomic writes leave no temporary files


def test_explain_image_explains_the_top_patch_of_the_predicted_class(tmp_path, monkeypatch):
    import hf_histo.inference.explain as explain

    engine = InferenceEngine(tiny_model("vit"), make_image_processor(32), tta="flips")
    rng = np.random.default_rng(3)
    image = rng.integers(60, 220, size=(80, 96, 3), dtype=np.uint8)
    mask = np.zeros((80, 96), dtype=bool)
    mask[5:75, 10:90] = True
    seen = []
    original = explain.patch_saliency

    def spy(model, pixel_values, target, method="auto"):
        seen.append((pixel_values, target))
        return original(model, pixel_values, target, method)

    monkeypatch.setattr(explain, "patch_saliency", spy)
    path = explain_image(engine, image, mask, out_path=tmp_path / "x.png", true_label="Luminal A")
    assert path == tmp_path / "x.png" and path.stat().st_size > 10_000
    expected = engine.predict(image, mask)
    target = int(np.argmax(expected.probs))
    top = int(np.argmax(expected.patch_probs[:, target]))
    assert len(expected.boxes) > 1 and expected.tta == "flips"
    ((pixels, used_target),) = seen
    assert used_target == target
    patched = engine.patch(engine.decode(image), mask)
    torch.testing.assert_close(pixels, engine.preprocess(engine.crops(patched, [top])))


def test_explain_works_for_a_resnet_and_unlabelled_images(tmp_path):
    model_dir = save(tiny_model("resnet"), tmp_path / "model")
    data = tmp_path / "data" / "images"
    data.mkdir(parents=True)
    write_image(data / "x.png", 0)
    (path,) = explain_folder(model_dir, tmp_path / "data", tmp_path / "out", progress=False)
    assert path.name == "x.png" and path.stat().st_size > 10_000


def test_attention_rollout_and_grad_cam_maps():
    vit = tiny_model("vit")
    x = torch.randn(2, 3, 32, 32)
    rollout = attention_rollout(vit, x)
    assert rollout.shape == (2, 4, 4) and rollout.min() == 0.0 and rollout.max() == pytest.approx(1.0)
    assert vit.backbone.config._attn_implementation == "sdpa"  # restored after switching to eager
    cnn = tiny_model("convnext")
    cam = grad_cam(cnn, torch.randn(2, 3, 64, 64), target=[0, 1])
    assert cam.shape == (2, 64, 64) and 0.0 <= cam.min() and cam.max() <= 1.0
    assert all(p.grad is None for p in cnn.parameters())  # no gradients left behind on the weights
    with pytest.raises(ValueError, match="spatial feature map"):
        patch_saliency(vit, x[:1], target=0, method="gradcam")  # a ViT has token outputs, not feature maps
    with pytest.raises(ValueError, match="unknown explanation method"):
        patch_saliency(vit, x[:1], target=0, method="lime")


def test_explain_real_glas_image(shared_data, tmp_path):
    glas = shared_data("glas_train")
    model_dir = save(tiny_model("vit", patch_size=96), tmp_path / "model")
    (path,) = explain_folder(model_dir, glas, tmp_path / "explain", max_images=1, progress=False)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 800
