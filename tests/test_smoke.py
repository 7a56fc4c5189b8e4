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


def test_cli_build_takes_resize_masks_and_exclude(tmp_path, capsys):
    """`hf-histo build` exposes the library's mask resizing and exclusion file; the error names the fix."""
    from PIL import Image

    from hf_histo.cli import main
    from hf_histo.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", n_train=6, n_test=0, size_range=(160, 200), seed=0)
    mask = data / "train_data" / "mask_0000.png"
    Image.open(mask).resize((96, 96)).save(mask)  # a mask of the wrong size
    base = ["build", str(data), "--patch_size", "64", "--val_fraction", "0.34", "--cache_dir", str(tmp_path / "c")]
    assert main(base) == 2
    assert "--resize_masks" in capsys.readouterr().err
    (tmp_path / "exclude.txt").write_text("# manual exclusions\nimg_0001\n")
    assert main([*base, "--resize_masks", "--exclude", str(tmp_path / "exclude.txt")]) == 0
    out = capsys.readouterr().out
    assert "num_rows" in out
