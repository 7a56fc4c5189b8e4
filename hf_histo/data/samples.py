"""Sample records of a data folder, and the collector of the problems found while reading them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .images import DataError
from .listings import count, few

OnError = Literal["raise", "skip"]
SPLIT_CHOICES = ("all", "train", "test")  # which samples an entry point takes (`Sample.split`, or every sample)
# Layouts whose samples have a meaningful split: the challenge's train_data/test_data, a table's or a manifest's
# split column (and their unlabelled rows, which are test images). The others are all "train" or all "test".
LAYOUTS_WITH_SPLIT = ("challenge", "table", "manifest")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image of the data set.

    Attributes:
        image_path: The RGB image file.
        mask_path: The binary region-of-interest mask, or None (tissue detection is used then).
        label: The class name, or None for unlabelled (test) images.
        image_id: The file name without extension, unique within the data set.
        group_id: The patient/group the image belongs to (``image_id`` when none is given); splits
            never put one group on both sides.
        split: ``"train"`` for labelled development data, ``"test"`` for held-out data.
    """

    image_path: Path
    mask_path: Path | None
    label: str | None
    image_id: str
    group_id: str
    split: str = "train"


@dataclass
class SampleSet:
    """The samples of one data folder and what was skipped while reading it.

    Attributes:
        samples: Every readable sample, sorted by ``image_id``.
        layout: The layout that was read.
        root: The data folder (or the manifest file, or the one image file).
        skipped: ``(file, reason)`` pairs for samples left out with ``on_error="skip"``.
        unmatched_masks: Mask files that belong to no image (misnamed: their images use tissue detection).
    """

    samples: list[Sample]
    layout: str
    root: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unmatched_masks: list[Path] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Sorted class names found among the samples."""
        return sorted({s.label for s in self.samples if s.label is not None})

    @property
    def train(self) -> list[Sample]:
        """Samples of the ``train`` split."""
        return [s for s in self.samples if s.split == "train"]

    @property
    def test(self) -> list[Sample]:
        """Samples of the ``test`` split."""
        return [s for s in self.samples if s.split == "test"]

    def select(self, split: str) -> list[Sample]:
        """The samples of one split: ``"all"``, ``"train"`` or ``"test"``.

        Raises:
            ValueError: ``split`` is none of these.
            DataError: ``"train"``/``"test"`` on a layout without splits (class folders, plain images), or a split
                that holds no image; the message names the data and the fix.
        """
        if split not in SPLIT_CHOICES:
            raise ValueError(f"split must be one of {list(SPLIT_CHOICES)}, got {split!r}")
        if split == "all":
            return list(self.samples)
        if self.layout not in LAYOUTS_WITH_SPLIT:
            raise DataError(
                f"{self.root}: the {self.layout} layout has no train/test split; drop --split (split=None) to take "
                "every image, or use a layout with one (challenge train_data/test_data, a 'split' column)."
            )
        chosen = self.train if split == "train" else self.test
        if not chosen:
            raise DataError(
                f"{self.root}: no {split!r} images in the {self.layout} layout ({len(self.train)} train, "
                f"{len(self.test)} test); pass --split all (split='all'), or the split that holds images."
            )
        return chosen

    def __len__(self) -> int:
        return len(self.samples)


class Collector:
    """Raise at once, or record and go on, depending on ``on_error``; gather what is only warned about."""

    def __init__(self, on_error: OnError):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[tuple[str, str]] = []
        self.mask_dirs: list[Path] = []  # folders that hold masks
        self.unmatched_masks: list[Path] = []  # mask files that no image claims
        self.without_mask: list[Path] = []  # images of those folders without a mask
        self.n_images = 0  # images of those folders

    def problem(self, file: str | Path, message: str) -> None:
        """Raise ``DataError(f"{file}: {message}")``, or record it as skipped."""
        if self.on_error == "raise":
            raise DataError(f"{file}: {message}")
        self.skipped.append((str(file), message))

    def masks(self, folder: Path, masks: list[Path], mask_of: dict[Path, Path | None]) -> None:
        """Record a folder's mask files and the mask (or None) each of its images got."""
        if masks:
            self.mask_dirs.append(folder)
            self.unmatched_masks += sorted(set(masks) - set(mask_of.values()))
            self.without_mask += [image for image, mask in mask_of.items() if mask is None]
            self.n_images += len(mask_of)

    def given_masks(
        self, folder: Path, masks: list[Path], given: dict[Path, Path | None], final: list[Sample]
    ) -> None:
        """Record a mask folder given explicitly: its unclaimed files, and the images left without any mask."""
        self.mask_dirs.insert(0, folder)
        self.unmatched_masks += sorted(set(masks) - set(given.values()))
        self.without_mask = [s.image_path for s in final if s.mask_path is None]
        self.n_images = len(final)

    def warn_masks(self) -> None:
        """One warning: misnamed masks and the images that fall back to tissue detection."""
        unmatched, without = self.unmatched_masks, self.without_mask
        parts = [f"{count(len(unmatched), 'mask file', 'matches')} no image ({few(unmatched)})"] if unmatched else []
        if without:
            parts.append(
                f"{len(without)} of {self.n_images} images have no mask and use tissue detection ({few(without)})"
            )
        if parts:
            fix = (
                "give each mask its image's name (table and --masks DIR: <image name>; challenge: mask_N beside img_N)"
            )
            logger.warning("%s: %s; %s.", self.mask_dirs[0], "; ".join(parts), fix)
