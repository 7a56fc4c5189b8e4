"""What users actually have: a plain folder, one image file, --masks, the challenge's splits; evaluate's table and its
warning about images the model trained on."""

import csv
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image
from tiny_models import LABELS, tiny_model, tissue_image

from hf_histo.data.fingerprint import file_digest
from hf_histo.data.images import DataError
from hf_histo.data.sources import detect_layout, read_samples
from hf_histo.data.transforms import make_image_processor
from hf_histo.hub import save_for_hub
from hf_histo.inference import engine as engine_module
from hf_histo.inference.evaluate import evaluate_model
from hf_histo.inference.explain import explain_folder
from hf_histo.inference.predict import predict_folder
from hf_histo.inference.results import ImageLevelResult
from hf_histo.inference.trained_images import SPLITS_NAME, splits_record

NAMES = list(LABELS.values())


def save(model, folder):
    return save_for_hub(model, folder, image_processor=make_image_processor(32))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save(tiny_model("vit"), tmp_path_factory.mktemp("model") / "model")


def write_image(path, seed, size=96):
    Image.fromarray(tissue_image(size, seed)).save(path)


def corner_mask(path, size=96):
    """A mask on the white background corner, where tissue detection would never cut a patch."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:40, :40] = 255
    Image.fromarray(mask).save(path)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture
def plain(tmp_path):
    """A plain folder: b.png, a.jpg, c.tif, a notes file, and a sub-folder of images that is not read."""
    root = tmp_path / "slides"
    root.mkdir()
    for seed, name in enumerate(["b.png", "a.jpg", "c.tif"]):
        write_image(root / name, seed)
    (root / "notes.txt").write_text("scanned 2024")
    (root / "thumbs").mkdir()
    write_image(root / "thumbs" / "x.png", 9)
    return root


@pytest.fixture
def spy(monkeypatch):
    """The (image, mask) pairs the engine was given."""
    seen = []
    original = engine_module.InferenceEngine.predict_many

    def predict_many(self, items, *args, **kwargs):
        def record():
            for image, mask, name in items:
                seen.append((image.name, None if mask is None else mask.name))
                yield image, mask, name

        return original(self, record(), *args, **kwargs)

    monkeypatch.setattr(engine_module.InferenceEngine, "predict_many", predict_many)
    return seen


# ---- plain folder, one file, masks ----------------------------------------------------------------------------------
def test_predict_on_a_plain_folder_writes_one_row_per_image(model_dir, plain, tmp_path, caplog, spy):
    assert detect_layout(plain) == "images"
    caplog.set_level(logging.INFO, logger="hf_histo")
    rows = read_csv(predict_folder(model_dir, plain, tmp_path / "out.csv", progress=False))
    assert rows[0] == ["sample_index", "label"]
    assert [r[0] for r in rows[1:]] == ["a.jpg", "b.png", "c.tif"]  # file names, in image-id order; no sub-folder
    assert all(r[1] in NAMES for r in rows[1:])
    assert [mask for _, mask in spy] == [None, None, None]  # no masks given: tissue detection
    assert "not its sub-folders with images (thumbs)" in caplog.text and "--masks DIR" in caplog.text
    assert "wrote 3 rows" in caplog.text and "all images" in caplog.text


def test_masks_folder_is_used_and_changes_the_prediction(model_dir, plain, tmp_path, spy):
    masks = tmp_path / "masks"
    masks.mkdir()
    corner_mask(masks / "a.png")  # another extension than a.jpg: same rule as the table layout's masks/
    corner_mask(masks / "b.png")
    without = read_csv(predict_folder(model_dir, plain, tmp_path / "tissue.csv", probs=True, progress=False))
    spy.clear()
    given = read_csv(predict_folder(model_dir, plain, tmp_path / "m.csv", probs=True, masks=masks, progress=False))
    assert spy == [("a.jpg", "a.png"), ("b.png", "b.png"), ("c.tif", None)]
    probs = {r[0]: np.array(r[2:], dtype=float) for r in given[1:]}
    tissue = {r[0]: np.array(r[2:], dtype=float) for r in without[1:]}
    assert not np.allclose(probs["a.jpg"], tissue["a.jpg"], atol=1e-4)  # background corner patches, not the disc
    np.testing.assert_allclose(probs["c.tif"], tissue["c.tif"], atol=1e-6)  # no mask given: tissue detection


def test_predict_on_one_image_file_with_and_without_its_mask_file(model_dir, plain, tmp_path):
    corner_mask(tmp_path / "a_mask.png")
    folder_masks = tmp_path / "masks"
    folder_masks.mkdir()
    corner_mask(folder_masks / "a.png")
    image = plain / "a.jpg"
    assert detect_layout(image) == "images"
    rows = read_csv(predict_folder(model_dir, image, tmp_path / "one.csv", probs=True, progress=False))
    assert len(rows) == 2 and rows[1][0] == "a.jpg"
    folder = read_csv(predict_folder(model_dir, plain, tmp_path / "all.csv", probs=True, progress=False))
    np.testing.assert_allclose(np.array(rows[1][2:], dtype=float), np.array(folder[1][2:], dtype=float), atol=1e-6)

    mask_file = tmp_path / "a_mask.png"
    by_file = predict_folder(model_dir, image, tmp_path / "f.csv", probs=True, masks=mask_file, progress=False)
    by_dir = predict_folder(model_dir, image, tmp_path / "d.csv", probs=True, masks=folder_masks, progress=False)
    masked = np.array(read_csv(by_file)[1][2:], dtype=float)
    np.testing.assert_allclose(masked, np.array(read_csv(by_dir)[1][2:], dtype=float), atol=1e-6)
    assert not np.allclose(masked, np.array(rows[1][2:], dtype=float), atol=1e-4)


def test_masks_given_override_the_layouts_own_per_image(tmp_path):
    root = tmp_path / "data"
    (root / "test_data").mkdir(parents=True)
    for i in range(2):
        write_image(root / "test_data" / f"img_{i}.png", i)
        corner_mask(root / "test_data" / f"mask_{i}.png")
    given = tmp_path / "better"
    given.mkdir()
    corner_mask(given / "img_1.png")
    samples = read_samples(root, masks=given).samples
    assert [s.mask_path for s in samples] == [root / "test_data" / "mask_0.png", given / "img_1.png"]


def test_a_challenge_folder_given_directly_pairs_masks_with_images(tmp_path):
    folder = tmp_path / "test_data"
    folder.mkdir()
    write_image(folder / "img_0003.png", 0)
    corner_mask(folder / "mask_0003.png")
    write_image(folder / "img_0004.png", 1)
    (sample,) = read_samples(folder / "img_0003.png").samples
    assert sample.mask_path == folder / "mask_0003.png" and sample.label is None and sample.image_id == "img_0003"
    set_ = read_samples(folder)
    assert set_.layout == "images" and [s.image_id for s in set_.samples] == ["img_0003", "img_0004"]
    assert [s.mask_path for s in set_.samples] == [folder / "mask_0003.png", None]


def test_explain_on_one_file_with_a_mask(model_dir, plain, tmp_path):
    corner_mask(tmp_path / "m.png")
    (path,) = explain_folder(model_dir, plain / "b.png", tmp_path / "x", masks=tmp_path / "m.png", progress=False)
    assert path == tmp_path / "x" / "b.png" and path.stat().st_size > 10_000


def _table_with_images(root):
    (root / "images").mkdir(parents=True)
    write_image(root / "images" / "a.png", 0)


BAD = [
    ("missing path", lambda t: t / "nope", {}, r"nope: no such data folder or image file; pass the folder"),
    ("non-image file", lambda t: (t / "n.txt").write_text("x") and t / "n.txt", {}, r"n\.txt: not an image file"),
    ("empty folder", lambda t: (t / "e").mkdir() or t / "e", {}, r"e: the data folder is empty"),
    (
        "folder without images",
        lambda t: (t / "d").mkdir() or (t / "d" / "a.txt").write_text("x") and t / "d",
        {},
        r"d: unknown data layout: no image files .* \(found a\.txt\)",
    ),
    ("missing masks", lambda t: _table_with_images(t) or t, {"masks": "no_masks"}, r"no_masks: no such mask folder"),
    (
        "mask file for a folder",
        lambda t: _table_with_images(t) or corner_mask(t / "m.png") or t,
        {"masks": "m.png"},
        r"m\.png: a mask file fits one image, but .* is a folder of 1 images",
    ),
]


@pytest.mark.parametrize(("make", "kwargs", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_path_and_the_fix(tmp_path, make, kwargs, message):
    path = make(tmp_path)
    kwargs = {k: tmp_path / v for k, v in kwargs.items()}
    with pytest.raises(DataError, match=message):
        read_samples(path, **kwargs)


# ---- the challenge layout's splits ----------------------------------------------------------------------------------
@pytest.fixture
def challenge(tmp_path):
    root = tmp_path / "challenge"
    (root / "train_data").mkdir(parents=True)
    (root / "test_data").mkdir()
    rows = ["sample_index,label"]
    for i in range(3):
        write_image(root / "train_data" / f"img_{i:04d}.png", i)
        rows.append(f"img_{i:04d}.png,{NAMES[i]}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    for i in range(3, 5):
        write_image(root / "test_data" / f"img_{i:04d}.png", i)
    return root


def test_challenge_predict_writes_the_test_rows_unless_told(model_dir, challenge, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_histo")

    def names(**kwargs):
        return [
            r[0]
            for r in read_csv(predict_folder(model_dir, challenge, tmp_path / "s.csv", progress=False, **kwargs))[1:]
        ]

    assert names() == ["img_0003.png", "img_0004.png"]  # a valid submission
    assert "wrote 2 rows" in caplog.text and "split 'test'" in caplog.text
    assert names(split="test") == ["img_0003.png", "img_0004.png"]
    assert names(split="all") == [f"img_{i:04d}.png" for i in range(5)]
    assert names(split="train") == ["img_0000.png", "img_0001.png", "img_0002.png"]
    with pytest.raises(ValueError, match="split must be one of"):
        names(split="validation")


def test_challenge_without_test_data_predicts_train_with_a_warning(model_dir, challenge, tmp_path, caplog):
    shutil.rmtree(challenge / "test_data")
    rows = read_csv(predict_folder(model_dir, challenge, tmp_path / "s.csv", progress=False))
    assert len(rows) == 4
    assert "no test_data/ images, so the 3 train_data images are predicted" in caplog.text


def test_train_or_test_split_needs_a_layout_with_splits(model_dir, plain, tmp_path):
    with pytest.raises(DataError, match=r"slides: the images layout has no train/test split; drop --split"):
        predict_folder(model_dir, plain, tmp_path / "s.csv", split="test", progress=False)
    assert len(read_csv(predict_folder(model_dir, plain, tmp_path / "s.csv", split="all", progress=False))) == 4


# ---- evaluate: table, progress bar, trained-on warning --------------------------------------------------------------
def make_table(root, seeds, names=None):
    (root / "images").mkdir(parents=True)
    rows = ["filename,label"]
    for k, seed in enumerate(seeds):
        name = (names or [f"img_{s:04d}" for s in seeds])[k] + ".png"
        write_image(root / "images" / name, seed)
        rows.append(f"{name},{NAMES[seed % 3]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def trained_model(folder, data, train_ids, fingerprints=True):
    """The tiny model saved with a splits.json as `finalize_run` writes it (or as older versions did)."""
    save(tiny_model("vit"), folder)
    splits = {"train": sorted(train_ids), "validation": []}
    record = splits_record(splits, read_samples(data).samples) if fingerprints else splits
    (folder / SPLITS_NAME).write_text(json.dumps(record))
    return folder


def test_evaluate_table_json_and_progress_bar(model_dir, tmp_path, capsys):
    data = make_table(tmp_path / "data", range(6))
    result = evaluate_model(model_dir, data, tmp_path / "m.json", n_bootstrap=20)
    assert "evaluate: 100%" in capsys.readouterr().err  # the progress bar, on stderr
    table = result.table()
    m, low = result.metrics, result.ci["macro_f1"][0]
    assert f"{'image macro-F1':<18} {m['macro_f1']:.3f}  (95% CI {low:.3f} to" in table
    assert f"{'balanced accuracy':<18} {m['balanced_accuracy']:.3f}" in table
    assert f"{'AUROC (macro)':<18} {m['auroc']:.3f}" in table
    assert f"{'patch macro-F1':<18} {result.patch_metrics['macro_f1']:.3f}  ({result.n_patches} patches)" in table
    assert f"{'images':<18} 6\n" in table and "trained on" not in table
    lines = table.splitlines()
    header = lines.index("confusion matrix (rows: true, columns: predicted)")
    assert lines[header + 1].strip() == "HER2(+)  Luminal A  Luminal B"
    for name, row, line in zip(NAMES, m["confusion_matrix"], lines[header + 2 :]):
        assert line.startswith(name) and [int(x) for x in line[len(name) :].split()] == row
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["trained_on"] == [] and ImageLevelResult.load(tmp_path / "m.json").table() == table


def test_table_without_ci_auroc_or_patches():
    result = ImageLevelResult.from_predictions(["x", "y"], ["a"], [0], [[0.9, 0.1]], aggregation="soft", tta="none")
    table = result.table()
    assert f"{'image macro-F1':<18} 1.000\n" in table and f"{'AUROC (macro)':<18} n/a" in table
    assert f"{'patch macro-F1':<18} n/a" in table and f"{'images':<18} 1\n" in table


def test_evaluate_warns_about_training_images_by_content(tmp_path, caplog):
    data = make_table(tmp_path / "data", range(6))
    model = trained_model(tmp_path / "model", data, ["img_0000", "img_0001", "img_0002", "img_0003"])
    splits = json.loads((model / SPLITS_NAME).read_text())
    assert splits["fingerprints"]["train"]["img_0001"] == file_digest(data / "images" / "img_0001.png")

    result = evaluate_model(model, data, tmp_path / "m.json", n_bootstrap=5, progress=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "trained on" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].name.startswith("hf_histo")
    message = warnings[0].getMessage()
    assert "4 of 6 evaluated images are images the model trained on (matched by content)" in message
    assert "img_0000, img_0001, img_0002, ... (1 more)" in message and "optimistic" in message
    assert result.trained_on == ["img_0000", "img_0001", "img_0002", "img_0003"]
    assert json.loads((tmp_path / "m.json").read_text())["trained_on"] == result.trained_on
    assert f"{'trained on':<18} 4 of the images" in result.table()

    # the same pixels under other names, in another folder: still recognised; new images are not
    caplog.clear()
    renamed = make_table(tmp_path / "renamed", [1, 4, 5], names=["case_a", "case_b", "case_c"])
    assert evaluate_model(model, renamed, None, n_bootstrap=5, progress=False).trained_on == ["case_a"]
    assert "1 of 3 evaluated images" in caplog.text
    caplog.clear()
    new = make_table(tmp_path / "new", [7, 8, 9], names=["img_0000", "img_0001", "img_0002"])  # same names only
    assert evaluate_model(model, new, None, n_bootstrap=5, progress=False).trained_on == []
    assert "trained on" not in caplog.text


def test_older_splits_json_falls_back_to_names(tmp_path, caplog):
    data = make_table(tmp_path / "data", range(4))
    model = trained_model(tmp_path / "model", data, ["img_0001", "img_0002"], fingerprints=False)
    assert evaluate_model(model, data, None, n_bootstrap=5, progress=False).trained_on == ["img_0001", "img_0002"]
    assert "2 of 4 evaluated images" in caplog.text and "matched by name" in caplog.text


def test_cv_ensemble_evaluated_on_its_own_data_warns_once_with_the_folds(tmp_path, caplog):
    data = make_table(tmp_path / "data", range(4))
    trained_model(tmp_path / "cv" / "fold_0", data, ["img_0000", "img_0001"])
    trained_model(tmp_path / "cv" / "fold_1", data, ["img_0002"])
    result = evaluate_model(tmp_path / "cv", data, None, n_bootstrap=5, progress=False)
    assert result.trained_on == ["img_0000", "img_0001", "img_0002"]
    (message,) = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
    assert "3 of 4 evaluated images" in message and "per fold: fold_0 2, fold_1 1" in message
