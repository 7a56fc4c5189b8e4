"""Clean a data folder: read, measure, decide, then write the report, clean manifest, summary and contact sheets."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ...utils import atomic_save_image, atomic_write_text, csv_safe
from ..images import load_image
from ..sources import Sample, SampleSet, read_exclusions, read_samples
from .config import LEAK_REASON, REASONS, CleaningConfig, Flag
from .decisions import find_flags, train_copy_flags
from .features import EmbeddingModel, embed_samples, stream_features

logger = logging.getLogger(__name__)

REPORT_NAME = "cleaning_report.csv"
MANIFEST_NAME = "clean_manifest.csv"
EXCLUSIONS_NAME = "exclusions.txt"
SUMMARY_NAME = "summary.txt"
REPORT_COLUMNS = ("image_id", "reason", "score", "related_to")
MANIFEST_COLUMNS = ("image_id", "image_path", "mask_path", "label", "group_id", "split")


@dataclass
class CleaningResult:
    """What ``clean_dataset`` found and wrote.

    Attributes:
        flags: One ``Flag`` per flagged image, sorted by image_id (test images that copy a training image included).
        kept: The samples written to the clean manifest (test samples included, also those that copy training images).
        out_dir: The output folder.
        files: Written files by key: ``report``, ``manifest``, ``exclusions``, ``summary``, ``sheet_<reason>``.
    """

    flags: list[Flag]
    kept: list[Sample]
    out_dir: Path
    files: dict[str, Path]

    @property
    def flagged_ids(self) -> set[str]:
        """Ids of all flagged images (excluded training images and test images that copy training images)."""
        return {f.image_id for f in self.flags}

    @property
    def excluded_ids(self) -> set[str]:
        """Ids left out of the clean manifest and listed in ``exclusions.txt``."""
        return {f.image_id for f in self.flags if f.reason != LEAK_REASON}

    @property
    def leaks(self) -> list[Flag]:
        """Flags of test images that copy a training image (kept in the manifest: see ``clean_dataset``)."""
        return [f for f in self.flags if f.reason == LEAK_REASON]

    def summary(self) -> str:
        """The text of ``summary.txt``."""
        return self.files["summary"].read_text(encoding="utf-8")

    def counts(self) -> dict[str, int]:
        """Flagged images per reason, only the reasons found (e.g. for a model card)."""
        return {reason: len(flags) for reason, flags in self.by_reason().items() if flags}

    def by_reason(self) -> dict[str, list[Flag]]:
        """Flags grouped by reason (every reason is a key, possibly with no flags)."""
        out: dict[str, list[Flag]] = {r: [] for r in REASONS}
        for f in self.flags:
            out[f.reason].append(f)
        return out


def clean_dataset(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    layout: str | None = None,
    manual_exclusions: str | Path | Iterable[str] | None = None,
    config: CleaningConfig | None = None,
    progress: bool = True,
    embedding_model: str | Path | EmbeddingModel | None = None,
) -> CleaningResult:
    """Find duplicates, non-tissue images and colour artifacts; write a report and a clean manifest.

    Source files are only read. Into ``out_dir`` it writes, atomically and deterministically (a second run
    writes the same bytes):

    - ``cleaning_report.csv``: ``image_id,reason,score,related_to``, one row per flagged image with its
      strongest reason in ``REASONS`` order: manual > shared_mask > non_tissue > artifact > label_conflict >
      duplicate > near_duplicate. ``score`` per reason: manual, duplicate and label_conflict of identical pixels
      1.0; near_duplicate (and label_conflict of one) the thumbnails' correlation; artifact the foreign-colour
      area fraction (or, for an undetected-colour paste found by comparison with its twin, the changed
      fraction); non_tissue ``max(non-H&E colour / non_tissue_colour, z / outlier_z)`` (>= 1 fails on its own);
      shared_mask the fraction of the image that differs from the kept twin. ``related_to`` is the kept
      image it copies or shares its mask with ("" when none). Test images that copy a training image (leakage into
      the test score) get a row ``test_duplicate_of_train`` (score 1.0 for identical pixels, else the near
      duplicate's similarity; ``related_to`` the training image). Text cells that start like a spreadsheet formula
      (``=``, ``+``, ``-``, ``@``) get a leading ``'`` (``utils.csv_safe``): the report is for people.
    - ``clean_manifest.csv``: the kept samples, ``image_id,image_path,mask_path,label,group_id,split``, paths
      relative to ``out_dir`` when inside it, else absolute; pass it (or ``out_dir``) as the data. Its cells are
      exact (not neutralised): the library reads the ids back and predictions must carry the real ones.
    - ``exclusions.txt``: the excluded (flagged training) ids, one per line (``read_samples(data, exclude=...)``).
    - ``summary.txt`` and ``contact_sheet_<reason>.png`` for each reason found: thumbnails of the flagged
      image (and of its related image) with reason and score.

    Of a group of duplicates the most tissue-like member is kept, and of equals the oldest file, then the first
    in image_id order (``config.keep_first``): a copy is usually newer than what it copies. The train split is
    checked (all samples when there is none); test samples always pass through to the manifest, and are compared
    with the training images: a copy is reported, and kept, since a submission needs a prediction for every test
    image (to score honestly, leave it out of the score or exclude its training twin).

    Args:
        data_dir: A data folder in any layout ``read_samples`` reads, or a clean manifest.
        out_dir: Output folder (created).
        layout: Force a layout (detected when None).
        manual_exclusions: A file (one image_id per line, ``#`` comments) or an iterable of ids, flagged
            ``manual``.
        config: Thresholds (``CleaningConfig()`` when None).
        progress: Show progress bars.
        embedding_model: A local model folder (transformers ``save_pretrained`` output; never downloaded) or a
            callable ``PIL.Image -> 1-D array``; its embeddings replace the colour/texture statistics in the
            outlier score.

    Returns:
        The flags, the kept samples and the written files.

    Raises:
        DataError: Unreadable data (the message names the file and the fix).
    """
    cfg = config or CleaningConfig()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    sample_set = read_samples(data_dir, layout=layout)
    checked = _data_order(sample_set.train or sample_set.samples, cfg.keep_first)
    checked_ids = {s.image_id for s in checked}
    manual: set[str] = set()
    if manual_exclusions is not None:
        if isinstance(manual_exclusions, (str, Path)):
            manual = read_exclusions(manual_exclusions)
        else:
            manual = {str(m) for m in manual_exclusions}
    unknown = sorted(manual - checked_ids)
    if unknown:
        logger.warning("manual exclusions not among the checked images (ignored): %s", ", ".join(unknown[:10]))

    features = stream_features(checked, cfg, progress)
    vectors = embed_samples(checked, embedding_model, progress) if embedding_model is not None else None
    flags = find_flags(checked, features, cfg, manual=manual, vectors=vectors)
    flagged = {f.image_id for f in flags}
    compared = sample_set.test if sample_set.train else []  # test images, compared with the training images
    leaks = train_copy_flags(checked, features, compared, stream_features(compared, cfg, progress), cfg, flagged)
    flags = sorted(flags + leaks, key=lambda f: f.image_id)
    kept = [s for s in sorted(sample_set.samples, key=lambda s: s.image_id) if s.image_id not in flagged]

    out_dir.mkdir(parents=True, exist_ok=True)
    # The report is opened in spreadsheets: neutralise formula-like ids. The manifest stays exact (it is data).
    report_rows = [(csv_safe(f.image_id), f.reason, f"{f.score:.4f}", csv_safe(f.related_to)) for f in flags]
    manifest_rows = [
        (
            s.image_id,
            _relative_or_absolute(s.image_path, out_dir),
            _relative_or_absolute(s.mask_path, out_dir),
            s.label or "",
            s.group_id,
            s.split,
        )
        for s in kept
    ]
    files = {
        "report": atomic_write_text(out_dir / REPORT_NAME, _csv_text(REPORT_COLUMNS, report_rows)),
        "manifest": atomic_write_text(out_dir / MANIFEST_NAME, _csv_text(MANIFEST_COLUMNS, manifest_rows)),
        "exclusions": atomic_write_text(out_dir / EXCLUSIONS_NAME, "".join(f"{i}\n" for i in sorted(flagged))),
        "summary": atomic_write_text(
            out_dir / SUMMARY_NAME,
            _summary(data_dir, sample_set, (len(checked), len(compared)), flags, len(kept), unknown),
        ),
    }
    result = CleaningResult(flags=flags, kept=kept, out_dir=out_dir, files=files)
    for path in out_dir.glob("contact_sheet_*.png"):  # a sheet left by an earlier run would mislead
        if path.stem.removeprefix("contact_sheet_") in REASONS:
            path.unlink()
    by_id = {s.image_id: s for s in [*checked, *compared]}
    boxes = {f.image_id: f.artifact_box for f in features}
    for reason, group in result.by_reason().items():
        if group:
            shown = sorted(group, key=lambda f: (-f.score, f.image_id))[: cfg.contact_sheet_max]
            sheet = _contact_sheet(reason, shown, by_id, boxes, cfg.thumbnail_size, len(group))
            files[f"sheet_{reason}"] = atomic_save_image(out_dir / f"contact_sheet_{reason}.png", sheet)
    return result


def _data_order(samples: Sequence[Sample], keep_first: str) -> list[Sample]:
    """Samples in the order that decides which of identical images is kept (the first)."""
    if keep_first == "image_id":
        return sorted(samples, key=lambda s: s.image_id)
    if keep_first == "oldest":
        return sorted(samples, key=lambda s: (Path(s.image_path).stat().st_mtime_ns, s.image_id))
    raise ValueError(f"keep_first must be 'oldest' or 'image_id', got {keep_first!r}")


def _relative_or_absolute(path: Path | None, base: Path) -> str:
    if path is None:
        return ""
    path = Path(path).resolve()
    try:
        return path.relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def _csv_text(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def _thumbnail(path: Path, size: int, box: tuple[float, float, float, float] | None = None) -> Image.Image:
    image = load_image(path)
    image.thumbnail((size, size), Image.BILINEAR)
    if box is not None:
        w, h = image.size
        outline = [box[0] * w - 1, box[1] * h - 1, box[2] * w + 1, box[3] * h + 1]
        ImageDraw.Draw(image).rectangle(outline, outline=(255, 0, 0), width=2)
    return image


def _contact_sheet(
    reason: str,
    flags: Sequence[Flag],
    samples: dict[str, Sample],
    boxes: dict[str, tuple[float, float, float, float] | None],
    size: int,
    n_flagged: int,
) -> Image.Image:
    """A titled sheet of flagged images' thumbnails (artifact regions boxed in red), each beside the image it relates to.

    The title and caption heights are measured with the font, so no text runs into a thumbnail whatever the font.
    """
    cols = 4
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_height(text: str) -> int:
        return probe.multiline_textbbox((0, 0), text, font=font, spacing=1)[3]

    shown = f"the {len(flags)} highest scores of {n_flagged}" if len(flags) < n_flagged else f"{n_flagged}"
    title = f"{reason}: {shown} flagged image(s), highest score first"
    if any(f.related_to for f in flags):
        title += f"; right of each: the {'training' if reason == LEAK_REASON else 'kept'} image it relates to"
    title_h, caption_h = text_height(title) + 10, text_height("Ag\nAg") + 5
    cell_w, cell_h = 2 * size + 16, caption_h + size + 8
    rows = max(1, math.ceil(len(flags) / cols))
    sheet = Image.new("RGB", (cols * cell_w, title_h + rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    related: dict[str, Image.Image] = {}  # a kept image is often the twin of several flagged ones
    for k, flag in enumerate(flags):
        x, y = (k % cols) * cell_w + 4, title_h + (k // cols) * cell_h
        caption = f"{flag.image_id[:36]}\n{flag.reason} {flag.score:.3f}"
        if flag.related_to:
            caption += f"   {'train' if flag.reason == LEAK_REASON else 'kept'}: {flag.related_to[:24]}"
        draw.multiline_text((x, y), caption, fill=(0, 0, 0), font=font, spacing=1)
        box = boxes.get(flag.image_id) if flag.reason == "artifact" else None
        sheet.paste(_thumbnail(samples[flag.image_id].image_path, size, box), (x, y + caption_h))
        if flag.related_to:
            if flag.related_to not in related:
                related[flag.related_to] = _thumbnail(samples[flag.related_to].image_path, size)
            sheet.paste(related[flag.related_to], (x + size + 4, y + caption_h))
    return sheet


def _summary(
    data_dir: Path,
    sample_set: SampleSet,
    checked: tuple[int, int],
    flags: Sequence[Flag],
    kept: int,
    unknown_manual: Sequence[str],
) -> str:
    """The text of ``summary.txt``; ``checked`` is (images checked, test images compared with them)."""
    counts = {r: 0 for r in REASONS}
    for f in flags:
        counts[f.reason] += 1
    leaks = [f for f in flags if f.reason == LEAK_REASON]
    lines = [
        "hf-histo clean",
        f"data: {data_dir} (layout: {sample_set.layout})",
        f"images checked: {checked[0]}",
        f"images flagged: {len(flags) - len(leaks)} (left out of {MANIFEST_NAME}, listed in {EXCLUSIONS_NAME})",
        f"test images compared with the training images: {checked[1]}",
        f"test images that duplicate a training image: {len(leaks)} (kept in {MANIFEST_NAME})",
        f"samples kept in {MANIFEST_NAME}: {kept}",
        "",
        "flagged images per reason (one row per image: its strongest reason, in this order):",
    ]
    lines += [f"  {r:24s} {counts[r]}" for r in REASONS]
    conflicts = sorted({f.related_to for f in flags if f.reason == "label_conflict"})
    if conflicts:
        lines += ["", "kept images whose duplicates carry another label (check these labels):"]
        lines += [f"  {c}" for c in conflicts]
    if leaks:
        lines += [
            "",
            "test images that copy a training image (leakage: a test score on them measures memory, not",
            "generalisation). They stay in the manifest, since a submission needs every test image; for an honest",
            "score leave them out of it, or exclude their training twins (test image = training image, score):",
        ]
        lines += [f"  {f.image_id} = {f.related_to} ({f.score:.4f})" for f in leaks]
    if unknown_manual:
        lines += ["", "manual exclusions not among the checked images (ignored):"] + [f"  {u}" for u in unknown_manual]
    lines += [
        "",
        "No source file was modified. Check the contact sheets, then train on the cleaned set by passing",
        f"{MANIFEST_NAME} (or this folder) as the data, or the data with the exclusion list {EXCLUSIONS_NAME}.",
    ]
    return "\n".join(lines) + "\n"
