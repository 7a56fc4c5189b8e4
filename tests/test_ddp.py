"""Real 2-process DDP on CPU through `accelerate launch --cpu --num_processes 2`: replicas stay equal."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Runs a recipe with a ParamDigestCallback added to its trainer (test-only instrumentation, no library hook).
WRAPPER = """
import runpy, sys
sys.path.insert(0, {tests!r})
from digests import ParamDigestCallback
from hf_histo.training.trainer import HistoTrainer

init = HistoTrainer.__init__

def with_digests(self, *args, **kwargs):
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), ParamDigestCallback({out!r})]
    init(self, *args, **kwargs)

HistoTrainer.__init__ = with_digests
sys.argv = [{recipe!r}, *sys.argv[1:]]
runpy.run_path({recipe!r}, run_name="__main__")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_progressive_unfreezing_under_two_process_ddp(tmp_path):
    """Gated blocks stay untouched until their epoch, then train, and both ranks end with identical parameters."""
    from hf_histo.data.synthetic import make_synthetic_dataset

    data_dir = make_synthetic_dataset(tmp_path / "data", n_train=12, n_test=0, size_range=(160, 240), seed=0)
    accelerate = Path(sys.executable).parent / "accelerate"
    wrapper = tmp_path / "convnext_progressive_with_digests.py"
    recipe = ROOT / "recipes" / "convnext_progressive.py"
    wrapper.write_text(WRAPPER.format(tests=str(ROOT / "tests"), out=str(tmp_path / "digests"), recipe=str(recipe)))
    cmd = [
        str(accelerate),
        "launch",
        "--cpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        str(wrapper),
        "--demo",
        "--data_dir",
        str(data_dir),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--output_dir",
        str(tmp_path / "out"),
        "--unfreeze_every_epochs",
        "1",
        "--num_train_epochs",
        "3",
        "--per_device_train_batch_size",
        "4",
        "--image_size",
        "32",
        "--learning_rate",
        "1e-3",
        "--n_bootstrap",
        "20",
        "--disable_tqdm",
        "true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2], "the launcher must start two DDP processes"
    assert ranks[0]["all"] == ranks[1]["all"], "parameters differ between ranks"
    begin = ranks[0]["begin"]
    moved = [{k for k, v in e["digests"].items() if v != begin[k]} for e in ranks[0]["epochs"]]
    assert moved[0] == {"head"}
    assert {"post_backbone", "encoder.stages.3", "encoder.stages.2"} <= moved[1]
    assert not {"encoder.stages.1", "encoder.stages.0", "embeddings"} & moved[1]
    assert moved[2] == set(begin), "every block trains once unfrozen"
    assert (tmp_path / "out" / "metrics.json").is_file()
