"""One path from pixels to an image label: metrics.json, `hf-histo evaluate` and the shipped pipeline agree."""

import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hf_histo.recipes import vit_differential_lr as recipe
from PIL import Image
from tiny_models import HIDE_HF_HISTO

from hf_histo.data.sources import read_samples
from hf_histo.data.synthetic import make_synthetic_dataset
from hf_histo.inference.evaluate import evaluate_model
from hf_histo.inference.results import ImageLevelResult
from hf_histo.training.arguments import parse_args

TOL = 1e-5
FAST = ["--max_steps", "3", "--use_cpu", "--image_size", "32", "--per_device_train_batch_size", "8"]
FAST += ["--dataloader_num_workers", "0", "--n_bootstrap", "20", "--disable_tqdm", "true"]

# Runs the shipped pipeline in a fresh interpreter where `import hf_histo` fails: only the folder's code is used.
REMOTE = HIDE_HF_HISTO + textwrap.dedent(
    """
    from PIL import Image

    model_dir, jobs = sys.argv[1], json.loads(sys.argv[2])
    classify = pipeline("histo-image-classification", model=model_dir, trust_remote_code=True)
    assert not any(m.startswith("hf_histo") for m in sys.modules)

    def load(spec):
        if spec["kind"] == "path":
            return spec["value"]
        rgb = np.asarray(Image.open(spec["value"]).convert("RGB"))
        if spec["kind"] == "uint16":
            return rgb.astype(np.uint16) * 257
        if spec["kind"] == "float":
            return rgb.astype(np.float32) / 255.0
        if spec["kind"] == "rgba":
            return np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
        return rgb

    out = {}
    for key, job in jobs.items():
        kwargs = {} if job["tta"] is None else {"tta": job["tta"]}
        scores = classify(load(job["image"]), mask=job["mask"], top_k=100, **kwargs)
        out[key] = {s["label"]: s["score"] for s in scores}
    print(json.dumps(out))
    """
)


def _remote(model_dir, jobs):
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE, str(model_dir), json.dumps(jobs)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _format_variants(source: str, mask: str, folder, label: str) -> dict[str, list[str]]:
    """Files of the same pixels in other encodings (a table layout); groups whose members must predict alike."""
    images = folder / "images"
    masks = folder / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rgb = Image.open(source).convert("RGB")
    arr = np.asarray(rgb)
    gray = np.asarray(rgb.convert("L"))
    palette = rgb.quantize(colors=64)
    files = {
        "rgb8.png": rgb,
        "rgba.png": Image.fromarray(np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)]), mode="RGBA"),
        "palette.png": palette,
        "palette_rgb.png": palette.convert("RGB"),
        "gray8.png": Image.fromarray(gray, mode="L"),
        "gray16.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "gray16_8bit_values.png": Image.fromarray(gray.astype(np.uint16)),
        "gray_float.tif": Image.fromarray(gray.astype(np.float32) / 255.0, mode="F"),
    }
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label"])
        for name, image in files.items():
            image.save(images / name)
            Image.open(mask).save(masks / (name.rsplit(".", 1)[0] + ".png"))
            writer.writerow([name, label])
    return {
        "rgb": ["rgb8", "rgba"],
        "palette": ["palette", "palette_rgb"],
        "gray": ["gray8", "gray16", "gray16_8bit_values", "gray_float"],
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_path")
    data = make_synthetic_dataset(root / "data", n_train=16, n_test=0, size_range=(96, 160), seed=3)
    out = root / "model"
    argv = ["--demo", "--data_dir", str(data), "--output_dir", str(out), "--cache_dir", str(root / "cache")]
    # soft voting over several 64 px tiles per image, so that the TTA views change the image probabilities
    argv += ["--tta", "flips", "--aggregation", "soft", "--patch_size", "64", "--val_fraction", "0.4", *FAST]
    argv += ["--stain_norm", "macenko"]  # the shipped engine must normalise the stain as the dataset builder did
    result = recipe.main(*parse_args(recipe.RECIPE_DEFAULTS, argv=argv))
    return data, out, result, root


@pytest.mark.slow
def test_metrics_json_evaluate_and_remote_pipeline_agree(trained):
    data, out, returned, root = trained
    splits = json.loads((out / "splits.json").read_text())
    assert set(splits) >= {"train", "validation"} and not set(splits["train"]) & set(splits["validation"])
    reported = ImageLevelResult.load(out / "metrics.json")
    config = json.loads((out / "config.json").read_text())
    assert reported.tta == "flips" and config["tta"] == "flips" and config["patching"]["stain_norm"] == "macenko"
    assert "torchstain>=1.3" in (out / "requirements.txt").read_text().splitlines()
    assert sorted(reported.image_ids) == splits["validation"]
    assert np.allclose(reported.probs_array, returned.probs_array)
    by_id = dict(zip(reported.image_ids, reported.probs_array))

    # `hf-histo evaluate` on the whole folder: the validation images get the figures of metrics.json
    evaluated = evaluate_model(out, data, root / "eval.json", progress=False)
    assert evaluated.tta == "flips"
    got = dict(zip(evaluated.image_ids, evaluated.probs_array))
    for image_id in splits["validation"]:
        np.testing.assert_allclose(got[image_id], by_id[image_id], atol=TOL)
    plain = evaluate_model(out, data, None, tta="none", progress=False)
    untta = dict(zip(plain.image_ids, plain.probs_array))

    # the shipped pipeline with hf_histo hidden, on the raw files named in splits.json, TTA from the model and off
    samples = {s.image_id: s for s in read_samples(data).samples}
    labels = reported.labels
    jobs = {}
    for image_id in splits["validation"]:
        sample = samples[image_id]
        image = {"kind": "path", "value": str(sample.image_path)}
        jobs[image_id] = {"image": image, "mask": str(sample.mask_path), "tta": None}
        jobs[image_id + "/none"] = {"image": image, "mask": str(sample.mask_path), "tta": "none"}
    remote = _remote(out, jobs)
    for image_id in splits["validation"]:
        np.testing.assert_allclose([remote[image_id][k] for k in labels], by_id[image_id], atol=TOL)
        np.testing.assert_allclose([remote[image_id + "/none"][k] for k in labels], untta[image_id], atol=TOL)
    assert any(not np.allclose(untta[i], by_id[i], atol=TOL) for i in splits["validation"]), "TTA had no effect"


@pytest.mark.slow
def test_every_encoding_of_the_same_pixels_gets_the_same_probabilities(trained):
    data, out, _, root = trained
    sample = read_samples(data).samples[0]
    folder = root / "formats"
    groups = _format_variants(str(sample.image_path), str(sample.mask_path), folder, sample.label)
    for tta in ("flips", "none"):
        result = evaluate_model(out, folder, None, tta=tta, progress=False)
        probs = dict(zip(result.image_ids, result.probs_array))
        for members in groups.values():
            for name in members[1:]:
                np.testing.assert_allclose(probs[name], probs[members[0]], atol=TOL, err_msg=f"{name} ({tta})")
    default = evaluate_model(out, folder, None, progress=False)  # the model's TTA (flips)
    flips = dict(zip(default.image_ids, default.probs_array))
    rgb8, mask = str(folder / "images" / "rgb8.png"), str(folder / "masks" / "rgb8.png")
    jobs = {}
    for file in ("gray16.png", "gray_float.tif", "palette.png", "rgba.png"):
        name = file.rsplit(".", 1)[0]
        image = {"kind": "path", "value": str(folder / "images" / file)}
        jobs[name] = {"image": image, "mask": str(folder / "masks" / f"{name}.png"), "tta": None}
    for kind in ("uint16", "float", "rgba", "uint8"):
        jobs["array_" + kind] = {"image": {"kind": kind, "value": rgb8}, "mask": mask, "tta": None}
    remote = _remote(out, jobs)
    labels = json.loads((out / "config.json").read_text())["id2label"]
    order = [labels[str(i)] for i in range(len(labels))]
    for key, scores in remote.items():
        reference = flips[key] if not key.startswith("array_") else flips["rgb8"]
        np.testing.assert_allclose([scores[k] for k in order], reference, atol=TOL, err_msg=key)
