"""Training throughput: CPU samples/s of small models, cached-embedding vs full-forward epochs, ViT-B/16 on GPU.

Run: `python benchmarks/bench_training.py [--patches 256] [--quick]`. Prints one line per measurement; the GPU
section (ViT-B/16 bf16 training and embedding extraction at 224 px) runs only when CUDA is available and says
that it was skipped otherwise. Numbers depend on the machine and on its load: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import ViTConfig  # noqa: E402

from hf_histo.data.builder import load_patch_dataset  # noqa: E402
from hf_histo.data.patching import PatchingConfig  # noqa: E402
from hf_histo.data.synthetic import make_synthetic_dataset  # noqa: E402
from hf_histo.data.transforms import (  # noqa: E402
    InputSpec,
    PatchCollator,
    make_image_processor,  # noqa: E402
)
from hf_histo.models import HistoClassifierConfig, HistoClassifierForImageClassification  # noqa: E402
from hf_histo.training.arguments import DataArguments, HistoTrainingArguments  # noqa: E402
from hf_histo.training.embeddings import compute_embeddings, prepare_cached_head  # noqa: E402
from hf_histo.training.run import with_patch_transforms  # noqa: E402
from hf_histo.training.trainer import HistoTrainer  # noqa: E402


def _steps_per_second(model, inputs: torch.Tensor, labels: torch.Tensor, steps: int, train: bool = True) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train(train)
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            start = time.perf_counter()
        if train:
            loss = model(pixel_values=inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(pixel_values=inputs)
    return steps / (time.perf_counter() - start)


def cpu_models(quick: bool) -> None:
    """Raw forward+backward+step samples/s of the tiny test ViT and the seed's ResNet (channels-last) on CPU."""
    from hf_histo.models import tiny_backbone_config

    batch, steps = 32, 3 if quick else 8
    for family, size in (("vit", 32), ("resnet", 128)):
        torch.manual_seed(0)
        config = HistoClassifierConfig(backbone_config=tiny_backbone_config(family), num_labels=4)
        model = HistoClassifierForImageClassification(config)
        if family == "resnet":
            model = model.to(memory_format=torch.channels_last)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 4, (batch,))
        rate = _steps_per_second(model, x, y, steps) * batch
        print(f"cpu  train  tiny-{family:<7s} {size:>3d} px  batch {batch}: {rate:8.1f} samples/s")


def _small_vit(num_labels: int, image_size: int) -> HistoClassifierForImageClassification:
    backbone = ViTConfig(
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=image_size,
        patch_size=16,
    )
    config = HistoClassifierConfig(
        backbone_config=backbone, num_labels=num_labels, freeze="backbone", head="deep", head_hidden=256, head_layers=2
    )
    return HistoClassifierForImageClassification(config)


def cached_vs_full(n_patches: int, quick: bool) -> None:
    """One epoch of head training on a frozen ViT: full forward (decode + transform + backbone) vs cached features."""
    image_size = 112
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_images = max(4, n_patches // 12)
        data_dir = make_synthetic_dataset(tmp / "data", n_train=n_images, n_test=0, size_range=(256, 320), seed=0)
        data = load_patch_dataset(
            data_dir,
            PatchingConfig(strategy="topk", patch_size=128, stride=64, top_k=12),
            val_fraction=0.2,
            cache_dir=tmp / "cache",
        )
        labels = data["train"].features["label"].names
        torch.manual_seed(0)
        model = _small_vit(len(labels), image_size)
        processor = make_image_processor(InputSpec(image_size))
        args = dict(
            output_dir=str(tmp / "out"),
            use_cpu=True,
            num_train_epochs=1,
            per_device_train_batch_size=32,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            learning_rate=1e-3,
        )

        data_args = DataArguments(data_dir=str(data_dir), augment="flips")
        train, _ = with_patch_transforms(data, processor, data_args)
        full = HistoTrainer(
            model=model,
            args=HistoTrainingArguments(**args),
            train_dataset=train,
            data_collator=PatchCollator(),
            processing_class=processor,
        )
        start = time.perf_counter()
        full.train()
        t_full = time.perf_counter() - start

        start = time.perf_counter()
        head, train_cached, _ = prepare_cached_head(model, data, processor, augment="flips", tta="none", batch_size=64)
        t_embed = time.perf_counter() - start
        cached = HistoTrainer(
            model=head,
            args=HistoTrainingArguments(**args),
            train_dataset=train_cached,
            data_collator=PatchCollator(input_name="embeddings"),
            processing_class=processor,
        )
        start = time.perf_counter()
        cached.train()
        t_cached = time.perf_counter() - start
        n = len(data["train"])
        print(f"cache ViT-small frozen {image_size} px, {n} train patches, 'flips' augmentation (8 cached views):")
        print(f"      full-forward epoch {t_full:7.2f} s ({n / t_full:8.1f} patches/s)")
        print(f"      cached epoch       {t_cached:7.2f} s ({n / t_cached:8.1f} patches/s)")
        print(
            f"      speed-up per epoch x{t_full / t_cached:.1f}; one-time embedding {t_embed:.1f} s "
            f"(8 views; amortised after {t_embed / max(t_full - t_cached, 1e-9):.1f} epochs)"
        )
        again = time.perf_counter()
        compute_embeddings(model, data["train"], processor, views="d4")
        print(f"      cache hit (second run) {time.perf_counter() - again:.2f} s")


def gpu_vit_b16(quick: bool) -> None:
    """ViT-B/16 bf16 training and embedding-extraction images/s at 224 px (random weights, same compute)."""
    if not torch.cuda.is_available():
        print("gpu  skipped: torch.cuda.is_available() is False (ViT-B/16 bf16 train/extract benchmark needs a GPU)")
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    config = HistoClassifierConfig(backbone_config=ViTConfig(), num_labels=4)  # ViT-B/16, 224 px
    model = HistoClassifierForImageClassification(config).to(device)
    batch, steps = 256, 5 if quick else 20
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 4, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    model.train()
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pixel_values=x, labels=y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    train_rate = steps * batch / (time.perf_counter() - start)
    model.eval()
    batch = 1024
    x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(steps + 3):
            if i == 3:
                torch.cuda.synchronize()
                start = time.perf_counter()
            model.embed(x)
    torch.cuda.synchronize()
    extract_rate = steps * batch / (time.perf_counter() - start)
    name = torch.cuda.get_device_name()
    print(f"gpu  {name}: ViT-B/16 bf16 224 px training   {train_rate:9.0f} images/s (bound ~7,500 on H200)")
    print(f"gpu  {name}: ViT-B/16 bf16 224 px extraction {extract_rate:9.0f} images/s (bound ~22,000 on H200)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=384, help="approximate number of patches for the cache run")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    cpu_models(args.quick)
    cached_vs_full(args.patches, args.quick)
    gpu_vit_b16(args.quick)


if __name__ == "__main__":
    main()
