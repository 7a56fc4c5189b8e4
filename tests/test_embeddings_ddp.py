"""The embedding cache under 2-process CPU DDP (`accelerate launch --cpu`): shards joined into the 1-process cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from test_ddp import _free_port
from tiny_models import tiny_model, tissue_image

from hf_histo.data.transforms import input_spec
from hf_histo.training.embeddings import compute_embeddings, embedding_cache_key, embeddings_array

ROOT = Path(__file__).resolve().parents[1]
N_PATCHES = 13  # odd: the two shards differ in size (7 + 6) and end mid-batch
# Each rank: embed (sharded), embed again (a hit: no forward pass), then call with a rank-dependent dataset.
SCRIPT = """
import json, sys
from pathlib import Path

from hf_histo.training.launch import relaunch_for_cpu_ddp

relaunch_for_cpu_ddp()  # what a recipe's parse_args does: `accelerate launch --cpu` starts one process

import datasets
import numpy as np
import torch
from accelerate import PartialState

sys.path.insert(0, {tests!r})
from tiny_models import tiny_model
from hf_histo.training.embeddings import compute_embeddings, embeddings_array

PartialState()  # starts the process group, as Trainer does (its num_processes says 1 under --cpu: read torch's)
rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
patches = datasets.load_from_disk({data!r})
model = tiny_model()
calls = []
embed = model.embed

def counted(pixel_values, **kwargs):
    calls.append(len(pixel_values))
    return embed(pixel_values, **kwargs)

model.embed = counted
options = dict(views="flips", batch_size=4, cache_dir={cache!r})
first = compute_embeddings(model, patches, 32, **options)
computed, calls[:] = sum(calls), []
again = compute_embeddings(model, patches, 32, **options)
loaded = sum(calls)
try:
    compute_embeddings(model, patches.select(range(len(patches) - rank)), 32, **options)
    error = None
except ValueError as exc:
    error = str(exc)
out = Path({out!r})
np.save(out / f"rank{{rank}}.npy", embeddings_array(again))
report = dict(world_size=world_size, computed=computed, loaded=loaded, error=error)
report["image_id"] = list(again.with_format(None)["image_id"])
(out / f"rank{{rank}}.json").write_text(json.dumps(report))
"""


def _patches(path: Path) -> datasets.Dataset:
    """`N_PATCHES` 40 px crops of generated tissue, saved to disk so both processes load the same fingerprint."""
    rng = np.random.default_rng(0)
    image = tissue_image(160, seed=3)
    corners = rng.integers(0, 120, size=(N_PATCHES, 2))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["a", "b", "c"]),
            "image_id": datasets.Value("string"),
        }
    )
    rows = {
        "image": [Image.fromarray(image[y : y + 40, x : x + 40]) for y, x in corners],
        "label": [i % 3 for i in range(N_PATCHES)],
        "image_id": [f"img{i // 4}" for i in range(N_PATCHES)],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return datasets.load_from_disk(str(path))


@pytest.mark.slow
def test_two_process_cache_equals_the_one_process_cache(tmp_path):
    """Each rank embeds its shard once; the joined cache file is the 1-process one; a hit loads on every rank."""
    patches = _patches(tmp_path / "patches")
    single = compute_embeddings(tiny_model(), patches, 32, views="flips", batch_size=4, cache_dir=tmp_path / "single")
    key = embedding_cache_key(tiny_model(), patches.with_format(None), input_spec(32), "flips")
    cache, out = tmp_path / "cache", tmp_path / "out"
    cache.mkdir()
    out.mkdir()
    # Leftovers of a crashed run: a garbage shard of this layout (overwritten) and of another one (ignored).
    (cache / f"embeddings-{key}-shard00001-of-00002.arrow").write_bytes(b"partial")
    (cache / f"embeddings-{key}-shard00000-of-00003.arrow").write_bytes(b"partial")
    script = tmp_path / "embed_two_processes.py"
    script.write_text(
        SCRIPT.format(tests=str(ROOT / "tests"), data=str(tmp_path / "patches"), cache=str(cache), out=str(out))
    )
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(accelerate),
        "launch",
        "--cpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        str(script),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2], "the launcher must start two processes"
    assert [r["computed"] for r in ranks] == [3 * 7, 3 * 6], "each rank embeds its contiguous shard once (3 views)"
    assert [r["loaded"] for r in ranks] == [0, 0], "a cache hit runs no forward pass on any rank"
    assert all("disagree" in r["error"] for r in ranks), "different datasets across ranks fail on every rank"
    assert sorted(p.name for p in cache.iterdir()) == [f"embeddings-{key}.arrow"], "shards and temporaries are gone"

    joined = datasets.Dataset.from_file(str(cache / f"embeddings-{key}.arrow"))
    reference = datasets.Dataset.from_file(str(tmp_path / "single" / f"embeddings-{key}.arrow"))
    assert joined.features == reference.features and len(joined) == N_PATCHES
    assert joined["labels"] == reference["labels"] and joined["image_id"] == reference["image_id"]
    np.testing.assert_allclose(embeddings_array(joined), embeddings_array(reference), atol=1e-5, rtol=1e-4)
    for rank in (0, 1):
        np.testing.assert_allclose(np.load(out / f"rank{rank}.npy"), embeddings_array(single), atol=1e-5, rtol=1e-4)
        assert ranks[rank]["image_id"] == list(patches["image_id"])
