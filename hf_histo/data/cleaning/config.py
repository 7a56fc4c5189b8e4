"""Thresholds of the cleaning detectors and the report row type."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Test images are only compared with the training images: one that copies a training image is reported with this
# reason and kept (a submission needs a prediction for every test image), never excluded.
LEAK_REASON = "test_duplicate_of_train"
# A flagged image gets one report row: its strongest reason, first in this order.
REASONS = (
    "manual",
    "shared_mask",
    "non_tissue",
    "artifact",
    "label_conflict",
    "duplicate",
    "near_duplicate",
    LEAK_REASON,
)


@dataclass
class CleaningConfig:
    """Thresholds of the detectors. The defaults work on H&E data without tuning.

    Attributes:
        analysis_size: Colour, texture and artifact analysis runs on a copy at most this many pixels on its
            longer side (speed; an artifact of 2% of the image still covers thousands of pixels).
        near_duplicate_distance: Two images whose perceptual hash (``imagehash.phash``) and difference hash
            (``imagehash.dhash``) differ in at most this many of their 128 bits together are near duplicates
            (JPEG round trips, 15% resizes, 10% brightness or contrast changes stay under 8).
        near_duplicate_candidate: Pairs up to this distance are compared pixel-wise (a 4% crop can reach 30;
            distinct tissue images are rarely under 40) ...
        near_duplicate_similarity: ... and are near duplicates when the best normalised correlation of their
            64x64 grey thumbnails, over 3% steps of crop and scale, reaches this (distinct tissue: under 0.5).
        stain_hues: Hue ranges (degrees) of haematoxylin and eosin: purple/blue to pink/red.
        chromatic_saturation: Pixels less saturated than this (0-1) are grey/white, not coloured.
        artifact_hues: Hue ranges (degrees) foreign to H&E: yellow, green, cyan, sky blue.
        artifact_saturation: Minimum saturation (0-1) of an artifact pixel in ``artifact_hues``.
        artifact_blue_hues: Blue next to haematoxylin's hues: counts only when saturated and bright.
        artifact_blue_saturation: Minimum saturation of a vivid-blue artifact pixel.
        artifact_blue_value: Minimum brightness (0-1) of a vivid-blue artifact pixel (nuclei are dark).
        artifact_min_region: Smallest region counted, as a fraction of the image.
        artifact_min_solidity: Regions must be compact: area / convex-hull area at least this (two touching
            blobs make one region of solidity about 0.6).
        artifact_grow: Compact cores grow into adjacent non-H&E coloured pixels up to this distance (fraction
            of the longer side): the parts of a semi-transparent blob that turned brown over purple tissue.
        artifact_min_area: An image is flagged ``artifact`` when its regions cover at least this fraction.
        artifact_max_area: Above this fraction the image is mostly foreign colour: non-tissue, not an artifact.
        non_tissue_colour: Flag ``non_tissue`` when at least this fraction of the coloured pixels (outside
            artifact regions) lies outside the H&E hues, whatever the outlier score.
        outlier_z: Flag ``non_tissue`` when the robust z-score (median/MAD) of the distance to the data set's
            centroid in feature space reaches this (clean images of one source stay under 4.5; a mix of
            organs and scanners reached 8; cartoons score 20 to 100).
        outlier_colour_z: A lower z-score that suffices when the colour test also sees non-H&E colour ...
        outlier_colour: ... at least this fraction (clean H&E: under 0.005).
        artifact_outlier_z: An image with artifact regions whose remaining pixels reach this outlier z-score is
            ``non_tissue`` (a drawing with foreign-coloured parts), not ``artifact``.
        min_images_for_outliers: Below this many distinct images the outlier score is not computed.
        keep_tolerance: In a shared-mask group, members whose texture strength (log median gradient, minus 5x
            the non-H&E colour fraction) is within this of the best are equally tissue-like; among them one
            without artifact, then the first (``keep_first``), is kept. 0.3 is a 35% texture difference:
            blending a cartoon at 50% over tissue halves it.
        keep_first: Of equally good duplicates the first is kept: ``"oldest"`` sorts by file modification
            time (copies are usually newer than what they copy), then image_id; ``"image_id"`` by image_id only.
        twin_texture_correlation: Two images are twins (one tissue under a blended cartoon or a paste) when the
            correlation of their thumbnails' fine texture reaches this (blends: 0.5 and more; distinct tissue
            images: under 0.1).
        twin_pixel_change: Two twins differ at a pixel of their 64x64 thumbnails when
            a channel differs by more than this (0-255) ...
        twin_global_change: ... and differ globally (a cartoon twin, alone or blended) when at least this
            fraction of the thumbnail differs; below it the difference is a local paste (an artifact).
        num_workers: Processes that compute features; None uses the available CPUs for 64 images or more,
            0 or 1 runs in-process.
        thumbnail_size: Thumbnail side (pixels) in the contact sheets.
        contact_sheet_max: At most this many images per contact sheet (highest score first).
    """

    analysis_size: int = 384
    near_duplicate_distance: int = 16
    near_duplicate_candidate: int = 40
    near_duplicate_similarity: float = 0.75
    stain_hues: tuple[tuple[float, float], ...] = ((220.0, 360.0), (0.0, 30.0))
    chromatic_saturation: float = 0.12
    artifact_hues: tuple[tuple[float, float], ...] = ((35.0, 222.0),)
    artifact_saturation: float = 0.3
    artifact_blue_hues: tuple[tuple[float, float], ...] = ((222.0, 245.0),)
    artifact_blue_saturation: float = 0.4
    artifact_blue_value: float = 0.6
    artifact_min_region: float = 0.001
    artifact_min_solidity: float = 0.4
    artifact_grow: float = 0.04
    artifact_min_area: float = 0.005
    artifact_max_area: float = 0.5
    non_tissue_colour: float = 0.5
    outlier_z: float = 10.0
    outlier_colour_z: float = 3.0
    outlier_colour: float = 0.02
    artifact_outlier_z: float = 4.0
    min_images_for_outliers: int = 8
    keep_tolerance: float = 0.3
    keep_first: str = "oldest"
    twin_texture_correlation: float = 0.3
    twin_pixel_change: int = 24
    twin_global_change: float = 0.4
    num_workers: int | None = None
    thumbnail_size: int = 128
    contact_sheet_max: int = 120

    def __post_init__(self):
        if self.keep_first not in ("oldest", "image_id"):
            raise ValueError(f"keep_first must be 'oldest' or 'image_id', got {self.keep_first!r}")

    def to_dict(self) -> dict:
        """The thresholds as a plain dict."""
        return asdict(self)


@dataclass(frozen=True)
class Flag:
    """One row of the cleaning report.

    Attributes:
        image_id: The flagged image.
        reason: One of ``REASONS``.
        score: Evidence strength (see ``clean_dataset`` for its meaning per reason).
        related_to: The kept image it duplicates or shares a mask with ("" when none).
    """

    image_id: str
    reason: str
    score: float
    related_to: str = ""
