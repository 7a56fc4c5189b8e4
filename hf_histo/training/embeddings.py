"""Embedding cache for frozen backbones: embed every patch once, then train the head on cached features."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers.modeling_outputs import ImageClassifierOutput

from ..data.transforms import InputSpec, build_transforms, input_spec
from ..inference.engine import tta_views

CACHE_VERSION = 1
VIEW_MODES = {"none": 1, "flips": 3, "d4": 8}
# Positions of the TTA views inside the cached "d4" views (tta_views order: 4 quarter turns, then their h-flips).
D4_SUBSETS = {"none": [0], "flips": [0, 4, 6], "d4": list(range(8))}


class _PatchPixels(torch.utils.data.Dataset):
    """The evaluation transform's pixels of every patch of a split: what `compute_embeddings`' DataLoader reads."""

    def __init__(self, dataset: Any, transform: Any):
        self.images = dataset.select_columns(["image"])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.images[index]["image"].convert("RGB"))

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return [self.transform(image.convert("RGB")) for image in self.images[indices]["image"]]


def patch_pixel_loader(
    dataset: Any, processor_or_spec: Any, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """Batches ``[B, 3, S, S]`` of the evaluation transform's pixels of a patch split, in order.

    Args:
        dataset: The raw patch split (an ``image`` column).
        processor_or_spec: The image processor, `InputSpec` or input side.
        batch_size: Patches per batch.
        num_workers: Worker processes that decode and transform the patches (0: the calling process).
        pin_memory: Page-locked batches, for fast copies to a GPU.
    """
    transform = build_transforms(input_spec(processor_or_spec), train=False)
    return DataLoader(
        _PatchPixels(dataset, transform), batch_size, num_workers=int(num_workers), pin_memory=pin_memory
    )


def backbone_fingerprint(model: nn.Module) -> str:
    """Hash of what determines an embedding: backbone config, pooling and every backbone weight."""
    digest = hashlib.sha256()
    config = model.config
    digest.update(config.backbone_config.to_json_string(use_diff=False).encode())
    digest.update(str(config.pooling).encode())
    for name, tensor in sorted(model.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def embedding_cache_key(model: nn.Module, dataset: Any, spec: InputSpec, views: str) -> str:
    """Cache key of (backbone weights, patch dataset, input transform, views)."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None:
        raise ValueError("the dataset has no _fingerprint: pass a datasets.Dataset")
    payload = {
        "version": CACHE_VERSION,
        "backbone": backbone_fingerprint(model),
        "dataset": fingerprint,
        "transform": spec.to_dict(),
        "views": views,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _cache_location(dataset: Any, key: str, cache_dir: str | Path | None) -> Path | None:
    if cache_dir is not None:
        return Path(cache_dir) / f"embeddings-{key}.arrow"
    files = getattr(dataset, "cache_files", None) or []
    if files:
        return Path(files[0]["filename"]).parent / f"embeddings-{key}.arrow"
    return None


def _embedding_dim(model: nn.Module) -> int:
    """Width of the pooled embeddings: the input width of the head's first linear layer, which consumes them."""
    return next(m.in_features for m in model.classifier.modules() if isinstance(m, nn.Linear))


@torch.no_grad()
def compute_embeddings(
    model: nn.Module,
    dataset: Any,
    processor_or_spec: Any,
    views: str = "none",
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
):
    """Embed every patch of `dataset` with the model's backbone, once, and cache the result.

    The cache lives next to the dataset's own Arrow cache files (or in `cache_dir`) under a key of the backbone
    weights, the dataset fingerprint, the input transform and the views, so a changed backbone, patching or input
    size never reads stale features. `Dataset.map` streams the batches into that Arrow file (written to a
    temporary file, then moved in place) and loads the file instead when it exists. Patches are decoded and
    transformed by a DataLoader's ``num_workers`` processes while the backbone runs; the embeddings do not depend on
    their number.

    Under several processes (a `torch.distributed` group, as `accelerate launch` starts) every process must call
    this: each embeds its contiguous shard of the patches into its own file, then the main process joins the shards
    in order into the one cache file (atomically renamed into place), the same rows as one process writes. The cache
    folder must be shared by all processes; processes whose cache keys differ fail with a ValueError. A cache hit is
    a pure load on every process; an in-memory dataset without `cache_dir` is embedded whole by every process.

    Args:
        model: A `HistoClassifierForImageClassification` (its `embed` is used; the head is not).
        dataset: The raw patch split (`image`, `label`, `image_id`, ... columns), without transform.
        processor_or_spec: The image processor, `InputSpec` or input side (deterministic eval transform).
        views: `"none"` (the patch), `"flips"` (+ h/v flips) or `"d4"` (8 flips/quarter turns) per patch.
        batch_size: Patches per forward pass.
        cache_dir: Cache folder override (needed for in-memory datasets to be cached at all).
        device: Device for the forward passes (default: the model's).
        num_workers: DataLoader worker processes that decode and transform patches (0: in the main process).

    Returns:
        A `datasets.Dataset` in torch format with `embeddings` (`[V, D]` float32 per patch), `labels`, and
        `image_id` / `group_id` / `foreground` when the source has them.
    """
    import datasets

    if views not in VIEW_MODES:
        raise ValueError(f"views={views!r}; choose one of {list(VIEW_MODES)}")
    spec = input_spec(processor_or_spec)
    raw = dataset.with_format(None)
    if len(raw) == 0:
        raise ValueError("cannot embed an empty dataset")
    key = embedding_cache_key(model, raw, spec, views)
    path = _cache_location(raw, key, cache_dir)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    keep = [c for c in ("image_id", "group_id", "foreground") if c in raw.column_names]
    features = datasets.Features(
        {
            "embeddings": datasets.Array2D(shape=(VIEW_MODES[views], _embedding_dim(model)), dtype="float32"),
            "labels": datasets.Value("int64"),
            **{c: raw.features[c] for c in keep},
        }
    )
    device = torch.device(device) if device is not None else next(model.parameters()).device

    def embed_rows(rows: Any, cache_file: Path | None, fingerprint: str, load: bool) -> Any:
        batches: Iterator[torch.Tensor] | None = None  # started by the first batch map() computes: none on a hit
        done = 0

        def embed(labels: list[int], indices: list[int]) -> dict[str, Any]:
            # map() hands over the batches in order, of the DataLoader's size: its pixels are those rows'
            nonlocal batches, done
            if batches is None:
                loader = patch_pixel_loader(rows, spec, batch_size, num_workers, pin_memory=device.type == "cuda")
                batches = iter(loader)
            if not indices or indices[0] != done:
                raise RuntimeError(f"embedding batches out of order: rows {indices[:1]}... after {done} rows")
            pixels = next(batches).to(device, non_blocking=True)
            done += len(indices)
            embeddings = torch.stack([model.embed(v) for v in tta_views(pixels, views)], dim=1)
            return {"embeddings": embeddings.float().cpu().numpy(), "labels": [int(y) for y in labels]}

        return rows.map(
            embed,
            batched=True,
            batch_size=batch_size,
            input_columns=["label"],  # the image column is read by the DataLoader, not decoded here
            with_indices=True,
            remove_columns=[c for c in rows.column_names if c not in keep],
            features=features,
            keep_in_memory=cache_file is None,
            cache_file_name=str(cache_file) if cache_file is not None else None,
            load_from_cache_file=load,  # the key names everything the embeddings depend on
            new_fingerprint=fingerprint,  # the function's own hash would serialise the whole model
            desc="embedding patches",
        )

    was_training = model.training
    model.eval()
    try:
        if _world_size() > 1:
            seen = _gather((key, str(path) if path is not None else None, path is not None and path.is_file()))
            if len({(k, p) for k, p, _ in seen}) > 1:
                ranks = "; ".join(f"rank {r}: key {k}, file {p}" for r, (k, p, _) in enumerate(seen))
                raise ValueError(f"the processes disagree on the embedding cache (same data and backbone?): {ranks}")
            if path is not None and not all(hit for *_, hit in seen):
                _embed_in_shards(raw, path, key, embed_rows)
        result = embed_rows(raw, path, key, load=True)
    finally:
        model.train(was_training)
    return _as_torch(result)


def _world_size() -> int:
    """Processes of the running `torch.distributed` group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(value: Any) -> list[Any]:
    """`value` of every process, in rank order: a collective every process must enter."""
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def _check_all(error: Exception | None, what: str) -> None:
    """Gather each process's error: raise on every process when one failed, so none waits forever."""
    reports = _gather(None if error is None else f"{type(error).__name__}: {error}")
    failed = [f"rank {r}: {e}" for r, e in enumerate(reports) if e is not None]
    if failed:
        raise RuntimeError(
            f"{what} failed on {len(failed)} of {len(reports)} processes: " + "; ".join(failed)
        ) from error


def _embed_in_shards(raw: Any, path: Path, key: str, embed_rows: Callable[..., Any]) -> None:
    """Every process embeds its contiguous shard into its own file; the main process joins them in order at `path`."""
    import datasets

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    shards = [path.with_name(f"embeddings-{key}-shard{r:05d}-of-{world:05d}.arrow") for r in range(world)]
    shard = raw.shard(world, rank, contiguous=True)
    error = None
    try:  # a stale shard of a crashed run is overwritten (load=False); datasets writes it via a temporary file
        if len(shard):
            embed_rows(shard, shards[rank], f"{key}-{rank}-of-{world}", load=False)
    except Exception as exc:
        error = exc
    _check_all(error, "embedding the shards")
    shards = shards[: min(world, len(raw))]  # contiguous shards: only the last ones can be empty
    error = None
    if rank == 0:
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            missing = [str(f) for f in shards if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{missing}: every process must write to the same (shared) cache folder")
            joined = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in shards])
            joined.map(batched=True, cache_file_name=str(temporary), load_from_cache_file=False, new_fingerprint=key)
            os.replace(temporary, path)  # atomic: the cache path never holds a partial file
            for stale in path.parent.glob(f"embeddings-{key}-shard*-of-*.arrow"):
                stale.unlink(missing_ok=True)
        except Exception as exc:
            error = exc
        finally:
            temporary.unlink(missing_ok=True)
    _check_all(error, "joining the embedding shards")


def _as_torch(dataset):
    return dataset.with_format("torch", columns=["embeddings", "labels"], output_all_columns=True)


class HeadOnlyModel(nn.Module):
    """Train and evaluate a classifier's head on cached embeddings (`[B, D]` or `[B, V, D]` for V views).

    The head is the full model's own `classifier` module (shared, not copied), so training updates the full model
    and `full_model.save_pretrained` saves a complete checkpoint. Only the head is registered as a submodule:
    Trainer checkpoints hold the head alone. With several cached views, training draws one view per patch (flip /
    rotation augmentation) and evaluation averages the softmax over `eval_views` (TTA), returned as log-probs.

    Args:
        model: The `HistoClassifierForImageClassification`.
        eval_views: Indices of the cached views averaged at evaluation (default: all).
        train_views: Indices of the cached views drawn from in training (default: all).
    """

    main_input_name = "embeddings"

    def __init__(self, model: nn.Module, eval_views: list[int] | None = None, train_views: list[int] | None = None):
        super().__init__()
        object.__setattr__(self, "full_model", model)
        self.classifier = model.classifier
        self.config = model.config
        self.eval_views = eval_views
        self.train_views = train_views

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        """Logits of the head for cached embeddings (the loss is computed by the trainer)."""
        if embeddings.dim() == 2:
            return ImageClassifierOutput(logits=self.classifier(embeddings))
        n, v = embeddings.shape[:2]
        if self.training:
            choices = torch.as_tensor(self.train_views if self.train_views is not None else range(v))
            pick = choices[torch.randint(0, len(choices), (n,))].to(embeddings.device)
            return ImageClassifierOutput(logits=self.classifier(embeddings[torch.arange(n), pick]))
        views = self.eval_views if self.eval_views is not None else list(range(v))
        if len(views) == 1:
            return ImageClassifierOutput(logits=self.classifier(embeddings[:, views[0]]))
        probs = torch.softmax(self.classifier(embeddings[:, views]).float(), dim=-1).mean(dim=1)
        return ImageClassifierOutput(logits=probs.clamp_min(1e-12).log())

    def backbone_blocks(self, coarse: bool = False) -> list[tuple[str, list[str]]]:
        """No backbone blocks: only the head trains."""
        return []

    def head_parameter_names(self) -> list[str]:
        """Every parameter is a head parameter."""
        return [name for name, _ in self.named_parameters()]

    def norm_parameter_names(self) -> list[str]:
        """The head's norm layers are found by type in `build_param_groups`."""
        return []


def cached_views_for(augment: str, tta: str) -> tuple[str, list[int], list[int]]:
    """Views to cache, the training subset and the eval subset.

    `flips` augmentation (random flips and quarter turns) is exactly a random pick among the 8 D4 views; TTA
    averages a subset of them.
    """
    if augment == "flips" or tta == "d4":
        return "d4", (list(range(8)) if augment == "flips" else [0]), D4_SUBSETS[tta]
    if tta == "flips":
        return "flips", [0], [0, 1, 2]
    return "none", [0], [0]


def prepare_cached_head(
    model: nn.Module,
    data: Any,
    processor_or_spec: Any,
    augment: str = "none",
    tta: str = "none",
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    eval_split: str = "validation",
    num_workers: int = 0,
) -> tuple[HeadOnlyModel, Any, Any]:
    """Embed the train and eval splits once and wrap the model for head-only training.

    ``batch_size``, ``cache_dir`` and ``num_workers`` are those of `compute_embeddings`; under several processes
    every process must call it (each embeds its shard of the patches).

    Returns:
        `(head_model, train_embeddings, eval_embeddings)`, ready for `HistoTrainer` with
        `PatchCollator(input_name="embeddings")`.
    """
    views, train_views, eval_views = cached_views_for(augment, tta)
    options = dict(views=views, batch_size=batch_size, cache_dir=cache_dir, num_workers=num_workers)
    train = compute_embeddings(model, data["train"], processor_or_spec, **options)
    evaluation = None
    if eval_split in data:
        evaluation = compute_embeddings(model, data[eval_split], processor_or_spec, **options)
    return HeadOnlyModel(model, eval_views=eval_views, train_views=train_views), train, evaluation


def embeddings_array(dataset: Any) -> np.ndarray:
    """All cached embeddings as one `[N, V, D]` array (for probes and plots)."""
    return np.asarray(dataset.with_format("numpy")[:]["embeddings"])
