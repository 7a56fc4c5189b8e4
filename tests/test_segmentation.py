"""ROI segmentation: training learns generated masks, sliding-window inference, multi-class masks, saved folders."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from hf_histo.data.images import DataError
from hf_histo.data.masks import load_class_mask
from hf_histo.hub import write_segmentation_card
from hf_histo.inference.roi import RoiSegmenter, window_starts
from hf_histo.inference.segmentation_metrics import confusion, segmentation_scores
from hf_histo.training.segmentation import (
    METRICS_FILE,
    SegmentationLoss,
    build_segmentation_model,
    cross_validate_segmentation,
    train_segmentation,
)
from hf_histo.training.segmentation_data import SegmentationArguments, segmentation_samples

TINY = dict(encoder_depth=3, decoder_channels="16,8,8", crop_size=64, crops_per_image=4, window_size=96)


def _blob_image(rng: np.random.Generator, size: tuple[int, int], n_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Pink noisy background with dark purple disks (class 1) and, for 3 classes, pale blue squares (class 2)."""
    h, w = size
    image = np.clip(rng.normal((235, 200, 215), 12, (h, w, 3)), 0, 255)
    target = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(3):
        cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(8, 18)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        image[disk] = np.clip(rng.normal((90, 40, 120), 12, (int(disk.sum()), 3)), 0, 255)
        target[disk] = 1
    if n_classes > 2:
        y, x = rng.integers(0, h - 16), rng.integers(0, w - 16)
        image[y : y + 16, x : x + 16] = (150, 190, 240)
        target[y : y + 16, x : x + 16] = 2
    return image.astype(np.uint8), target


def _write_table(root: Path, n: int, seed: int = 0, n_classes: int = 2, size=(96, 112)) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["filename,label,patient_id"]
    for i in range(n):
        image, target = _blob_image(rng, size, n_classes)
        Image.fromarray(image).save(root / "images" / f"im{i:02d}.png")
        mask = target * 255 if n_classes == 2 else target
        if n_classes > 2:
            mask[:4, :4] = 255  # unannotated corner
        Image.fromarray(mask).save(root / "masks" / f"im{i:02d}.png")
        rows.append(f"im{i:02d}.png,{'a' if i % 2 else 'b'},p{i // 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _training_args(out: Path, epochs: float = 6, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **kw,
    )


def test_training_learns_generated_masks_well_above_chance(tmp_path):
    data = _write_table(tmp_path / "data", 16)
    args = SegmentationArguments(data_dir=str(data), **TINY)
    samples = segmentation_samples(args)
    train, validation = samples[:12], samples[12:]
    record = train_segmentation(args, _training_args(tmp_path / "model", epochs=12), train, validation)
    scores = record["validation"]
    # Chance levels on these images: all-background gives ROI Dice 0; all-ROI gives 2p / (1 + p) with p ~ 0.1.
    truth = np.concatenate([np.asarray(Image.open(s.mask_path)).ravel() > 0 for s in validation])
    all_roi_dice = 2 * truth.mean() / (1 + truth.mean())
    assert scores["dice"]["roi"] > all_roi_dice + 0.4 and scores["dice"]["roi"] > 0.7, scores
    saved = json.loads((tmp_path / "model" / METRICS_FILE).read_text())
    assert saved["validation"]["mean_dice"] == pytest.approx(scores["mean_dice"])
    assert (tmp_path / "model" / "predictions.png").is_file()


class _PixelModel(torch.nn.Module):
    """A per-pixel (1x1 conv) segmenter: every window placement must give the single-pass logits exactly."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.config = type("C", (), {"id2label": {0: "bg", 1: "a", 2: "b"}, "window_size": 32, "window_overlap": 0.5})

    def forward(self, pixel_values):
        return type("O", (), {"logits": self.conv(pixel_values)})


def test_sliding_windows_blend_to_the_single_pass_result():
    torch.manual_seed(0)
    model = _PixelModel()
    image = np.random.default_rng(0).integers(0, 256, (70, 101, 3), dtype=np.uint8)
    tiled = RoiSegmenter(model, batch_size=3).logits(image)
    whole = RoiSegmenter(model, window_size=512).logits(image)
    assert tiled.shape == (3, 70, 101)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)
    assert window_starts(101, 32, 0.5) == [0, 16, 32, 48, 64, 69]


def test_sliding_window_equals_one_forward_where_the_image_fits_one_window(tmp_path):
    args = SegmentationArguments(data_dir="unused", **TINY)
    model, processor = build_segmentation_model(args)
    model.eval()
    image = np.random.default_rng(1).integers(0, 256, (80, 90, 3), dtype=np.uint8)
    segmenter = RoiSegmenter(model, processor)
    assert segmenter.window == 96
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - segmenter.mean) / segmenter.std
    with torch.no_grad():
        expected = model(pixel_values=x).logits[0]
    logits = segmenter.logits(image)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)  # one forward; float order may differ
    assert torch.equal(logits.argmax(0), expected.argmax(0))
    big = np.random.default_rng(2).integers(0, 256, (200, 150, 3), dtype=np.uint8)
    assert segmenter.predict(big).shape == (200, 150)


def test_multiclass_masks_with_an_ignore_index(tmp_path):
    data = _write_table(tmp_path / "data", 8, n_classes=3)
    args = SegmentationArguments(data_dir=str(data), mask_mode="multiclass", classes="background,nuclei,lumen", **TINY)
    mask = load_class_mask(data / "masks" / "im00.png", (112, 96), 3, 255)
    assert set(np.unique(mask)) <= {0, 1, 2, 255} and (mask == 255).sum() == 16
    with pytest.raises(DataError, match="im00.png.*neither classes 0..1"):
        load_class_mask(data / "masks" / "im00.png", (112, 96), 2, 255)
    # Unannotated pixels change neither the loss nor the scores.
    loss = SegmentationLoss(torch.tensor([1.0, 2.0, 3.0]), ignore_index=255, dice_weight=1.0)
    logits = torch.randn(2, 3, 8, 8)
    labels = torch.randint(0, 3, (2, 8, 8))
    masked = labels.clone()
    masked[:, :2] = 255
    other = torch.randn(2, 3, 8, 8)
    other[:, :, 2:] = logits[:, :, 2:]
    out = {"logits": logits}
    assert loss(out, masked) == pytest.approx(float(loss({"logits": other}, masked)))
    assert confusion(masked[0].numpy(), np.zeros((8, 8), np.uint8), 3).sum() == 48
    samples = segmentation_samples(args)
    record = train_segmentation(args, _training_args(tmp_path / "model", epochs=1), samples[:6], samples[6:])
    assert set(record["validation"]["iou"]) == {"background", "nuclei", "lumen"}
    assert record["validation"]["pixels"] == 2 * (96 * 112 - 16)


def test_segmentation_scores_of_a_known_confusion_matrix():
    matrix = np.array([[50, 10], [5, 35]])
    scores = segmentation_scores(matrix, ["background", "roi"])
    assert scores["iou"]["roi"] == pytest.approx(35 / 50)
    assert scores["dice"]["roi"] == pytest.approx(70 / 85)
    assert scores["mean_iou"] == pytest.approx(35 / 50)  # background excluded
    assert scores["pixel_accuracy"] == pytest.approx(0.85)


def test_saved_folder_runs_in_the_image_segmentation_pipeline(tmp_path):
    from transformers import pipeline

    data = _write_table(tmp_path / "data", 6)
    args = SegmentationArguments(data_dir=str(data), **TINY)
    samples = segmentation_samples(args)
    train_segmentation(args, _training_args(tmp_path / "model", epochs=1), samples, [], write_segmentation_card)
    segment = pipeline("image-segmentation", model=str(tmp_path / "model"), trust_remote_code=True)
    image = Image.open(samples[0].image_path)
    out = segment(image)
    assert {o["label"] for o in out} <= {"background", "roi"} and out
    assert all(o["mask"].size == image.size for o in out)
    predicted = RoiSegmenter.from_pretrained(tmp_path / "model", window_size=512).predict(image)
    roi = next((o for o in out if o["label"] == "roi"), None)
    expected = np.asarray(roi["mask"]) > 0 if roi else np.zeros_like(predicted, bool)
    assert (expected == (predicted > 0)).mean() > 0.99  # the pipeline's one pass is the segmenter's one window
    assert not list((tmp_path / "model").glob("checkpoint-*"))
    assert "image-segmentation" in (tmp_path / "model" / "README.md").read_text()


def test_cross_validation_skips_finished_folds(tmp_path):
    data = _write_table(tmp_path / "data", 8)
    args = SegmentationArguments(data_dir=str(data), n_folds=2, **TINY)
    out = tmp_path / "cv"
    first = cross_validate_segmentation(args, _training_args(out, epochs=1))
    assert len(first["folds"]) == 2 and (out / "cv_metrics.json").is_file()
    mtime = (out / "fold_0" / METRICS_FILE).stat().st_mtime_ns
    again = cross_validate_segmentation(args, _training_args(out, epochs=1))
    assert (out / "fold_0" / METRICS_FILE).stat().st_mtime_ns == mtime
    assert again["mean"] == first["mean"]
    groups = [set(r["validation_images"]) for r in first["folds"]]
    assert not groups[0] & groups[1]


def test_images_without_masks_are_refused_clearly(tmp_path):
    data = _write_table(tmp_path / "data", 4)
    for mask in (data / "masks").iterdir():
        mask.unlink()
    (data / "masks").rmdir()
    with pytest.raises(DataError, match="no image has a mask"):
        segmentation_samples(SegmentationArguments(data_dir=str(data)))


def test_recipe_entry_point_trains_saves_and_refuses_a_finished_folder(tmp_path, capsys):
    import runpy
    import sys

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "roi_segmentation.py"
    data = _write_table(tmp_path / "data", 8)
    argv = [str(recipe), "--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--demo"]
    argv += ["--max_steps", "2", "--use_cpu", "--disable_tqdm", "true", "--val_fraction", "0.25"]
    old = sys.argv
    try:
        sys.argv = argv
        runpy.run_path(str(recipe), run_name="__main__")
        assert "validation (2 images): mean Dice" in capsys.readouterr().out
        metrics = json.loads((tmp_path / "out" / METRICS_FILE).read_text())
        assert metrics["n_train_images"] == 6 and metrics["validation"]["pixels"] == 2 * 96 * 112
        with pytest.raises(DataError, match="holds a finished run.*--overwrite_output_dir"):
            runpy.run_path(str(recipe), run_name="__main__")
        sys.argv = argv + ["--overwrite_output_dir", "true", "--val_fraction", "0"]
        runpy.run_path(str(recipe), run_name="__main__")
        metrics = json.loads((tmp_path / "out" / METRICS_FILE).read_text())
        assert metrics["n_train_images"] == 8 and "validation" not in metrics
        assert not (tmp_path / "out" / "predictions.png").exists()  # the replaced run's plot is not left behind
        assert "no validation split" in (tmp_path / "out" / "README.md").read_text()
    finally:
        sys.argv = old


def test_binary_predictions_fill_enclosed_holes_when_the_config_says_so():
    class Ring(torch.nn.Module):
        """Predicts ROI on a ring (a gland whose lumen the model missed) and background elsewhere."""

        def __init__(self, fill: bool):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.config = type("C", (), {"id2label": {0: "background", 1: "roi"}, "fill_holes": fill})

        def forward(self, pixel_values):
            b, _, h, w = pixel_values.shape
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            r = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2).sqrt()
            ring = ((r > 8) & (r < 16)).float()
            return type("O", (), {"logits": torch.stack([1 - ring, ring])[None].expand(b, -1, -1, -1)})

    image = np.zeros((48, 48, 3), np.uint8)
    filled = RoiSegmenter(Ring(True)).predict(image)
    raw = RoiSegmenter(Ring(False)).predict(image)
    assert raw[24, 24] == 0 and filled[24, 24] == 1  # the lumen belongs to the region
    assert (filled[raw == 1] == 1).all() and filled[0, 0] == 0  # nothing outside the region is added
    assert RoiSegmenter(Ring(True), fill_holes=False).predict(image)[24, 24] == 0
