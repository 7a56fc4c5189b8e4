"""Data cleaning: duplicates, non-tissue images and colour artifacts found, reported, and nothing deleted."""

from .config import LEAK_REASON, REASONS, CleaningConfig, Flag
from .dataset import (
    EXCLUSIONS_NAME,
    MANIFEST_NAME,
    REPORT_COLUMNS,
    REPORT_NAME,
    SUMMARY_NAME,
    CleaningResult,
    clean_dataset,
)
from .decisions import (
    aligned_similarity,
    find_flags,
    near_duplicate_pairs,
    outlier_scores,
    robust_z,
    texture_twin_pairs,
    train_copy_flags,
)
from .features import FEATURE_NAMES, ImageFeatures, artifact_regions, image_features, stain_fraction, stream_features

__all__ = [
    "EXCLUSIONS_NAME",
    "FEATURE_NAMES",
    "LEAK_REASON",
    "MANIFEST_NAME",
    "REASONS",
    "REPORT_COLUMNS",
    "REPORT_NAME",
    "SUMMARY_NAME",
    "CleaningConfig",
    "CleaningResult",
    "Flag",
    "ImageFeatures",
    "aligned_similarity",
    "artifact_regions",
    "clean_dataset",
    "find_flags",
    "image_features",
    "near_duplicate_pairs",
    "outlier_scores",
    "robust_z",
    "stain_fraction",
    "stream_features",
    "texture_twin_pairs",
    "train_copy_flags",
]
