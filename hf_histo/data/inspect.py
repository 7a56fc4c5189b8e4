"""``hf-histo inspect``: class counts, patches per image per strategy, data flags and pictures of the patching."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..utils import atomic_savefig, atomic_write_text
from .images import DataError, load_image
from .masks import load_mask, resolve_mask
from .patching import STRATEGIES, PatchBox, PatchingConfig
from .sources import Sample, read_samples
from .stain import normalize_stain

__all__ = ["InspectionReport", "inspect_dataset"]

STRATEGY_COLOURS = {"grid": "#1f77b4", "components": "#ff7f0e", "topk": "#d62728", "whole": "#9467bd"}
FLAG_NAMES = {
    "missing_mask": "no mask (tissue detected)",
    "empty_mask": "empty mask",
    "size_mismatch": "mask size differs from image",
    "no_tissue": "nothing found: whole image used",
}
_DISPLAY_SIDE = 640  # contact sheet panels are drawn from copies at most this large


@dataclass
class InspectionReport:
    """What ``inspect_dataset`` found.

    Attributes:
        data_dir: The data folder.
        layout: Its layout.
        n_images: Readable images.
        n_groups: Distinct groups (patients).
        class_counts: Images per class; unlabelled images count under ``"(no label)"``.
        split_counts: Images per split (``train`` / ``test``).
        patches: Per strategy: ``total``, ``min``, ``median``, ``max`` patches per image, and
            ``fallbacks`` (images where the strategy found nothing and the best tile was used).
        flags: Image ids per flag (``missing_mask``, ``empty_mask``, ``size_mismatch``, ``no_tissue``).
        skipped: ``[file, reason]`` of unreadable samples (``on_error="skip"``).
        figures: The PNG files written.
        options: The patching options used.
    """

    data_dir: str
    layout: str
    n_images: int
    n_groups: int
    class_counts: dict[str, int]
    split_counts: dict[str, int]
    patches: dict[str, dict[str, float]]
    flags: dict[str, list[str]]
    skipped: list[list[str]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)

    def table(self) -> str:
        """The report as plain-text tables, for the terminal."""
        splits = ", ".join(f"{n} {k}" for k, n in self.split_counts.items())
        lines = [
            f"{self.data_dir} ({self.layout} layout): {self.n_images} images ({splits}), {self.n_groups} groups",
            "",
        ]
        width = max([len("class")] + [len(c) for c in self.class_counts])
        lines += [f"{'class':<{width}}  images", f"{'-' * width}  ------"]
        lines += [f"{c:<{width}}  {n:>6}" for c, n in self.class_counts.items()]
        lines += ["", f"{'strategy':<10}  {'patches':>7}  {'min':>5}  {'median':>6}  {'max':>5}  {'fallbacks':>9}"]
        lines.append(f"{'-' * 10}  {'-' * 7}  {'-' * 5}  {'-' * 6}  {'-' * 5}  {'-' * 9}")
        for name, s in self.patches.items():
            lines.append(
                f"{name:<10}  {s['total']:>7}  {s['min']:>5g}  {s['median']:>6g}  {s['max']:>5g}  {s['fallbacks']:>9}"
            )
        lines += ["", "flags:"]
        for key, label in FLAG_NAMES.items():
            ids = self.flags.get(key, [])
            shown = ", ".join(ids[:8]) + (f", ... (+{len(ids) - 8})" if len(ids) > 8 else "")
            lines.append(f"  {label}: {len(ids)}" + (f" [{shown}]" if ids else ""))
        lines.append(f"  skipped (unreadable): {len(self.skipped)}")
        lines += [f"    {file}: {reason}" for file, reason in self.skipped]
        if self.figures:
            lines += ["", "figures:"] + [f"  {f}" for f in self.figures]
        return "\n".join(lines)


@dataclass
class _Inspected:
    sample: Sample
    size: tuple[int, int]
    mask: np.ndarray
    boxes: dict[str, list[PatchBox]]
    thumbnail: Image.Image


def _pick(samples: Sequence[Sample], n: int) -> set[str]:
    """Up to ``n`` image ids spread over the classes (round-robin over labels, in id order)."""
    by_label: dict[str, list[Sample]] = {}
    for s in samples:
        by_label.setdefault(s.label or "", []).append(s)
    queues = [list(v) for _, v in sorted(by_label.items())]
    chosen: list[str] = []
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0).image_id)
    return set(chosen)


def inspect_dataset(
    data_dir: str | Path,
    out_dir: str | Path,
    patching: PatchingConfig | None = None,
    *,
    strategies: Sequence[str] = ("grid", "components", "topk"),
    layout: str | None = None,
    resize_masks: bool = False,
    max_image_pixels: int | None = None,
    on_error: str = "raise",
    manifest: str | Path | None = None,
    exclude: str | Path | None = None,
    n_contact: int = 6,
) -> InspectionReport:
    """Look at a data folder the way training will see it, and draw what the patching does.

    Every image is decoded, its mask checked (missing, empty, wrong size) and patched with each
    strategy. Writes ``class_distribution.png``, ``patches_per_image.png``, ``contact_sheet.png``
    (a few images, stain-normalised as ``patching.stain_norm`` says, with their mask outline in green and the
    patch boxes of each strategy) and
    ``inspection.json`` to ``out_dir``. A mask of the wrong size is flagged and resized here (building
    a dataset refuses it unless ``resize_masks``).

    Args:
        data_dir: The data folder (any layout) or a ``clean_manifest.csv``.
        out_dir: Where the figures and the JSON report go.
        patching: The patching parameters shared by the strategies (``PatchingConfig()`` when None); its
            ``strategy`` is replaced by each of ``strategies`` in turn.
        strategies: Patching strategies to compare.
        layout: Force a layout.
        resize_masks: Accepted for symmetry with the builder; mismatched masks are always resized here.
        max_image_pixels: Raise PIL's decompression-bomb limit.
        on_error: ``"raise"`` at the first unreadable file, or ``"skip"`` and list it.
        manifest: Read this clean manifest instead.
        exclude: File of image ids to leave out.
        n_contact: Images on the contact sheet.

    Returns:
        The report; ``report.table()`` is what the CLI prints.

    Raises:
        DataError: A problem with the data (with ``on_error="raise"``), naming the file.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    patching = PatchingConfig() if patching is None else patching
    configs = {s: dataclasses.replace(patching, strategy=s) for s in strategies}
    out_dir = Path(out_dir)
    sample_set = read_samples(manifest or data_dir, layout, on_error, manifest, exclude)
    contact_ids = _pick(sample_set.samples, n_contact)
    skipped = [list(x) for x in sample_set.skipped]
    flags: dict[str, list[str]] = {key: [] for key in FLAG_NAMES}
    counts: dict[str, list[int]] = {s: [] for s in strategies}
    fallbacks: Counter[str] = Counter()
    shown: list[_Inspected] = []
    good: list[Sample] = []
    for sample in sample_set.samples:
        try:
            image = load_image(sample.image_path, max_image_pixels)
            mask = None
            if sample.mask_path is not None:
                mask = load_mask(sample.mask_path, max_pixels=max_image_pixels)
                if mask.shape != (image.height, image.width):
                    flags["size_mismatch"].append(sample.image_id)
                    mask = load_mask(sample.mask_path, image.size, resize=True, max_pixels=max_image_pixels)
        except DataError as e:
            if on_error != "skip":
                raise
            skipped.append([str(sample.image_path), str(e)])
            continue
        good.append(sample)
        if mask is None:
            flags["missing_mask"].append(sample.image_id)
        elif not mask.any():
            flags["empty_mask"].append(sample.image_id)
        mask, source = resolve_mask(image, mask, patching.empty_fallback, image_path=sample.image_path)
        if source == "whole":
            flags["no_tissue"].append(sample.image_id)
        boxes = {}
        for name, config in configs.items():
            boxes[name], fell_back = config.boxes_with_fallback(mask)
            counts[name].append(len(boxes[name]))
            fallbacks[name] += fell_back
        if sample.image_id in contact_ids:  # drawn as training sees it: after the stain normalisation
            seen = normalize_stain(image, patching.stain_norm, str(sample.image_path))
            shown.append(_Inspected(sample, image.size, mask, boxes, _thumbnail(seen)))
    if not good:
        raise DataError(f"{data_dir}: no readable image ({len(skipped)} skipped).")

    class_counts = Counter(s.label or "(no label)" for s in good)
    report = InspectionReport(
        data_dir=str(data_dir),
        layout=sample_set.layout,
        n_images=len(good),
        n_groups=len({s.group_id for s in good}),
        class_counts=dict(sorted(class_counts.items())),
        split_counts=dict(sorted(Counter(s.split for s in good).items(), reverse=True)),
        patches={
            name: {
                "total": sum(c),
                "min": min(c),
                "median": float(statistics.median(c)),
                "max": max(c),
                "fallbacks": fallbacks[name],
            }
            for name, c in counts.items()
        },
        flags=flags,
        skipped=skipped,
        options={k: v for k, v in patching.to_dict().items() if k != "strategy"},
    )
    report.figures = [
        str(_plot_classes(report, good, out_dir / "class_distribution.png")),
        str(_plot_patch_counts(counts, out_dir / "patches_per_image.png")),
        str(_plot_contact_sheet(shown, list(strategies), out_dir / "contact_sheet.png", patching.stain_norm)),
    ]
    atomic_write_text(out_dir / "inspection.json", json.dumps(report.to_dict(), indent=1))
    return report


def _thumbnail(image: Image.Image) -> Image.Image:
    scale = min(1.0, _DISPLAY_SIDE / max(image.size))
    if scale == 1.0:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)  # no pyplot: no global state, no GUI backend


def _plot_classes(report: InspectionReport, samples: Sequence[Sample], path: Path) -> Path:
    fig = _figure(max(5.0, 1.1 * len(report.class_counts) + 2), 4)
    ax = fig.add_subplot()
    names = list(report.class_counts)
    bottom = np.zeros(len(names))
    for split, colour in (("train", "#4c72b0"), ("test", "#dd8452")):
        values = np.array(
            [sum(1 for s in samples if (s.label or "(no label)") == n and s.split == split) for n in names]
        )
        if values.any():
            ax.bar(names, values, bottom=bottom, label=split, color=colour)
            bottom += values
    for i, total in enumerate(bottom):
        ax.text(i, total, f"{int(total)}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("images")
    ax.set_title(f"Images per class ({report.n_images} images, {report.n_groups} groups)")
    ax.legend()
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return atomic_savefig(path, fig)


def _plot_patch_counts(counts: dict[str, list[int]], path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig = _figure(4.0 * len(counts), 3.5)
    for i, (name, values) in enumerate(counts.items(), start=1):
        ax = fig.add_subplot(1, len(counts), i)
        bins = np.arange(min(values), max(values) + 2) - 0.5 if max(values) - min(values) < 40 else 30
        ax.hist(values, bins=bins, color=STRATEGY_COLOURS.get(name, "grey"))
        ax.set_title(f"{name}: median {statistics.median(values):g}, {sum(values)} patches")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("patches per image")
        ax.set_ylabel("images")
    fig.tight_layout()
    return atomic_savefig(path, fig)


def _plot_contact_sheet(shown: list[_Inspected], strategies: list[str], path: Path, stain_norm: str) -> Path:
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows, cols = max(len(shown), 1), len(strategies)
    # constrained layout keeps each row's titles clear of the row above (tight_layout lets them overlap on wide images)
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows), dpi=100, layout="constrained")
    for r, item in enumerate(shown):
        thumb = item.thumbnail
        scale = thumb.width / item.size[0]
        small_mask = np.asarray(
            Image.fromarray(item.mask.astype(np.uint8) * 255).resize(thumb.size, Image.NEAREST), dtype=bool
        )
        for c, name in enumerate(strategies):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            ax.imshow(thumb)
            if small_mask.any() and not small_mask.all():
                ax.contour(small_mask.astype(np.uint8), levels=[0.5], colors="lime", linewidths=0.8)
            boxes = item.boxes[name]
            rects = [Rectangle((b.x * scale, b.y * scale), b.w * scale, b.h * scale) for b in boxes]
            ax.add_collection(
                PatchCollection(rects, facecolor="none", edgecolor=STRATEGY_COLOURS.get(name, "red"), linewidth=1.0)
            )
            ax.set_xlim(-0.5, thumb.width - 0.5)
            ax.set_ylim(thumb.height - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            label = item.sample.label or "no label"
            ax.set_title(f"{item.sample.image_id} ({label})\n{name}: {len(boxes)} patches", fontsize=8)
    on = f", on the {stain_norm} stain-normalised images" if stain_norm != "none" else ""
    fig.suptitle(f"Mask outline (green) and patch boxes per strategy{on}", fontsize=10)
    return atomic_savefig(path, fig)
