"""BuildReport: what a patch dataset build did (splits, patches per image, mask sources, skipped files)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["BuildReport"]

_SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}


@dataclass
class BuildReport:
    """What a patch dataset build did.

    Attributes:
        data_dir: The data folder (or manifest).
        layout: The layout read.
        config_name: Strategy and parameters, e.g. ``topk-p128-s64-k12``.
        label_names: Class names (ClassLabel order).
        splits: ``{split: {"images": n, "patches": n}}``.
        patches_per_image: ``{split or "all": [min, median, max]}``.
        mask_sources: How many images used their ``mask``, ``tissue`` detection (no mask),
            ``empty_mask_tissue`` / ``empty_mask_whole`` (empty mask fallback) or ``whole`` (nothing found).
        zero_patch_fallbacks: Images where the strategy found no patch and the best single tile was used.
        skipped: ``[file, reason]`` of every sample left out (``on_error="skip"``).
        images: Per image: ``image_id``, ``group_id``, ``split``, ``patches``, ``mask_source``, ``fallback``.
        cache_dir: Where the Arrow files are.
        cached: Whether this call loaded an existing cache.
        seconds: Time of this call.
    """

    data_dir: str
    layout: str
    config_name: str
    label_names: list[str]
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    patches_per_image: dict[str, list[float]] = field(default_factory=dict)
    mask_sources: dict[str, int] = field(default_factory=dict)
    zero_patch_fallbacks: int = 0
    skipped: list[list[str]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    cache_dir: str = ""
    cached: bool = False
    seconds: float = 0.0

    @property
    def n_images(self) -> int:
        """Images that yielded patches."""
        return sum(s["images"] for s in self.splits.values())

    @property
    def n_patches(self) -> dict[str, int]:
        """Patches per split."""
        return {name: s["patches"] for name, s in self.splits.items()}

    @property
    def empty_mask_fallbacks(self) -> int:
        """Images whose mask was empty (replaced by tissue detection or the whole image)."""
        return sum(n for source, n in self.mask_sources.items() if source.startswith("empty_mask"))

    @property
    def tissue_detected(self) -> int:
        """Images patched on detected tissue (no mask, or an empty mask with the tissue fallback)."""
        return self.mask_sources.get("tissue", 0) + self.mask_sources.get("empty_mask_tissue", 0)

    @classmethod
    def from_records(
        cls,
        records: Sequence[dict[str, Any]],
        *,
        data_dir: str,
        layout: str,
        config_name: str,
        label_names: Sequence[str],
        skipped: Sequence[Sequence[str]] = (),
    ) -> BuildReport:
        """Summarise the per-image records the builder's generator wrote.

        Args:
            records: One dict per image: ``image_id``, ``split``, ``patches``, ``mask_source``, ``fallback``
                (and ``group_id``), or ``{"image_id", "split", "error": [file, reason]}`` for a skipped image.
            data_dir: The data folder (or manifest).
            layout: The layout read.
            config_name: The patching config's name.
            label_names: Class names in ClassLabel order.
            skipped: ``[file, reason]`` of samples left out before patching (unreadable tables, bad rows).
        """
        good = [r for r in records if "error" not in r]
        splits: dict[str, dict[str, int]] = {}
        per_split: dict[str, list[int]] = {}
        for r in good:
            entry = splits.setdefault(r["split"], {"images": 0, "patches": 0})
            entry["images"] += 1
            entry["patches"] += r["patches"]
            per_split.setdefault(r["split"], []).append(r["patches"])
        per_split["all"] = [r["patches"] for r in good]
        return cls(
            data_dir=data_dir,
            layout=layout,
            config_name=config_name,
            label_names=list(label_names),
            splits=dict(sorted(splits.items(), key=lambda kv: _SPLIT_ORDER.get(kv[0], 9))),
            patches_per_image={k: _stats(v) for k, v in per_split.items() if v},
            mask_sources=dict(sorted(Counter(r["mask_source"] for r in good).items())),
            zero_patch_fallbacks=sum(bool(r["fallback"]) for r in good),
            skipped=[list(x) for x in skipped] + [r["error"] for r in records if "error" in r],
            images=sorted(good, key=lambda r: r["image_id"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildReport:
        """Inverse of ``to_dict`` (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def summary(self) -> str:
        """A few lines for logs and the CLI."""
        parts = ", ".join(f"{k} {v['images']} images/{v['patches']} patches" for k, v in self.splits.items())
        ppi = self.patches_per_image.get("all", [0, 0, 0])
        lines = [
            f"{self.config_name} on {self.data_dir} ({self.layout}): {parts}",
            f"patches per image min/median/max {ppi[0]:g}/{ppi[1]:g}/{ppi[2]:g}; classes {self.label_names}",
            f"masks: {self.mask_sources}; empty-mask fallbacks {self.empty_mask_fallbacks}; "
            f"zero-patch fallbacks {self.zero_patch_fallbacks}; skipped {len(self.skipped)}",
            f"{'loaded from cache' if self.cached else 'built'} in {self.seconds:.2f}s: {self.cache_dir}",
        ]
        lines += [f"  skipped {file}: {reason}" for file, reason in self.skipped]
        return "\n".join(lines)


def _stats(values: list[int]) -> list[float]:
    return [min(values), float(statistics.median(values)), max(values)]
