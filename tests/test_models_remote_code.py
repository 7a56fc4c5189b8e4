"""A saved checkpoint loads with trust_remote_code=True in a fresh Python where hf_histo and peft cannot be imported."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fallback when run without tests/conftest.py

import json
import subprocess
import sys
import textwrap

import torch

from hf_histo.models import (
    HistoClassifierConfig,
    HistoClassifierForImageClassification,
    apply_lora,
    merge_lora,
    tiny_backbone_config,
)

CHILD = textwrap.dedent(
    """
    import json, sys

    # hf_histo is installed in this venv (editable): make it, and peft, unimportable, as if not installed
    # (a None entry makes `import x` raise ModuleNotFoundError and importlib.util.find_spec(x) return None).
    for blocked in ("hf_histo", "peft"):
        sys.modules[blocked] = None
    import torch
    from transformers import AutoModelForImageClassification

    x = torch.load("images.pt")
    report = {}
    try:
        import hf_histo  # noqa: F401
    except ModuleNotFoundError:
        report["hf_histo_importable"] = False
    for name in json.load(open("names.json")):
        model = AutoModelForImageClassification.from_pretrained(name, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(pixel_values=x).logits
        report[name] = {"module": type(model).__module__, "logits": logits.tolist(), "pooling": model.config.pooling}
    report["imported"] = sorted(m for m, mod in sys.modules.items() if mod and m.split(".")[0] in ("hf_histo", "peft"))
    json.dump(report, open("report.json", "w"))
    """
)


def _model(family, seed=0, **kwargs):
    torch.manual_seed(seed)
    config = HistoClassifierConfig(backbone_config=tiny_backbone_config(family), num_labels=3, **kwargs)
    return HistoClassifierForImageClassification(config).eval()


def test_checkpoints_load_with_remote_code_without_hf_histo(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    lora = apply_lora(_model("vit", head="deep", head_hidden=8, head_layers=2), r=4)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # a non-trivial adapter to merge
    models = {
        "vit_cls_mean_deep": _model("vit", head="deep", head_hidden=8, head_layers=2, pooling="cls_mean"),
        "convnext_mlp": _model("convnext", head="mlp", head_hidden=16, freeze="backbone"),
        "timm_linear": _model("timm"),
        "vit_lora_merged": merge_lora(lora).eval(),
    }
    expected = {}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected[name] = model(x).logits
    torch.save(x, tmp_path / "images.pt")
    (tmp_path / "names.json").write_text(json.dumps(list(models)))
    (tmp_path / "child.py").write_text(CHILD)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", "child.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["imported"] == [] and report["hf_histo_importable"] is False
    for name, logits in expected.items():
        assert report[name]["module"].startswith("transformers_modules."), report[name]["module"]
        torch.testing.assert_close(torch.tensor(report[name]["logits"]), logits, rtol=1e-6, atol=1e-6)
    assert report["vit_cls_mean_deep"]["pooling"] == "cls_mean"
