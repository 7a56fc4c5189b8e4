"""Build contaminated copies of a real data folder (cartoons, blobs, duplicates) with their ground truth."""

from __future__ import annotations

import colorsys
import csv
import io
import math
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

SHARED_DATA = Path(os.environ.get("HF_HISTO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
GLAS_TRAIN = SHARED_DATA / "glas_train"

KINDS = ("cartoon", "cartoon_blend", "blob", "duplicate", "near_duplicate", "label_conflict")

# Which report reasons count as finding each kind (the reason of the image's row in cleaning_report.csv).
EXPECTED_REASONS = {
    "cartoon": {"shared_mask", "non_tissue"},
    "cartoon_blend": {"shared_mask", "non_tissue"},
    "blob": {"artifact"},
    "duplicate": {"duplicate"},
    "near_duplicate": {"near_duplicate"},
    "label_conflict": {"label_conflict"},
}

BLOB_HUES = {  # degrees
    "green": (85, 140),
    "yellow_green": (60, 85),
    "yellow": (45, 60),
    "cyan": (170, 195),
    "blue": (200, 235),
}


@dataclass(frozen=True)
class ContaminationParams:
    """Ranges the generator draws from; the held-out set uses other values than the development one.

    Attributes:
        n_per_kind: Contaminated images per kind.
        blend_alpha: Opacity range of a cartoon blended over real tissue.
        cartoon_green_face: Probability that a cartoon face is green (the "Shrek" case).
        cartoon_shaded: Probability of a shaded, noisy (CGI-like) cartoon instead of flat colours.
        cartoon_shared_mask: Probability that a cartoon reuses its real twin's mask file (else its own
            random mask or none).
        blob_colors: Colour families of pasted blobs (keys of ``BLOB_HUES``).
        blob_alpha: Opacity range of a blob.
        blob_area: Range of the blobs' total area as a fraction of the image.
        blob_count: Inclusive range of blobs per image.
        blob_shapes: Shapes to draw from: ``ellipse``, ``polygon``, ``blob``.
        blob_twin: Probability that a blob image is a pixel-aligned twin of a real image sharing its mask
            (else a flipped/rotated copy with a transformed mask: no hash relation to the original).
        jpeg_quality: Quality range of the re-encoded near duplicates.
        near_dup_edits: Edits applied after the JPEG round trip (one drawn per image, ``none`` included).
        drawing: Probability that a cartoon is a line drawing on paper instead of a coloured scene.
    """

    n_per_kind: int = 24
    blend_alpha: tuple[float, float] = (0.5, 0.7)
    cartoon_green_face: float = 0.5
    cartoon_shaded: float = 0.3
    cartoon_shared_mask: float = 0.7
    blob_colors: tuple[str, ...] = ("green", "yellow_green", "yellow", "cyan", "blue")
    blob_alpha: tuple[float, float] = (0.75, 1.0)
    blob_area: tuple[float, float] = (0.02, 0.15)
    blob_count: tuple[int, int] = (1, 3)
    blob_shapes: tuple[str, ...] = ("ellipse", "polygon", "blob")
    blob_twin: float = 0.5
    jpeg_quality: tuple[int, int] = (80, 92)
    near_dup_edits: tuple[str, ...] = ("none", "resize", "crop", "brightness", "contrast")
    drawing: float = 0.25


DEV_PARAMS = ContaminationParams()
HELDOUT_PARAMS = ContaminationParams(
    n_per_kind=20,
    blend_alpha=(0.55, 0.65),
    cartoon_green_face=0.7,
    cartoon_shaded=0.6,
    cartoon_shared_mask=0.5,
    blob_alpha=(0.7, 0.95),
    blob_area=(0.02, 0.12),
    blob_count=(1, 2),
    jpeg_quality=(75, 90),
    drawing=0.4,
)


@dataclass
class _Original:
    stem: str
    image: Path
    mask: Path | None
    label: str
    patient: str
    extra: dict = field(default_factory=dict)


def _read_originals(src: Path) -> list[_Original]:
    with open(src / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        image = src / "images" / row["filename"]
        mask = src / "masks" / row["filename"]
        out.append(_Original(image.stem, image, mask if mask.is_file() else None, row["label"], row["patient_id"]))
    return out


def _hsv_color(rng: np.random.Generator, hue_deg: float, sat=(0.5, 1.0), val=(0.5, 1.0)) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360) / 360, rng.uniform(*sat), rng.uniform(*val))
    return int(r * 255), int(g * 255), int(b * 255)


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return _hsv_color(rng, rng.uniform(0, 360), (0.3, 1.0), (0.35, 1.0))


def _star(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        rr = r if i % 2 == 0 else r * 0.45
        a = rot + math.pi * i / n
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def make_drawing(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A line drawing on paper: dark strokes (curves, circles, a face, scribbled text), a few pale washes."""
    w, h = size
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(235, 256, 3)))
    draw = ImageDraw.Draw(img)
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    lw = int(rng.integers(2, 6))
    for _ in range(int(rng.integers(1, 4))):  # pale washes
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.3) * min(w, h)
        wash = _hsv_color(rng, rng.uniform(0, 360), (0.1, 0.35), (0.85, 1))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=wash)
    for _ in range(int(rng.integers(6, 16))):  # strokes
        pts = np.cumsum(rng.normal(0, 0.06 * min(w, h), (int(rng.integers(3, 9)), 2)), axis=0)
        pts += (rng.uniform(0, w), rng.uniform(0, h))
        draw.line([tuple(p) for p in pts], fill=ink, width=lw, joint="curve")
    fr = rng.uniform(0.15, 0.3) * min(w, h)
    fx, fy = rng.uniform(fr, w - fr), rng.uniform(fr, h - fr)
    draw.ellipse([fx - fr, fy - fr * 1.1, fx + fr, fy + fr * 1.1], outline=ink, width=lw)
    for side in (-1, 1):
        ex, ey = fx + side * fr * 0.4, fy - fr * 0.3
        draw.ellipse([ex - 6, ey - 6, ex + 6, ey + 6], fill=ink)
    draw.arc([fx - fr * 0.5, fy, fx + fr * 0.5, fy + fr * 0.6], 20, 160, fill=ink, width=lw)
    try:
        font = ImageFont.load_default(size=int(rng.integers(16, 40)))
        draw.text((rng.uniform(0, w * 0.5), rng.uniform(0, h * 0.9)), "lorem ipsum", fill=ink, font=font)
    except OSError:  # no FreeType
        pass
    return img


def make_cartoon(
    size: tuple[int, int], rng: np.random.Generator, params: ContaminationParams = DEV_PARAMS
) -> Image.Image:
    """Draw a procedural cartoon: a background scene, a face with outlines, shapes and text-like strokes."""
    if rng.random() < params.drawing:
        return make_drawing(size, rng)
    w, h = size
    img = Image.new("RGB", size, _random_color(rng))
    draw = ImageDraw.Draw(img)
    style = rng.integers(3)
    if style == 1:  # sky and ground
        horizon = int(h * rng.uniform(0.4, 0.75))
        draw.rectangle([0, horizon, w, h], fill=_random_color(rng))
    elif style == 2:  # vertical gradient
        c0, c1 = np.array(_random_color(rng), float), np.array(_random_color(rng), float)
        t = np.linspace(0, 1, h)[:, None, None]
        img = Image.fromarray((c0 * (1 - t) + c1 * t).repeat(w, axis=1).astype(np.uint8))
        draw = ImageDraw.Draw(img)
    outline = (0, 0, 0) if rng.random() < 0.8 else _hsv_color(rng, rng.uniform(0, 360), (0.5, 1), (0.1, 0.3))
    lw = int(rng.integers(2, 7))
    for _ in range(int(rng.integers(3, 10))):  # background shapes
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.04, 0.2) * min(w, h)
        kind = rng.integers(4)
        fill = _random_color(rng)
        if kind == 0:
            draw.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=fill, outline=outline, width=lw)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=fill, outline=outline, width=lw)
        elif kind == 2:
            draw.polygon(_star(cx, cy, r, int(rng.integers(4, 7)), rng.uniform(0, 6)), fill=fill, outline=outline)
        else:
            pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.sort(rng.uniform(0, 2 * math.pi, 5))]
            draw.polygon(pts, fill=fill, outline=outline, width=lw)
    # The face.
    face_hue = rng.uniform(75, 130) if rng.random() < params.cartoon_green_face else rng.uniform(0, 360)
    skin = _hsv_color(rng, face_hue, (0.45, 0.9), (0.5, 0.9))
    fr = rng.uniform(0.18, 0.32) * min(w, h)
    fx, fy = rng.uniform(fr, w - fr), rng.uniform(fr, h - fr)
    for side in (-1, 1):  # ears
        ex, ey = fx + side * fr * 0.95, fy - fr * 0.35
        draw.ellipse(
            [ex - fr * 0.22, ey - fr * 0.15, ex + fr * 0.22, ey + fr * 0.15], fill=skin, outline=outline, width=lw
        )
    draw.ellipse([fx - fr, fy - fr * 1.1, fx + fr, fy + fr * 1.1], fill=skin, outline=outline, width=lw)
    for side in (-1, 1):  # eyes and brows
        ex, ey = fx + side * fr * 0.38, fy - fr * 0.25
        er = fr * rng.uniform(0.14, 0.22)
        draw.ellipse(
            [ex - er, ey - er, ex + er, ey + er], fill=(250, 250, 245), outline=outline, width=max(1, lw // 2)
        )
        pr = er * 0.45
        draw.ellipse(
            [ex - pr, ey - pr, ex + pr, ey + pr], fill=_hsv_color(rng, rng.uniform(0, 360), (0.3, 1), (0.05, 0.4))
        )
        draw.line([ex - er, ey - er * 1.6, ex + er, ey - er * 1.3 - side * er * 0.3], fill=outline, width=lw + 2)
    mouth = [fx - fr * 0.5, fy + fr * 0.05, fx + fr * 0.5, fy + fr * 0.7]
    draw.chord(mouth, 10, 170, fill=(120, 20, 30), outline=outline, width=lw)
    # Text-like strokes (a caption).
    try:
        font = ImageFont.load_default(size=int(rng.integers(18, 48)))
        text = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ !?")) for _ in range(int(rng.integers(5, 14))))
        draw.text((rng.uniform(0, w * 0.4), rng.uniform(0, h * 0.85)), text, fill=_random_color(rng), font=font)
    except OSError:  # no FreeType: strokes instead
        pass
    y = rng.uniform(0.05, 0.9) * h
    for k in range(int(rng.integers(4, 12))):
        x0 = w * 0.05 + k * rng.uniform(12, 30)
        draw.line([x0, y, x0 + rng.uniform(5, 20), y + rng.uniform(-15, 15)], fill=outline, width=lw)
    if rng.random() < params.cartoon_shaded:  # CGI-like: soft shading, light gradient and sensor noise
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.5)))
        arr = np.asarray(img, dtype=np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        light = 1.0 + 0.25 * np.cos(((xx - fx) ** 2 + (yy - fy) ** 2) ** 0.5 / max(w, h) * math.pi)[..., None] - 0.1
        arr = arr * light + rng.normal(0, rng.uniform(2, 7), arr.shape)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def _blob_alpha(size: tuple[int, int], area: float, shape: str, rng: np.random.Generator) -> np.ndarray:
    """A float alpha map in [0, 1] of one blob covering about ``area`` of the image."""
    w, h = size
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    r = math.sqrt(area * w * h / math.pi)
    cx, cy = rng.uniform(r, max(r + 1, w - r)), rng.uniform(r, max(r + 1, h - r))
    if shape == "ellipse":
        ratio = rng.uniform(0.5, 1.0)
        a, b = r / math.sqrt(ratio), r * math.sqrt(ratio)
        box = Image.new("L", (int(2 * a) + 4, int(2 * a) + 4), 0)
        ImageDraw.Draw(box).ellipse([2, a - b + 2, 2 * a + 2, a + b + 2], fill=255)
        box = box.rotate(rng.uniform(0, 180), resample=Image.BILINEAR)
        canvas.paste(box, (int(cx - box.width / 2), int(cy - box.height / 2)))
    elif shape == "polygon":
        n = int(rng.integers(5, 10))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = r * rng.uniform(0.8, 1.35, n)
        draw.polygon([(cx + q * math.cos(t), cy + q * math.sin(t)) for q, t in zip(radii, angles)], fill=255)
    else:  # organic blob: a few overlapping discs, smoothed
        for _ in range(int(rng.integers(3, 7))):
            rr = r * rng.uniform(0.4, 0.75)
            ox, oy = cx + rng.normal(0, r * 0.35), cy + rng.normal(0, r * 0.35)
            draw.ellipse([ox - rr, oy - rr, ox + rr, oy + rr], fill=255)
        canvas = canvas.filter(ImageFilter.GaussianBlur(r * 0.15)).point(lambda v: 255 if v > 110 else 0)
    if rng.random() < 0.5:  # soft edge
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(1, 4)))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def paste_blobs(
    image: Image.Image, rng: np.random.Generator, params: ContaminationParams = DEV_PARAMS
) -> tuple[Image.Image, float]:
    """Paste saturated foreign-colour blobs into a copy of ``image``; returns it and the blobs' area fraction."""
    arr = np.asarray(image, dtype=np.float32)
    n = int(rng.integers(params.blob_count[0], params.blob_count[1] + 1))
    total = rng.uniform(*params.blob_area)
    covered = np.zeros(arr.shape[:2], bool)
    for _ in range(n):
        alpha = _blob_alpha(image.size, total / n, str(rng.choice(params.blob_shapes)), rng)
        lo, hi = BLOB_HUES[str(rng.choice(params.blob_colors))]
        color = np.array(_hsv_color(rng, rng.uniform(lo, hi), (0.7, 1.0), (0.55, 1.0)), np.float32)
        fill = np.broadcast_to(color, arr.shape).copy()
        if rng.random() < 0.5:  # some texture inside the blob
            fill += rng.normal(0, rng.uniform(3, 12), arr.shape)
        a = alpha[..., None] * rng.uniform(*params.blob_alpha)
        arr = arr * (1 - a) + fill * a
        covered |= alpha > 0.5
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), float(covered.mean())


def _transform_pair(image: Image.Image, mask: Image.Image | None, rng: np.random.Generator):
    op = [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180][
        int(rng.integers(3))
    ]
    return image.transpose(op), (mask.transpose(op) if mask is not None else None)


def reencode(
    image: Image.Image, mask: Image.Image | None, rng: np.random.Generator, params: ContaminationParams = DEV_PARAMS
) -> tuple[Image.Image, Image.Image | None, str]:
    """JPEG round trip plus one light edit; the mask follows geometric edits."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(rng.integers(params.jpeg_quality[0], params.jpeg_quality[1] + 1)))
    out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    edit = str(rng.choice(params.near_dup_edits))
    w, h = out.size
    if edit == "resize":
        s = rng.uniform(0.85, 1.15)
        size = (max(8, round(w * s)), max(8, round(h * s)))
        out = out.resize(size, Image.BILINEAR)
        mask = mask.resize(size, Image.NEAREST) if mask is not None else None
    elif edit == "crop":
        box = (
            int(w * rng.uniform(0, 0.04)),
            int(h * rng.uniform(0, 0.04)),
            w - int(w * rng.uniform(0, 0.04)),
            h - int(h * rng.uniform(0, 0.04)),
        )
        out, mask = out.crop(box), (mask.crop(box) if mask is not None else None)
    elif edit == "brightness":
        out = ImageEnhance.Brightness(out).enhance(rng.choice([-1, 1]) * rng.uniform(0.04, 0.1) + 1)
    elif edit == "contrast":
        out = ImageEnhance.Contrast(out).enhance(rng.choice([-1, 1]) * rng.uniform(0.04, 0.1) + 1)
    return out, mask, edit


def _random_mask(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    m = Image.new("L", size, 0)
    d = ImageDraw.Draw(m)
    w, h = size
    for _ in range(int(rng.integers(1, 5))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.25) * min(w, h)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    return m


def build_contaminated_copy(
    src: str | Path = GLAS_TRAIN,
    dst: str | Path = "contaminated",
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
    params: ContaminationParams = DEV_PARAMS,
    n_per_kind: int | None = None,
    names_first: bool = False,
) -> dict[str, str]:
    """Copy a table-layout folder and add contaminated samples; the source is only read.

    Contaminated images are named ``<original id>_v<NNN>`` (they sort after their original), or
    ``a<NNN>_<original id>`` with ``names_first`` (they sort first); either way they are written after the
    originals are copied, so they are the newer files.

    Args:
        src: A table-layout folder (``images/``, ``masks/``, ``labels.csv`` with filename,label,patient_id).
        dst: The folder to write (created; must not exist or be empty).
        seed: Random seed; the same seed gives the same files.
        kinds: Kinds to generate (see ``KINDS``).
        params: The ranges to draw from (``DEV_PARAMS`` or ``HELDOUT_PARAMS`` or your own).
        n_per_kind: Overrides ``params.n_per_kind``.
        names_first: Name contaminated images so that they sort before the originals.

    Returns:
        ``{image_id: kind}`` for every contaminated image (originals are not listed).
    """
    src, dst = Path(src), Path(dst)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; choose from {KINDS}")
    if n_per_kind is not None:
        params = replace(params, n_per_kind=n_per_kind)
    rng = np.random.default_rng(seed)
    originals = _read_originals(src)
    labels = sorted({o.label for o in originals})
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for o in originals:
        shutil.copyfile(o.image, dst / "images" / o.image.name)
        if o.mask is not None:
            shutil.copyfile(o.mask, dst / "masks" / o.image.name)
        rows.append((o.image.name, o.label, o.patient))

    truth: dict[str, str] = {}
    counter = iter(range(10**6))

    def emit(o: _Original, kind: str, image: Image.Image, mask: Image.Image | Path | None, label: str, **save) -> None:
        stem = f"a{next(counter):03d}_{o.stem}" if names_first else f"{o.stem}_v{next(counter):03d}"
        name = stem + ".png"
        image.save(dst / "images" / name, **({"compress_level": 1} | save))
        if isinstance(mask, Path):
            shutil.copyfile(mask, dst / "masks" / name)
        elif mask is not None:
            mask.save(dst / "masks" / name)
        rows.append((name, label, o.patient))
        truth[stem] = kind

    def pick(k: int) -> list[_Original]:
        return [originals[i] for i in rng.choice(len(originals), size=k, replace=False)]

    for kind in kinds:
        for o in pick(params.n_per_kind):
            image = Image.open(o.image).convert("RGB")
            mask = Image.open(o.mask) if o.mask is not None else None
            if kind in ("cartoon", "cartoon_blend"):
                cartoon = make_cartoon(image.size, rng, params)
                if kind == "cartoon_blend":
                    a = rng.uniform(*params.blend_alpha)
                    cartoon = Image.blend(image, cartoon, float(a))
                u = rng.random()
                if u < params.cartoon_shared_mask:
                    m: Image.Image | Path | None = o.mask
                elif u < (1 + params.cartoon_shared_mask) / 2:
                    m = _random_mask(image.size, rng)
                else:
                    m = None
                emit(o, kind, cartoon, m, str(rng.choice(labels)))
            elif kind == "blob":
                if rng.random() < params.blob_twin:
                    out, _ = paste_blobs(image, rng, params)
                    emit(o, kind, out, o.mask, o.label)
                else:
                    flipped, fmask = _transform_pair(image, mask, rng)
                    out, _ = paste_blobs(flipped, rng, params)
                    emit(o, kind, out, fmask, o.label)
            elif kind in ("duplicate", "label_conflict"):
                label = o.label if kind == "duplicate" else next(x for x in labels if x != o.label)
                u = rng.random()
                if kind == "label_conflict" and u < 0.4:
                    out, m2, _ = reencode(image, mask, rng, params)
                    emit(o, kind, out, m2, label)
                elif u < 0.7:  # same pixels, other PNG bytes
                    emit(o, kind, image, o.mask, label, compress_level=int(rng.choice([0, 3, 6])))
                else:  # same pixels stored as RGBA (opaque), no mask file
                    emit(o, kind, image.convert("RGBA"), None if rng.random() < 0.5 else o.mask, label)
            elif kind == "near_duplicate":
                out, m2, _ = reencode(image, mask, rng, params)
                emit(o, kind, out, m2, o.label)
    with open(dst / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label", "patient_id"])
        writer.writerows(rows)
    return truth


def score_flags(flags: dict[str, str], truth: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per-kind recall and precision of a cleaning report against the generator's ground truth.

    A contaminated image is found when its report reason is one of ``EXPECTED_REASONS[kind]``. Precision of
    a kind: among the images reported with those reasons, the fraction that are contaminated images of a
    kind with the same expected reasons (cartoons alone and blended share theirs).

    Args:
        flags: ``{image_id: reason}`` from the report.
        truth: ``{image_id: kind}`` from ``build_contaminated_copy``.

    Returns:
        ``{kind: {"n", "found", "recall", "precision"}}`` plus ``"originals"``: ``{"flagged": count}``.
    """
    out: dict[str, dict[str, float]] = {}
    for kind in sorted(set(truth.values()), key=KINDS.index):
        expected = EXPECTED_REASONS[kind]
        same = {k for k, r in EXPECTED_REASONS.items() if r == expected}
        members = [i for i, k in truth.items() if k == kind]
        found = sum(1 for i in members if flags.get(i) in expected)
        claimed = [i for i, r in flags.items() if r in expected]
        correct = sum(1 for i in claimed if truth.get(i) in same)
        out[kind] = {
            "n": len(members),
            "found": found,
            "recall": found / max(len(members), 1),
            "precision": correct / len(claimed) if claimed else 1.0,
        }
    out["originals"] = {"flagged": sum(1 for i in flags if i not in truth)}
    return out


def synthetic_tissue(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """An H&E-like RGB image: pink stroma with texture, purple nuclei, white lumens (fast, not realistic)."""
    from scipy import ndimage

    w, h = size
    stroma = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), 3)
    stroma = (stroma - stroma.min()) / (np.ptp(stroma) + 1e-9)
    nuclei = ndimage.gaussian_filter((rng.random((h, w)) < 0.004).astype(np.float32), 2.5) > 0.03
    lumen = ndimage.gaussian_filter(rng.normal(0, 1, (h // 8 + 1, w // 8 + 1)), 2)
    lumen = np.kron(lumen > np.quantile(lumen, 0.85), np.ones((8, 8), bool))[:h, :w]
    pink = np.array([235, 150, 200], np.float32) * (0.8 + 0.2 * stroma[..., None])
    purple = np.array([110, 60, 160], np.float32)
    img = np.where(nuclei[..., None], purple, pink)
    img = np.where(lumen[..., None], np.array([245, 235, 245], np.float32), img)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
