"""Decide which images to flag, and why, from their measurements (no file is read)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components
from scipy.stats import median_abs_deviation
from sklearn.covariance import MinCovDet

from ..sources import Sample
from .config import LEAK_REASON, REASONS, CleaningConfig, Flag
from .features import GRADIENT_FEATURE, ImageFeatures

_CROP_SCALES = (1.0, 0.97, 0.94, 0.91, 0.88)


def robust_z(values: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """Robust z-scores along axis 0: ``(x - median) / (1.4826 * MAD)``, the scale floored at ``floor``.

    Args:
        values: ``(n, ...)`` values, scored per column.
        floor: Smallest scale, so that a constant column gives finite scores.
    """
    values = np.asarray(values, dtype=np.float64)
    mad = median_abs_deviation(values, axis=0, scale="normal")
    return (values - np.median(values, axis=0)) / np.maximum(mad, floor)


def outlier_scores(vectors: np.ndarray, reference: np.ndarray | None = None, ridge: float = 0.1) -> np.ndarray:
    """Robust z-score (median/MAD) of each vector's distance to the centroid of the reference rows.

    Features are centred on their median and scaled by their MAD (floored, so that a feature constant on
    clean data cannot explode); the distance is Mahalanobis under a robust covariance (scikit-learn's
    ``MinCovDet``: minimum covariance determinant on 60% of the rows, reweighted, plus ``ridge`` on the
    diagonal), or the RMS of the scaled features when there are fewer than 3 rows per feature or most rows are
    identical. Wide embeddings are first projected on their principal axes.

    Args:
        vectors: ``(n, d)`` rows to score.
        reference: ``(m, d)`` rows that define the centroid and spread (``vectors`` when None).
        ridge: Added to the robust covariance's diagonal (in MAD units).
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    reference = vectors if reference is None else np.asarray(reference, dtype=np.float64)
    if reference.shape[1] > 32:
        centre = reference.mean(axis=0)
        _, _, vt = np.linalg.svd(reference - centre, full_matrices=False)
        axes = vt[: min(16, max(1, reference.shape[0] // 4))].T
        reference, vectors = (reference - centre) @ axes, (vectors - centre) @ axes
    med = np.median(reference, axis=0)
    mad = median_abs_deviation(reference, axis=0, scale="normal")
    spread = (np.percentile(reference, 90, axis=0) - np.percentile(reference, 10, axis=0)) / 2.5631
    scale = np.maximum(np.maximum(mad, 0.5 * spread), max(0.02, 1e-3 * float(np.abs(med).max())))
    ref, vec = (reference - med) / scale, (vectors - med) / scale
    location, precision = None, None
    if ref.shape[0] >= 3 * ref.shape[1]:
        # Fixed seed: FastMCD draws random starting subsets, and a second run must flag the same images.
        with contextlib.suppress(ValueError):  # raised when most rows are identical (no spread): RMS below
            mcd = MinCovDet(support_fraction=0.6, random_state=0).fit(ref)
            location, precision = mcd.location_, np.linalg.inv(mcd.covariance_ + ridge * np.eye(ref.shape[1]))

    def distance(x: np.ndarray) -> np.ndarray:
        if precision is None:
            return np.sqrt(np.mean(x**2, axis=1))
        d = x - location
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, precision, d), 0))

    ref_dist = distance(ref)
    d_mad = median_abs_deviation(ref_dist, scale="normal")
    return (distance(vec) - np.median(ref_dist)) / max(d_mad, 1e-6)


def _grey(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) @ np.float32([0.299, 0.587, 0.114]) if x.ndim == 3 else x.astype(np.float32)


def aligned_similarity(a: np.ndarray, b: np.ndarray, good_enough: float = 1.0) -> float:
    """Best normalised correlation of two thumbnails when either may be a crop (up to 12% per axis) of the other.

    Coarse to fine: all crop scales are tried on half-size thumbnails, the three best again at full size
    (unless even the best is far below ``good_enough``: then the pair is no copy and that score is returned).
    """
    a, b = _grey(a), _grey(b)
    plain = _correlation(a, b)
    if plain >= good_enough:
        return plain
    half = [x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3)) for x in (a, b)]
    trials = [(big, sy, sx) for big in (0, 1) for sy in _CROP_SCALES for sx in _CROP_SCALES if sx * sy < 1.0]
    coarse = sorted(((_crop_match(half[t[0]], half[1 - t[0]], t[1], t[2]), t) for t in trials), reverse=True)
    if coarse[0][0] < good_enough - 0.3:
        return max(plain, coarse[0][0])
    full = (a, b)
    return max([plain] + [_crop_match(full[t[0]], full[1 - t[0]], t[1], t[2]) for _, t in coarse[:3]])


def _crop_match(big: np.ndarray, small: np.ndarray, sy: float, sx: float) -> float:
    """Best correlation of ``small`` with the windows of ``big`` enlarged by ``1/sy, 1/sx`` (``small`` a crop)."""
    from scipy import ndimage
    from skimage.feature import match_template

    return float(match_template(ndimage.zoom(big, (1 / sy, 1 / sx), order=1), small).max())


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _grey(a).ravel(), _grey(b).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-9))


def near_duplicate_pairs(features: Sequence[ImageFeatures], config: CleaningConfig) -> list[tuple[int, int, float]]:
    """Index pairs ``(i, j, similarity)`` of near duplicates: close hashes, checked pixel-wise when not very close."""
    p = np.array([f.phash for f in features], dtype=np.uint64)
    d = np.array([f.dhash for f in features], dtype=np.uint64)
    pairs = []
    for i in range(len(features) - 1):
        dist = np.bitwise_count(p[i + 1 :] ^ p[i]) + np.bitwise_count(d[i + 1 :] ^ d[i])  # <= 128: fits uint8
        for k in np.nonzero(dist <= config.near_duplicate_candidate)[0]:
            j = i + 1 + int(k)
            sim = _pair_similarity(features[i], features[j], int(dist[k]), config)
            if sim is not None:
                pairs.append((i, j, sim))
    return pairs


def _pair_similarity(a: ImageFeatures, b: ImageFeatures, distance: int, cfg: CleaningConfig) -> float | None:
    """Similarity of two images whose hashes differ in ``distance`` bits; None when they are no near duplicates."""
    if distance <= cfg.near_duplicate_distance:
        return _correlation(a.thumbnail, b.thumbnail)
    sim = aligned_similarity(a.thumbnail, b.thumbnail, good_enough=cfg.near_duplicate_similarity)
    return sim if sim >= cfg.near_duplicate_similarity else None


def train_copy_flags(
    train: Sequence[Sample],
    train_features: Sequence[ImageFeatures],
    test: Sequence[Sample],
    test_features: Sequence[ImageFeatures],
    config: CleaningConfig | None = None,
    excluded: Iterable[str] = (),
) -> list[Flag]:
    """Flag test images that copy a training image (leakage: a test score on them measures memory).

    Args:
        train: Training samples in data order; parallel to ``train_features``.
        train_features: Their measurements.
        test: Test samples; parallel to ``test_features``.
        test_features: Their measurements.
        config: Thresholds (defaults when None); near duplicates follow ``near_duplicate_pairs``'s rules.
        excluded: Training ids flagged for exclusion: a copy is related to a kept training image when there is one.

    Returns:
        One ``LEAK_REASON`` flag per test image that copies a training image, sorted by image_id: score 1.0 for
        identical decoded pixels, else the thumbnails' similarity; ``related_to`` the training image.
    """
    cfg = config or CleaningConfig()
    if not train or not test:
        return []
    skip = set(excluded)
    order = sorted(range(len(train)), key=lambda i: (train[i].image_id in skip, i))  # kept images first
    by_pixels: dict[str, int] = {}
    for i in order:
        by_pixels.setdefault(train_features[i].pixel_hash, i)
    p = np.array([f.phash for f in train_features], dtype=np.uint64)
    d = np.array([f.dhash for f in train_features], dtype=np.uint64)
    flags = []
    for sample, feat in zip(test, test_features):
        match: tuple[float, int] | None = None
        if feat.pixel_hash in by_pixels:
            match = (1.0, by_pixels[feat.pixel_hash])
        else:
            dist = np.bitwise_count(p ^ np.uint64(feat.phash)) + np.bitwise_count(d ^ np.uint64(feat.dhash))
            for i in order:
                if dist[i] <= cfg.near_duplicate_candidate:
                    sim = _pair_similarity(feat, train_features[i], int(dist[i]), cfg)
                    if sim is not None and (match is None or sim > match[0]):
                        match = (sim, i)
        if match is not None:
            flags.append(Flag(sample.image_id, LEAK_REASON, round(float(match[0]), 4), train[match[1]].image_id))
    return sorted(flags, key=lambda f: f.image_id)


def _fine_texture(thumbnail: np.ndarray) -> np.ndarray:
    """The thumbnail's grey high-pass (minus a 1.5 px blur), centred and of unit norm: what a flat overlay keeps."""
    from scipy import ndimage

    grey = _grey(thumbnail)
    fine = grey - ndimage.gaussian_filter(grey, 1.5)
    fine -= fine.mean()
    return (fine / max(float(np.linalg.norm(fine)), 1e-6)).ravel()


def texture_twin_pairs(features: Sequence[ImageFeatures], config: CleaningConfig) -> list[tuple[int, int]]:
    """Index pairs whose thumbnails share their fine texture: the same tissue under a blended cartoon or a paste.

    A cartoon blended at 50-70% over tissue keeps the tissue's fine texture (the cartoon is flat), so the
    high-pass correlation with its source stays above 0.5, while distinct tissue images stay under 0.1.
    """
    fine = np.stack([_fine_texture(f.thumbnail) for f in features]).astype(np.float32)
    pairs = []
    for start in range(0, len(fine), 256):  # blocks keep the correlation matrix small
        block = fine[start : start + 256] @ fine.T
        for a, b in zip(*np.nonzero(block >= config.twin_texture_correlation)):
            i = start + int(a)
            if i < int(b):
                pairs.append((i, int(b)))
    return pairs


def _components(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes in the undirected graph whose edges are ``pairs``."""
    edges = np.array(list(pairs), dtype=np.intp).reshape(-1, 2)
    graph = coo_array((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _groups(labels: np.ndarray) -> list[list[int]]:
    """The components with more than one member, each in index order, ordered by their first member."""
    out: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        out.setdefault(label, []).append(i)
    return [g for g in out.values() if len(g) > 1]


@dataclass
class _Scores:
    colour: np.ndarray  # non-H&E colour fraction outside artifact regions
    outlier: np.ndarray  # robust z of the distance to the centroid
    non_tissue: np.ndarray  # bool
    artifact: np.ndarray  # bool
    tissue: np.ndarray  # tissue-likeness: ranks the members of a shared-mask group


def _score_images(features: Sequence[ImageFeatures], vectors: np.ndarray, cfg: CleaningConfig) -> _Scores:
    colour = np.array([1.0 - f.stain_fraction for f in features])
    art = np.array([f.artifact_fraction for f in features])
    # The reference set holds one image per exact-duplicate group, so that copies do not pull the centroid.
    first: dict[str, int] = {}
    for i, f in enumerate(features):
        first.setdefault(f.pixel_hash, i)
    ref = sorted(first.values())
    if len(ref) >= cfg.min_images_for_outliers:
        outlier = outlier_scores(vectors, vectors[ref])
    else:
        outlier = np.zeros(len(features))
    has_artifact = art >= cfg.artifact_min_area
    non_tissue = (
        (colour >= cfg.non_tissue_colour)
        | (outlier >= cfg.outlier_z)
        | ((outlier >= cfg.outlier_colour_z) & (colour >= cfg.outlier_colour))
        | (art > cfg.artifact_max_area)
        # Foreign-coloured regions on an image that is an outlier even without them: a drawing, not a blob.
        | (has_artifact & (outlier >= cfg.artifact_outlier_z))
    )
    # Texture strength and H&E colour: a cartoon is flat, a blend over tissue keeps only part of its texture.
    texture = np.array([float(f.vector[GRADIENT_FEATURE]) for f in features])
    return _Scores(colour, outlier, non_tissue, has_artifact & ~non_tissue, texture - 5.0 * colour)


def _non_tissue_score(scores: _Scores, i: int, cfg: CleaningConfig) -> float:
    return float(max(scores.colour[i] / cfg.non_tissue_colour, scores.outlier[i] / cfg.outlier_z))


def _changed(a: np.ndarray, b: np.ndarray, cfg: CleaningConfig) -> np.ndarray:
    """Where two 64x64 RGB thumbnails differ visibly (largest channel difference)."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1) > cfg.twin_pixel_change


def find_flags(
    samples: Sequence[Sample],
    features: Sequence[ImageFeatures],
    config: CleaningConfig | None = None,
    manual: Iterable[str] = (),
    vectors: np.ndarray | None = None,
) -> list[Flag]:
    """Decide which images to flag from their measurements.

    Args:
        samples: The samples in data order (of identical images the first is kept); parallel to ``features``.
        features: One ``ImageFeatures`` per sample.
        config: Thresholds (defaults when None).
        manual: Image ids to flag as ``manual``.
        vectors: Embeddings for the outlier score instead of the colour/texture statistics.

    Returns:
        One flag per flagged image (its strongest reason in ``REASONS`` order), sorted by image_id.
    """
    cfg = config or CleaningConfig()
    n = len(samples)
    if n == 0:
        return []
    vec = np.stack([f.vector for f in features]) if vectors is None else np.asarray(vectors, dtype=np.float64)
    scores = _score_images(features, vec, cfg)
    found: dict[int, list[Flag]] = {}

    def add(i: int, reason: str, score: float, related: int | None = None) -> None:
        rel = samples[related].image_id if related is not None else ""
        found.setdefault(i, []).append(Flag(samples[i].image_id, reason, round(float(score), 4), rel))

    def duplicate_reason(j: int, keep: int, plain: str) -> str:
        return "label_conflict" if samples[j].label != samples[keep].label else plain

    # Content, each image on its own.
    for i in range(n):
        if scores.non_tissue[i]:
            add(i, "non_tissue", _non_tissue_score(scores, i, cfg))
        elif scores.artifact[i]:
            add(i, "artifact", features[i].artifact_fraction)

    # Exact duplicates (decoded pixels): the first in data order is kept.
    keeper = list(range(n))  # the image each image is a pixel copy of (itself when none)
    by_pixels: dict[str, list[int]] = {}
    for i, f in enumerate(features):
        by_pixels.setdefault(f.pixel_hash, []).append(i)
    for members in by_pixels.values():
        for j in members[1:]:
            keeper[j] = members[0]
            add(j, duplicate_reason(j, members[0], "duplicate"), 1.0, members[0])

    # Near duplicates among distinct images, grouped transitively; the first tissue-like member is kept.
    reps = sorted(set(keeper))
    similarity = {(reps[a], reps[b]): sim for a, b, sim in near_duplicate_pairs([features[i] for i in reps], cfg)}
    near_group = _components(n, similarity.keys())
    copies: set[int] = set()
    for group in _groups(near_group):
        keep = _choose_keeper(group, scores, cfg, by_tissue=True)
        for j in group:
            if j != keep:
                copies.add(j)
                sim = similarity.get((min(j, keep), max(j, keep)), cfg.near_duplicate_similarity)
                add(j, duplicate_reason(j, keep, "near_duplicate"), sim, keep)

    # Twins: identical masks on different images, or images that share the fine texture of one tissue (a
    # cartoon blended over it, a pasted blob). Keep the real tissue, flag the others.
    by_mask: dict[str, list[int]] = {}
    for i in reps:
        if features[i].mask_hash is not None:
            by_mask.setdefault(features[i].mask_hash, []).append(i)
    twin_pairs = [(members[0], j) for members in by_mask.values() for j in members[1:]]
    twin_pairs += [(reps[a], reps[b]) for a, b in texture_twin_pairs([features[i] for i in reps], cfg)]
    for group in _groups(_components(n, twin_pairs)):
        for j, reason, score, keep in _twin_group(group, features, scores, near_group, copies, cfg):
            add(j, reason, score, keep)

    index = {s.image_id: k for k, s in enumerate(samples)}
    for image_id in sorted(set(manual) & set(index)):
        add(index[image_id], "manual", 1.0)

    flags = []
    for candidates in found.values():
        best = min(candidates, key=lambda f: REASONS.index(f.reason))
        if not best.related_to:  # a content flag names the image it copies, when there is one
            related = next((f.related_to for f in candidates if f.related_to), "")
            best = Flag(best.image_id, best.reason, best.score, related)
        flags.append(best)
    return sorted(flags, key=lambda f: f.image_id)


def _twin_group(
    members: list[int],
    features: Sequence[ImageFeatures],
    scores: _Scores,
    near_group: np.ndarray,
    copies: set[int],
    cfg: CleaningConfig,
) -> list[tuple[int, str, float, int]]:
    """Flags ``(index, reason, score, kept index)`` for one group of twins (shared mask or shared texture).

    The most tissue-like member is kept. Each other member is compared with it: one that differs only in a
    compact region is the real image with a pasted ``artifact``; one that differs everywhere is ``shared_mask``
    when it has the kept image's mask (a cartoon, alone or blended, or another image), else ``non_tissue``
    when it is less tissue-like (a cartoon blended over the tissue) or ``near_duplicate`` (an edited copy).
    Faithful copies of the kept image are left to the near-duplicate rule. A paste in H&E-like or colourless
    tones is not told apart from the original: then the first in data order is kept.
    """
    keep = _choose_keeper([i for i in members if i not in copies] or members, scores, cfg, by_tissue=True)
    out = []
    for j in members:
        lower = scores.tissue[j] < scores.tissue[keep] - cfg.keep_tolerance or scores.non_tissue[j]
        if j == keep or (near_group[j] == near_group[keep] and not lower):
            continue  # the kept image itself, re-encoded: a near duplicate
        changed = float(_changed(features[keep].thumbnail, features[j].thumbnail, cfg).mean())
        score = max(changed, min(_non_tissue_score(scores, j, cfg), 1.0))
        if changed < cfg.twin_global_change and not scores.non_tissue[j]:
            out.append((j, "artifact", features[j].artifact_fraction if scores.artifact[j] else changed, keep))
        elif features[j].mask_hash is not None and features[j].mask_hash == features[keep].mask_hash:
            out.append((j, "shared_mask", score, keep))
        elif lower:
            out.append((j, "non_tissue", score, keep))
        else:
            out.append((j, "near_duplicate", _correlation(features[keep].thumbnail, features[j].thumbnail), keep))
    return out


def _choose_keeper(members: Sequence[int], scores: _Scores, cfg: CleaningConfig, by_tissue: bool = False) -> int:
    """The member to keep: not non-tissue, most tissue-like (when asked), without artifact, first in data order.

    Members whose tissue score is within ``keep_tolerance`` of the best count as equally tissue-like.
    """
    keep = [i for i in members if not scores.non_tissue[i]] or list(members)
    if by_tissue:
        best = max(scores.tissue[i] for i in keep)
        keep = [i for i in keep if scores.tissue[i] >= best - cfg.keep_tolerance]
    keep = [i for i in keep if not scores.artifact[i]] or keep
    return min(keep)
