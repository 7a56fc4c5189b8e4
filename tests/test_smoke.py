"""Smoke tests: the install is usable (torch/torchvision agree, the CLI starts)."""

import subprocess
import sys


def test_torchvision_ops_load_with_installed_torch():
    # DESIGN.md: a torchvision built for another torch fails here with "operator torchvision::nms does not exist".
    import torch
    import torchvision.ops

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), iou_threshold=0.5)
    assert keep.tolist() == [0]


def test_timm_imports():
    import timm

    assert timm.list_models("efficientnet_b0")


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "hf_histo.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("inspect", "build", "clean", "evaluate", "predict", "explain", "demo"):
        assert command in out.stdout


def test_cli_reports_bad_data_folder_clearly(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "hf_histo.cli", "inspect", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "no such data folder" in out.stderr
    assert "Traceback" not in out.stderr
