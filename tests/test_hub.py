"""Hub-ready folders: shipped code, config written once, model card from one result, upload list, offline error."""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from transformers import ConvNextImageProcessor, TrainingArguments, ViTImageProcessor
from transformers.dynamic_module_utils import get_imports, get_relative_imports

from hf_histo.data.transforms import make_image_processor
from hf_histo.hub import (
    HubUnavailableError,
    build_model_card,
    bundle_code,
    hub_upload_files,
    push_folder_to_hub,
    run_data_info,
    save_for_hub,
    write_model_card,
)
from hf_histo.hub import upload as hub_upload
from hf_histo.hub.bundle import flatten_imports
from hf_histo.inference.pipeline import TASK
from hf_histo.inference.results import ImageLevelResult
from hf_histo.models import HistoClassifierConfig, HistoClassifierForImageClassification, tiny_backbone_config

LABELS = {0: "benign", 1: "malignant"}
# The pipeline and everything it imports relatively (found by walking the imports), plus the model/config modules.
SHIPPED = {
    "aggregation.py",
    "backbones.py",
    "configuration_histo.py",
    "engine.py",
    "forward.py",
    "images.py",
    "masks.py",
    "mil.py",
    "modeling_histo.py",
    "patching.py",
    "pipeline.py",
}


def make_result(**changes) -> ImageLevelResult:
    fields = dict(
        labels=["benign", "malignant"],
        image_ids=[f"img{i}" for i in range(8)],
        y_true=[0, 0, 0, 0, 1, 1, 1, 1],
        probs=[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.1, 0.9]],
        aggregation="hard",
        tta="d4",
        split="validation",
        metrics={
            "accuracy": 0.75,
            "balanced_accuracy": 0.7,
            "macro_f1": 0.72,
            "auroc": 0.8,
            "kappa": 0.4,
            "per_class_f1": {"benign": 0.7, "malignant": 0.74},
            "confusion_matrix": [[3, 1], [1, 3]],
            "n": 8,
        },
        ci={"macro_f1": [0.61, 0.88], "accuracy": [0.5, 1.0]},
        patch_metrics={"accuracy": 0.6, "macro_f1": 0.55},
        n_patches=40,
    )
    return ImageLevelResult(**{**fields, **changes})


def tiny_model(backbone_name: str | None = None) -> HistoClassifierForImageClassification:
    torch.manual_seed(0)
    config = HistoClassifierConfig(
        backbone_config=tiny_backbone_config("vit"),
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        patching={"strategy": "grid", "patch_size": 32, "min_foreground": 100},
        aggregation="hard",
        backbone_name=backbone_name,
    )
    return HistoClassifierForImageClassification(config).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "model"
    args = TrainingArguments(output_dir=str(out.parent / "run"), learning_rate=3e-4, num_train_epochs=2, seed=7)
    save_for_hub(
        tiny_model("phikon"),
        out,
        image_processor=ViTImageProcessor(size={"height": 32, "width": 32}),
        result=make_result(),
        training_args=args,
        data_info={"name": "GlaS 2015 train", "datasets": ["user/glas"], "n_images": {"train": 68, "val": 17}},
        repo_id="user/tiny-histo",
        license="other",
    )
    return out


def front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "README.md must start with a YAML block"
    return yaml.safe_load(match.group(1))


# ---- folder contents ------------------------------------------------------------------------------------------------
def test_folder_holds_weights_processor_code_card_and_plots(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= names
    assert SHIPPED <= names
    assert (folder / "plots" / "confusion_matrix.png").is_file()  # drawn from result.metrics["confusion_matrix"]
    with Image.open(folder / "plots" / "confusion_matrix.png") as im:
        assert im.format == "PNG"


def test_config_has_labels_patching_auto_map_and_custom_pipelines(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "benign", "1": "malignant"}
    assert config["patching"]["patch_size"] == 32 and config["aggregation"] == "hard"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_histo.HistoClassifierConfig",
        "AutoModelForImageClassification": "modeling_histo.HistoClassifierForImageClassification",
    }
    assert config["custom_pipelines"] == {
        TASK: {
            "impl": "pipeline.HistoImageClassificationPipeline",
            "pt": ["AutoModelForImageClassification"],
            "tf": [],
            "type": "image",
        }
    }


def test_config_json_is_written_once_with_the_remote_code_fields(tmp_path, monkeypatch):
    saves = []
    original = HistoClassifierConfig.save_pretrained

    def counting_save(self, *args, **kwargs):
        saves.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HistoClassifierConfig, "save_pretrained", counting_save)
    model = tiny_model()
    after_model_save = {}
    model_save = model.save_pretrained

    def recording_save(directory, **kwargs):
        model_save(directory, **kwargs)
        path = Path(directory) / "config.json"
        after_model_save.update(text=path.read_text(), mtime=path.stat().st_mtime_ns)

    model.save_pretrained = recording_save
    out = save_for_hub(model, tmp_path / "m", image_processor=32)
    assert len(saves) == 1
    config = json.loads(after_model_save["text"])  # right after model.save_pretrained: nothing to add later
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline.HistoImageClassificationPipeline"
    assert config["auto_map"]["AutoModelForImageClassification"].startswith("modeling_histo.")
    assert (out / "config.json").read_text() == after_model_save["text"]
    assert (out / "config.json").stat().st_mtime_ns == after_model_save["mtime"]


def test_bundle_code_reads_config_json_and_refuses_one_without_remote_code_fields(folder, tmp_path):
    before = (folder / "config.json").stat().st_mtime_ns
    written = bundle_code(folder)
    assert SHIPPED <= {p.name for p in written}
    assert (folder / "config.json").stat().st_mtime_ns == before
    model = tiny_model()
    model.save_pretrained(tmp_path)  # no set_remote_code_config first
    with pytest.raises(ValueError, match="lacks the remote-code fields.*save_for_hub"):
        bundle_code(tmp_path, model)
    with pytest.raises(FileNotFoundError, match="save the model"):
        bundle_code(tmp_path / "empty")


def test_shipped_code_is_flat_and_imports_only_allowed_packages(folder):
    allowed = {"numpy", "PIL", "torch", "transformers", "scipy"} | set(sys.stdlib_module_names)
    # app.py is the Gradio Space's entry point (needs gradio, listed in requirements.txt); transformers never loads it.
    shipped = sorted(p.name for p in folder.glob("*.py") if p.name != "app.py")
    assert (folder / "app.py").is_file() and "gradio" in (folder / "requirements.txt").read_text()
    stems = {Path(name).stem for name in shipped}
    for name in shipped:
        path = folder / name
        assert set(get_imports(path)) <= allowed, (name, get_imports(path))
        assert set(get_relative_imports(path)) <= stems, (name, get_relative_imports(path))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in stems, (name, node.module)


@pytest.mark.parametrize(
    ("line", "flat"),
    [
        ("from ..data.patching import PatchBox, crop_patch", "from .patching import PatchBox, crop_patch"),
        ("from ..models.aggregation import aggregate", "from .aggregation import aggregate"),
        (
            "from .configuration_histo import HistoClassifierConfig",
            "from .configuration_histo import HistoClassifierConfig",
        ),
        ("    from ...a.b.c import (\n        x,\n    )", "    from .c import (\n        x,\n    )"),
        ("from transformers import pipeline", "from transformers import pipeline"),
        ("from __future__ import annotations", "from __future__ import annotations"),
    ],
)
def test_flatten_imports(line, flat):
    assert flatten_imports(line) == flat


def test_saved_processor_is_the_training_eval_transform():
    from hf_histo.data.transforms import build_transforms

    convnext = ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)  # would centre-crop
    processor = make_image_processor(convnext)
    assert processor.size["height"] == processor.size["width"] == 64
    patch = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8))
    ours = processor(images=[patch], return_tensors="pt")["pixel_values"][0]
    reference = build_transforms(convnext, train=False)(patch)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_run_data_info_reads_the_run_facts():
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"image_id": Value("string"), "label": ClassLabel(names=["benign", "malignant"])})
    train = Dataset.from_dict({"image_id": ["a", "a", "b", "c"], "label": [0, 0, 1, 1]}, features=features)
    info = run_data_info(train, {"recipe": "phikon_frozen", "data": {"data_dir": "/data/glas", "layout": "csv"}})
    assert info == {
        "name": "glas",
        "layout": "csv",
        "n_images": "3 (training split)",
        "n_patches": 4,
        "class_counts": {"benign": 1, "malignant": 2},
    }


# ---- the model card -------------------------------------------------------------------------------------------------
def test_card_metadata_is_valid(folder):
    text = (folder / "README.md").read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-classification"
    assert {"histopathology", "hf-histo"} <= set(meta["tags"])
    assert meta["base_model"] == "owkin/phikon"
    assert meta["datasets"] == ["user/glas"]
    assert meta["license"] == "other"
    assert set(meta["metrics"]) == {"accuracy", "balanced_accuracy", "f1", "roc_auc", "cohen_kappa"}
    (entry,) = meta["model-index"]
    assert entry["name"] == "tiny-histo"
    (result,) = entry["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": "GlaS 2015 train", "type": "user/glas", "split": "validation"}
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert values["f1"] == 0.72 and values["accuracy"] == 0.75 and values["roc_auc"] == 0.8
    card = ModelCard(text)  # huggingface_hub parses (and validates) the same metadata
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-classification" and data["base_model"] == "owkin/phikon"
    assert {r.metric_type for r in card.data.eval_results} == set(meta["metrics"])


def test_card_sections_results_ci_tta_and_hyperparameters(folder):
    text = (folder / "README.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Intended use and limitations",
        "## Data and patching",
        "## Training procedure",
        "## Image-level results",
        "## How to use",
    ]
    assert "not a medical device" in text and "Research use only" in text
    assert "patch_size=32" in text and "Aggregation of patch predictions: `hard`" in text
    assert "| learning_rate | 0.0003 |" in text and "| seed | 7 |" in text and "| num_train_epochs | 2 |" in text
    assert "On the validation split (8 labelled images, 40 patches)" in text
    assert "`hard` aggregation of the patch probabilities, test-time augmentation `d4`" in text
    assert "| macro_f1 | 0.720 | [0.610, 0.880] |" in text  # the result's own CI, not recomputed
    assert "| accuracy | 0.750 | [0.500, 1.000] |" in text and "| kappa | 0.400 | n/a |" in text
    assert "Per-class F1: benign: 0.700, malignant: 0.740" in text
    assert "macro_f1 0.550, accuracy 0.600" in text  # patch level
    assert "![Confusion matrix (image level)](plots/confusion_matrix.png)" in text
    assert "train: 68, val: 17" in text
    assert 'tta="d4"' in text and "tta=True" not in text


def test_card_states_the_results_aggregation_and_tta(tmp_path):
    config = tiny_model(backbone_name="/some/local/backbone").config
    result = ImageLevelResult.from_predictions(
        ["benign", "malignant"],
        ["a", "b", "c", "d"],
        [0, 0, 1, -1],
        [[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.5, 0.5]],
        aggregation="soft",
        tta="flips",
        split="test",
        n_bootstrap=50,
    )
    text = str(build_model_card(config, result=result))
    meta = front_matter(text)
    assert "base_model" not in meta and "datasets" not in meta
    (entry,) = meta["model-index"][0]["results"]
    assert entry["dataset"]["split"] == "test"
    f1 = result.metrics["macro_f1"]
    assert {m["type"]: m["value"] for m in entry["metrics"]}["f1"] == round(f1, 4)
    assert "On the test split (3 labelled images)" in text  # the unlabelled image is not scored
    assert "`soft` aggregation of the patch probabilities, test-time augmentation `flips`" in text
    low, high = result.ci["macro_f1"]
    assert f"| macro_f1 | {f1:.3f} | [{low:.3f}, {high:.3f}] |" in text
    empty = build_model_card(config)
    assert "model-index" not in front_matter(str(empty)) and "No evaluation results" in str(empty)


def test_write_model_card_reads_the_saved_config(folder, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", *SHIPPED):
        (copy / name).write_bytes((folder / name).read_bytes())
    path = write_model_card(copy, result=make_result(), repo_id="me/x")
    meta = front_matter(path.read_text())
    assert meta["model-index"][0]["name"] == "x" and "me/x" in path.read_text()


SNIPPET_CHILD = textwrap.dedent(
    """
    import re, sys

    sys.modules["hf_histo"] = None  # the card's users do not have hf_histo
    card = open("model/README.md").read()
    code = re.search(r"```python\\n(.*?)```", card, flags=re.DOTALL).group(1)
    code = code.replace("user/tiny-histo", "model")
    exec(compile(code, "README.md", "exec"), {})
    print("SNIPPET-OK")
    """
)


@pytest.mark.slow
def test_card_snippet_runs_without_hf_histo(folder):
    work = folder.parent
    rng = np.random.default_rng(0)
    image = np.full((96, 96, 3), 240, dtype=np.uint8)
    image[16:80, 16:80] = rng.integers(80, 200, size=(64, 64, 3))
    Image.fromarray(image).save(work / "image.png")
    mask = np.zeros((96, 96), dtype=np.uint8)
    mask[16:80, 16:80] = 255
    Image.fromarray(mask).save(work / "mask.png")
    (work / "snippet_child.py").write_text(SNIPPET_CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work / "modules"), HF_HOME=str(work / "hf_home"))
    done = subprocess.run(
        [sys.executable, "-I", "snippet_child.py"], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SNIPPET-OK" in done.stdout and "'label':" in done.stdout


# ---- push -----------------------------------------------------------------------------------------------------------
class FakeHub:
    """Stands in for HfApi: records the repo creation and the files upload_folder would send."""

    def __init__(self, fail_with: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: list[str] = []
        self.fail_with = fail_with

    def install(self, monkeypatch):
        fake = self

        def create_repo(self, repo_id, **kwargs):
            fake.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            if fake.fail_with is not None:
                raise fake.fail_with
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
            fake.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
            root = Path(folder_path)
            files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            fake.uploaded = list(
                filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
            )
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

        monkeypatch.setattr(hub_upload.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(hub_upload.HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(hub_upload, "_offline", lambda: False)
        return self


def listing(path: Path) -> dict[str, int]:
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def test_push_uploads_model_processor_card_code_and_plots(folder, monkeypatch):
    (folder / "checkpoint-5").mkdir(exist_ok=True)
    (folder / "checkpoint-5" / "optimizer.pt").write_bytes(b"x")
    (folder / "runs").mkdir(exist_ok=True)
    (folder / "runs" / "events.out").write_bytes(b"x")
    (folder / ".model.safetensors.abc.tmp").write_bytes(b"x")
    (folder / "metrics.json").write_text('{"run": {"data_dir": "/private/path"}}')
    (folder / "training_curves.png").write_bytes((folder / "plots" / "confusion_matrix.png").read_bytes())
    fake = FakeHub().install(monkeypatch)
    url = push_folder_to_hub(folder, "user/tiny-histo", private=True, is_main_process=True)
    assert url == "https://huggingface.co/user/tiny-histo/commit/abc"
    assert fake.calls[0] == ("create_repo", {"repo_id": "user/tiny-histo", "private": True, "exist_ok": True})
    expected = {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "plots/confusion_matrix.png",
    }
    assert expected | SHIPPED <= set(fake.uploaded)
    assert "training_curves.png" in fake.uploaded and "metrics.json" not in fake.uploaded
    assert not [f for f in fake.uploaded if f.startswith(("checkpoint-", "runs/", "."))]
    assert fake.uploaded == hub_upload_files(folder)


def test_push_only_from_the_main_process(folder, monkeypatch):
    fake = FakeHub().install(monkeypatch)
    assert push_folder_to_hub(folder, "user/tiny-histo", is_main_process=False) is None

    class State:  # accelerate's PartialState decides by default
        is_main_process = False

    monkeypatch.setattr(hub_upload, "PartialState", State)
    assert push_folder_to_hub(folder, "user/tiny-histo") is None
    assert fake.calls == []
    State.is_main_process = True
    assert push_folder_to_hub(folder, "user/tiny-histo") is not None


def test_push_offline_fails_with_one_clear_message_and_keeps_the_folder(folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = listing(folder)
    with pytest.raises(HubUnavailableError) as info:
        push_folder_to_hub(folder, "user/tiny-histo", is_main_process=True)
    message = str(info.value)
    assert "offline" in message and str(folder.resolve()) in message and "complete" in message
    assert f"hf upload user/tiny-histo {folder.resolve()}" in message
    assert listing(folder) == before


def test_push_without_network_fails_with_the_same_message(folder, monkeypatch):
    FakeHub(fail_with=ConnectionError("Name or service not known")).install(monkeypatch)
    with pytest.raises(HubUnavailableError, match="unreachable.*complete at"):
        push_folder_to_hub(folder, "user/tiny-histo", is_main_process=True)


def test_push_refuses_an_incomplete_folder(tmp_path, monkeypatch):
    FakeHub().install(monkeypatch)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing.*model.safetensors"):
        push_folder_to_hub(tmp_path, "user/x", is_main_process=True)
