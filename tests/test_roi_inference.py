"""ROI models at inference: `hf-histo segment`, and the classifier patching images without a mask on their region."""

import csv
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import HIDE_HF_HISTO, tiny_model, tissue_image

from hf_histo.cli import main
from hf_histo.data.images import DataError
from hf_histo.data.sources import read_samples
from hf_histo.data.transforms import make_image_processor
from hf_histo.hub import save_for_hub
from hf_histo.inference.engine import InferenceEngine
from hf_histo.inference.evaluate import evaluate_model
from hf_histo.inference.loading import load_pipeline
from hf_histo.inference.roi import RoiSegmenter
from hf_histo.inference.segment import segment_folder
from hf_histo.models import HistoSegmentationConfig, HistoSegmentationModel

SIZES = {"a": (96, 80), "b": (112, 96), "c": (80, 80)}  # image id -> (width, height)
LABELS = {"a": "HER2(+)", "b": "Luminal A", "c": "Luminal B"}


def segmentation_folder(path, roi: bool):
    """A tiny U-Net folder whose head predicts the region everywhere (``roi``) or nowhere: a known mask."""
    from transformers import SegformerImageProcessor

    config = HistoSegmentationConfig(encoder_depth=3, decoder_channels=(16, 8, 8), window_size=64)
    model = HistoSegmentationModel(config)
    head = model.net.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([-10.0, 10.0] if roi else [10.0, -10.0]))
    model.save_pretrained(path)
    SegformerImageProcessor(do_resize=False, do_reduce_labels=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    processor = make_image_processor(32)
    seg_all = segmentation_folder(root / "seg_all", roi=True)
    seg_none = segmentation_folder(root / "seg_none", roi=False)
    cls = save_for_hub(tiny_model(), root / "cls", image_processor=processor)
    with_roi = tiny_model(roi_model=str(seg_all))
    cls_roi = save_for_hub(with_roi, root / "cls_roi", image_processor=processor)
    return {"seg_all": seg_all, "seg_none": seg_none, "cls": cls, "cls_roi": cls_roi, "processor": processor}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Table layout: three labelled images with patients (one with its own mask) and one corrupt file."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        Image.fromarray(tissue_image(160, seed)).resize((width, height)).save(root / "images" / f"{name}.png")
    mask = np.zeros((80, 96), dtype=np.uint8)
    mask[10:60, 10:70] = 255
    Image.fromarray(mask).save(root / "masks" / "a.png")
    (root / "images" / "bad.png").write_bytes(b"not an image")
    rows = ["filename,label,patient_id", *(f"{n}.png,{LABELS[n]},p{i // 2}" for i, n in enumerate(SIZES))]
    (root / "labels.csv").write_text("\n".join([*rows, "bad.png,Luminal A,p9"]) + "\n")
    return root


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- hf-histo segment -----------------------------------------------------------------------------------------------
def test_segment_writes_data_every_command_reads_and_skips_a_bad_image(models, data, tmp_path, caplog):
    before = {p.name: p.read_bytes() for p in (data / "images").iterdir()}
    with caplog.at_level(logging.WARNING, logger="hf_histo"):
        result = segment_folder(models["seg_all"], data, tmp_path / "out", on_error="skip", progress=False)
    assert result.written == ["a", "b", "c"] and result.labelled
    assert [file for file, _ in result.skipped] == [str(data / "images" / "bad.png")]
    assert "bad.png" in caplog.text and "replace or remove it" in caplog.text  # named, with the fix
    assert "wrote 3 images" in result.summary() and "1 skipped" in result.summary()

    back = read_samples(tmp_path / "out")
    assert back.layout == "table" and [s.image_id for s in back.samples] == ["a", "b", "c"]
    source = {s.image_id: s for s in read_samples(data, on_error="skip").samples}
    for sample in back.samples:
        assert (sample.label, sample.group_id) == (source[sample.image_id].label, source[sample.image_id].group_id)
        assert sample.image_path.read_bytes() == source[sample.image_id].image_path.read_bytes()
        mask = Image.open(sample.mask_path)
        assert sample.mask_path.name == f"{sample.image_id}.png" and mask.mode == "L"
        assert mask.size == SIZES[sample.image_id] and set(np.unique(np.asarray(mask))) == {255}  # all ROI, 0/255
    assert {p.name: p.read_bytes() for p in (data / "images").iterdir()} == before  # the source is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_segment_refuses_an_earlier_output_and_the_data_folder(models, data, tmp_path):
    out = tmp_path / "out"
    segment_folder(models["seg_none"], data / "images" / "a.png", out, progress=False)
    assert set(np.unique(np.asarray(Image.open(out / "masks" / "a.png")))) == {0}
    assert not (out / "labels.csv").exists()  # one image file: no labels
    with pytest.raises(DataError, match="already holds images, masks; .*--overwrite_output_dir"):
        segment_folder(models["seg_all"], data / "images" / "a.png", out, progress=False)
    segment_folder(models["seg_all"], data / "images" / "b.png", out, progress=False, overwrite=True)
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["b.png"]  # the earlier run's files are gone
    with pytest.raises(DataError, match="holds the data's file"):
        segment_folder(models["seg_all"], data, data, on_error="skip", progress=False, overwrite=True)
    with pytest.raises(DataError, match="bad.png: not an image file PIL can read.*--on_error skip"):
        segment_folder(models["seg_all"], data, tmp_path / "raise", progress=False)
    assert not (tmp_path / "raise").exists()


def test_segment_command(models, data, tmp_path, capsys):
    code = main(["segment", str(data), "--model", str(models["seg_all"]), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0 and "wrote 3 images" in out and "1 skipped" in out, err
    assert "bad.png" in err  # --on_error skip is the command's default: the bad image is listed on stderr
    assert len(read_samples(tmp_path / "out").samples) == 3


# ---- the classifier with an ROI model -------------------------------------------------------------------------------
def test_pipeline_uses_the_roi_model_for_images_without_a_mask(models):
    image = tissue_image(seed=3)
    classify = load_pipeline(models["cls"], roi_model=models["seg_all"])
    result = classify(image, return_patches=True)
    assert result["mask_source"] == "roi_model" and result["fallback"] is None
    whole = InferenceEngine(classify.model, models["processor"]).predict(image, np.ones(image.shape[:2]))
    assert len(result["patches"]) == len(whole.boxes)  # the region predicted everywhere: the whole image
    assert [s["score"] for s in result["predictions"]] == pytest.approx([s["score"] for s in whole.scores(5)])
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[40:120, 40:120] = True
    assert classify(image, mask=mask, return_patches=True)["mask_source"] == "mask"  # a given mask wins
    assert classify(image, roi_model=False, return_patches=True)["mask_source"] == "tissue"
    none = classify(image, roi_model=models["seg_none"], return_patches=True)  # per call
    assert classify(image, return_patches=True)["mask_source"] == "roi_model"
    assert load_pipeline(models["cls"])(image, return_patches=True)["mask_source"] == "tissue"
    assert none["mask_source"] == none["fallback"] == "empty_roi_tissue"


def test_empty_roi_falls_back_to_tissue_detection(models):
    image = tissue_image(seed=4)
    classify = load_pipeline(models["cls"])
    roi = RoiSegmenter.from_pretrained(models["seg_none"], device="cpu")
    empty = InferenceEngine(classify.model, models["processor"], roi=roi).predict(image)
    tissue = InferenceEngine(classify.model, models["processor"]).predict(image)
    assert (empty.mask_source, empty.fallback, tissue.mask_source) == (
        "empty_roi_tissue",
        "empty_roi_tissue",
        "tissue",
    )
    np.testing.assert_array_equal(empty.boxes, tissue.boxes)
    np.testing.assert_allclose(empty.probs, tissue.probs)


def test_predict_and_evaluate_with_roi_model(models, data, tmp_path, capsys):
    csv_path = tmp_path / "predictions.csv"
    argv = ["predict", str(data), "--model", str(models["cls"]), "--out", str(csv_path), "--num_workers", "0"]
    assert main([*argv, "--roi_model", str(models["seg_all"])]) == 0, capsys.readouterr().err
    rows = {row["sample_index"]: row for row in read_rows(csv_path)}
    assert {name: row["mask_source"] for name, row in rows.items()} == {
        "a.png": "mask",  # its own mask wins
        "b.png": "roi_model",
        "c.png": "roi_model",
        "bad.png": "",
    }
    assert rows["bad.png"]["error"] and not rows["b.png"]["error"]
    # The model's config names the ROI model: used by default, and `--roi_model none` turns it off.
    assert main(["predict", str(data), "--model", str(models["cls_roi"]), "--out", str(csv_path)]) == 0
    assert read_rows(csv_path)[1]["mask_source"] == "roi_model"
    assert (
        main(["predict", str(data), "--model", str(models["cls_roi"]), "--out", str(csv_path), "--roi_model", "none"])
        == 0
    )
    assert "mask_source" not in read_rows(csv_path)[0]
    result = evaluate_model(
        models["cls"],
        data,
        tmp_path / "metrics.json",
        roi_model=models["seg_none"],
        on_error="skip",
        n_bootstrap=5,
        progress=False,
        num_workers=0,
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["image_ids"] == result.image_ids == ["a", "b", "c"]
    assert saved["mask_source"] == ["mask", "empty_roi_tissue", "empty_roi_tissue"]


REMOTE = HIDE_HF_HISTO + textwrap.dedent(
    """
    classify = pipeline("histo-image-classification", model=sys.argv[1], trust_remote_code=True)
    image = np.load(sys.argv[2])
    out = classify(image, return_patches=True)
    off = classify(image, roi_model=False, return_patches=True)
    assert not any(m.startswith("hf_histo") for m in sys.modules)
    print(json.dumps({"source": out["mask_source"], "off": off["mask_source"], "n": len(out["patches"])}))
    """
)


def test_hub_folder_with_roi_model_in_its_config_uses_it_without_hf_histo(models, tmp_path):
    folder = models["cls_roi"]
    assert json.loads((folder / "config.json").read_text())["roi_model"] == str(models["seg_all"])
    assert (folder / "roi.py").is_file()
    assert f"ROI segmentation model `{models['seg_all']}`" in (folder / "README.md").read_text()
    image = tissue_image(seed=5)
    np.save(tmp_path / "image.npy", image)
    (tmp_path / "remote.py").write_text(REMOTE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(folder), str(tmp_path / "image.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "HF_HOME": str(tmp_path / "hf_home")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert (remote["source"], remote["off"]) == ("roi_model", "tissue")
    expected = load_pipeline(folder)(image, return_patches=True)
    assert expected["mask_source"] == "roi_model" and remote["n"] == len(expected["patches"])
