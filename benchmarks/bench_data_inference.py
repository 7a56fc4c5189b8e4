"""Inference data paths against their bare forward: embedding extraction and whole-image prediction, per core.

Run: `python benchmarks/bench_data_inference.py [--repeats 3]` (`benchmarks/bench_data.py` prints these rows too).

The forward stands in for the accelerator: it runs in the main process on one torch thread, while the path's
workers (DataLoader processes for `compute_embeddings`, read-ahead threads for `predict`) use the other cores.
- `compute_embeddings`: a small frozen ViT (hidden 192, 6 layers) at 112 px on GlaS top-12 tiles of 128 px.
- `predict`: the `resnet_scratch` recipe's model (the seed's scratch ResNet, 224 px tiles shrunk to 64 px, stride
  112) on the 85 GlaS images with their masks: `InferenceEngine.predict_many`, the path of `hf-histo predict`.
Both fall back to synthetic images when ../shared/data/glas_train is absent (and say so).

Each row: `per_core` (patches/s that one worker feeds: the data side alone, no forward), `limit` (the bare forward
on the same patches, patches/s), `fraction` (the whole path with workers on the other cores, over `limit`: the median ratio of interleaved runs),
`scaling_1_to_2` (data side with 2 workers over 1) and `top_cost` (the largest share of the data side). Medians
of `--repeats` runs after a warm-up. Numbers depend on the machine and its load: compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import _small_vit  # noqa: E402

from hf_histo.data.builder import load_patch_dataset  # noqa: E402
from hf_histo.data.patching import PatchingConfig  # noqa: E402
from hf_histo.data.sources import read_samples  # noqa: E402
from hf_histo.data.synthetic import make_synthetic_dataset  # noqa: E402
from hf_histo.data.transforms import InputSpec, build_transforms  # noqa: E402
from hf_histo.inference.engine import InferenceEngine  # noqa: E402
from hf_histo.inference.feed import read_ahead  # noqa: E402
from hf_histo.training.arguments import ModelArguments  # noqa: E402
from hf_histo.training.embeddings import compute_embeddings, patch_pixel_loader  # noqa: E402
from hf_histo.training.run import build_model  # noqa: E402

GLAS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glas_train"
BATCH = 64
FORWARD_THREADS = 1  # the stand-in accelerator
WORKERS = max(1, (os.cpu_count() or 2) - FORWARD_THREADS)  # the path's workers in `fraction`: the other cores


@contextlib.contextmanager
def _forward_threads() -> Iterator[None]:
    """torch on `FORWARD_THREADS` threads (the stand-in accelerator); the caller's setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(FORWARD_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _data_dir(tmp: Path) -> tuple[Path, str]:
    if GLAS.is_dir():
        return GLAS.resolve(), "GlaS train, 85 images"
    synthetic = make_synthetic_dataset(tmp / "synthetic", n_train=40, n_test=0, size_range=(512, 768), seed=0)
    return synthetic, "synthetic (GlaS not found), 40 images"


def _median_rate(n: int, run: Callable[[], object], repeats: int) -> float:
    """Median items/s of ``run`` (which handles ``n`` items) over ``repeats`` timed runs after one warm-up."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def _fraction(n: int, path: Callable[[], object], bare: Callable[[], object], repeats: int) -> tuple[float, float]:
    """The limit (``bare``'s items/s) and the median of ``path``/``bare`` rate ratios over interleaved runs.

    Each repeat times ``bare`` and ``path`` back to back, alternating which goes first, so that a change of the
    shared machine's speed during the benchmark hits both sides of a ratio (timing all of one, then all of the
    other, moved the embeddings fraction between 0.78 and 1.03 from run to run).
    """
    bare(), path()  # warm-up
    limits, ratios = [], []
    for i in range(repeats):
        pair = []
        for run in (bare, path) if i % 2 == 0 else (path, bare):
            start = time.perf_counter()
            run()
            pair.append((run, n / (time.perf_counter() - start)))
        rates = dict(pair)
        limits.append(rates[bare])
        ratios.append(rates[path] / rates[bare])
    return statistics.median(limits), statistics.median(ratios)


def _top_cost(shares: dict[str, float]) -> str:
    total = sum(shares.values())
    name, value = max(shares.items(), key=lambda kv: kv[1])
    others = ", ".join(f"{k} {v / total:.0%}" for k, v in shares.items() if k != name)
    return f"{name} {value / total:.0%} of the data side ({others})"


def bench_embeddings(repeats: int) -> list[dict]:
    """`compute_embeddings` of a small frozen ViT at 112 px vs its bare forward (one row)."""
    with _forward_threads(), tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir, source = _data_dir(tmp)
        patching = PatchingConfig(strategy="topk", patch_size=128, stride=64, top_k=12)
        patches = load_patch_dataset(data_dir, patching, val_fraction=0.0, cache_dir=tmp / "cache")["train"]
        n = len(patches)
        torch.manual_seed(0)
        model = _small_vit(2, 112).eval()
        spec = InputSpec(112)
        pixels = torch.cat(list(patch_pixel_loader(patches, spec, BATCH)))

        def bare() -> None:
            with torch.no_grad():
                for i in range(0, n, BATCH):
                    model.embed(pixels[i : i + BATCH])

        def path(workers: int) -> Callable[[], object]:
            runs = iter(range(10**6))  # a new cache folder each run: no cache hits
            return lambda: compute_embeddings(
                model, patches, spec, batch_size=BATCH, cache_dir=tmp / f"emb{next(runs)}", num_workers=workers
            )

        def data_side(workers: int) -> Callable[[], object]:
            return lambda: sum(len(b) for b in patch_pixel_loader(patches, spec, BATCH, workers))

        limit, fraction = _fraction(n, path(WORKERS), bare, repeats)
        one, two = (_median_rate(n, data_side(w), repeats) for w in (1, 2))
        transform, rows = build_transforms(spec, train=False), patches.select(range(min(n, 256)))
        start = time.perf_counter()
        images = [row["image"].convert("RGB") for row in rows]
        decode = time.perf_counter() - start
        start = time.perf_counter()
        for image in images:
            transform(image)
        shares = {"PNG decode": decode, "resize + normalise": time.perf_counter() - start}
    return [
        {
            "path": f"compute_embeddings, ViT-small 112 px ({source}, {n} tiles)",
            "per_core": one,
            "limit": limit,
            "fraction": fraction,
            "scaling_1_to_2": two / one,
            "top_cost": _top_cost(shares),
        }
    ]


def bench_predict(repeats: int) -> list[dict]:
    """`predict_many` (the path of `hf-histo predict`) of the resnet_scratch model vs its bare forward (one row)."""
    with _forward_threads(), tempfile.TemporaryDirectory() as tmp:
        data_dir, source = _data_dir(Path(tmp))
        samples = read_samples(data_dir).samples
        items = [(s.image_path, s.mask_path, s.image_id) for s in samples]
        patching = PatchingConfig(strategy="grid", patch_size=224, stride=112, min_foreground=200)
        torch.manual_seed(0)
        labels = sorted({s.label or "unlabelled" for s in samples})
        model, processor = build_model(
            ModelArguments(model_name_or_path="resnet"), labels, patching=patching, image_size=64
        )
        engine = InferenceEngine(model.eval(), processor, batch_size=BATCH)
        stages = {"decode": 0.0, "patch (mask + boxes)": 0.0, "cut (crop + resize)": 0.0}
        cut = []
        for image, mask, _ in items:
            t0 = time.perf_counter()
            decoded = engine.decode(image)
            t1 = time.perf_counter()
            patched = engine.patch(decoded, mask)
            t2 = time.perf_counter()
            cut.append(engine.cut(patched))
            t3 = time.perf_counter()
            for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
                stages[name] += seconds
        pixels = engine.to_model(torch.cat(cut))
        n = len(pixels)

        def bare() -> None:
            for i in range(0, n, BATCH):
                engine.forward(pixels[i : i + BATCH])

        def path(workers: int) -> Callable[[], object]:
            engine.num_workers = workers
            return lambda: list(engine.predict_many(items))

        def data_side(workers: int) -> Callable[[], object]:
            return lambda: list(read_ahead(lambda item: engine.load(item[0], item[1]), items, workers))

        limit, fraction = _fraction(n, path(WORKERS), bare, repeats)
        one, two = (_median_rate(n, data_side(w), repeats) for w in (1, 2))
    return [
        {
            "path": f"predict, resnet_scratch 224->64 px ({source}, {n} patches)",
            "per_core": one,
            "limit": limit,
            "fraction": fraction,
            "scaling_1_to_2": two / one,
            "top_cost": _top_cost(stages),
        }
    ]


def print_rows(rows: list[dict]) -> None:
    """The rows as a table."""
    print(f"{'path':<72s} {'per core':>9s} {'limit':>8s} {'fraction':>8s} {'1->2':>5s}  top cost")
    for row in rows:
        print(
            f"{row['path']:<72s} {row['per_core']:9.0f} {row['limit']:8.0f} {row['fraction']:8.2f} "
            f"{row['scaling_1_to_2']:5.2f}  {row['top_cost']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is reported")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{os.cpu_count()} cores, load {load:.2f}; forward on {FORWARD_THREADS} torch thread, {WORKERS} worker(s) "
        f"in `fraction`; patches/s, median of {args.repeats}"
    )
    print_rows(bench_embeddings(args.repeats) + bench_predict(args.repeats))


if __name__ == "__main__":
    main()
