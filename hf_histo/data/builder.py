"""The cached patch dataset: a ``datasets`` builder turning a data folder into image patches split by group."""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets.exceptions import DatasetGenerationError

from .build_report import BuildReport
from .cutting import SplitCutter, decode_sample, prepare_sharing
from .fingerprint import dataset_fingerprint
from .images import DataError
from .patch_storage import check_patch_format, encode_patch, patch_features
from .patching import STRATEGIES, PatchingConfig
from .sources import Sample, SampleSet, read_samples
from .splits import split_samples
from .workers import process_pool

logger = logging.getLogger(__name__)

__all__ = [
    "BuildReport",
    "HistoPatches",
    "HistoPatchesConfig",
    "build_patch_dataset",
    "dataset_fingerprint",
    "encode_patch",
    "load_patch_dataset",
    "patch_features",
]

REPORT_NAME = "build_report.json"
_RECORDS_DIR = "hf_histo_records"


@dataclass
class HistoPatchesConfig(datasets.BuilderConfig):
    """Options of one patch dataset: where the data is, how it is patched and how it is split.

    Attributes:
        layout: Force a data layout (detected when None).
        manifest: A ``clean_manifest.csv`` to read instead of the folder's own files.
        exclude: A file of image ids to leave out.
        patching: How patches are cut (the same object is stored in the trained model's config).
        val_fraction: Share of groups for validation (ignored with ``n_folds``).
        seed: Split seed.
        n_folds: Cross-validation folds; ``fold`` is then the validation fold.
        fold: Validation fold index.
        on_error: ``"raise"`` at the first bad file, or ``"skip"`` it and list it in the report.
        resize_masks: Resize masks of another size than their image (nearest neighbour).
        max_image_pixels: Raise PIL's decompression-bomb limit for trusted large images.
        patch_format: How patches are stored: ``"raw"`` (uncompressed) or ``"png"`` (see ``PATCH_FORMATS``).
    """

    layout: str | None = None
    manifest: str | None = None
    exclude: str | None = None
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    val_fraction: float = 0.1
    seed: int = 0
    n_folds: int | None = None
    fold: int | None = None
    on_error: str = "raise"
    resize_masks: bool = False
    max_image_pixels: int | None = None
    patch_format: str = "raw"

    def options(self) -> dict[str, Any]:
        """Every option that changes the dataset's content, as plain JSON values (part of the cache key)."""
        skip = {"name", "version", "description", "data_files"}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        values["patching"] = self.patching.to_dict()
        return values


def config_name(patching: PatchingConfig) -> str:
    """A readable config name from the patching parameters, e.g. ``topk-p128-s64-k12`` or ``whole-macenko``."""
    p = patching
    if p.strategy == "grid":
        name = f"grid-p{p.patch_size}-s{p.stride or p.patch_size}-f{p.min_foreground}"
        name += f"-r{p.min_fraction:g}" if p.min_fraction is not None else ""
    elif p.strategy == "topk":
        name = f"topk-p{p.patch_size}-s{p.topk_stride}-k{p.top_k}"
    elif p.strategy == "components":
        name = f"components-a{p.min_area}-pad{p.pad}"
    else:
        name = "whole"
    return name if p.stain_norm == "none" else f"{name}-{p.stain_norm}"


class HistoPatches(datasets.ArrowBasedBuilder):
    """Patch dataset builder: one example per patch, with its image's label, ids, box and mask coverage.

    An importable ``ArrowBasedBuilder`` (``datasets`` >= 4 runs no loading scripts). Its cache key (``hash``)
    covers the package and patching versions, the data modules' source, every option and the bytes of every
    image, mask and label file: any change rebuilds, into a new folder (old builds stay until deleted).

    Splits are made per image before patching (``splits.split_samples``), so a group (patient) is never
    in two splits; with ``on_error="skip"`` images and masks are decoded first, so splits hold readable
    images only and never come out empty. Images without a label (challenge ``test_data/``) get label
    ``-1``, which ``datasets.ClassLabel`` reserves for "no label"; they form the ``test`` split, as do rows
    of a table's ``split`` column marked ``test`` (those keep their label).

    Use ``load_patch_dataset`` (or ``build_patch_dataset``); to drive it by hand::

        patching = PatchingConfig(strategy="topk", top_k=8)
        builder = HistoPatches(config_name="topk", data_dir="DATA", patching=patching, cache_dir="cache")
        builder.download_and_prepare()
        splits = builder.as_dataset()

    One ``BuilderConfig`` per strategy is predefined (its default parameters); any config field can be overridden
    as a keyword, ``patching`` as a whole ``PatchingConfig``. Without ``hash=`` it fingerprints the data itself.
    """

    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = HistoPatchesConfig
    BUILDER_CONFIGS = [
        HistoPatchesConfig(name=s, patching=PatchingConfig(strategy=s), version=datasets.Version("1.0.0"))
        for s in STRATEGIES
    ]
    DEFAULT_CONFIG_NAME = "grid"

    def __init__(self, *args: Any, sample_set: SampleSet | None = None, **kwargs: Any):
        patching = kwargs.get("patching")
        if patching is not None and not isinstance(patching, PatchingConfig):
            raise TypeError(
                f"patching must be a PatchingConfig, got {type(patching).__name__} "
                "(a dict from a model config converts with PatchingConfig.from_dict)"
            )
        self._sample_set = sample_set
        self._unreadable: list[dict[str, Any]] = []  # skip records of files that did not decode (on_error="skip")
        self._pool: Executor | None = None  # processes cutting patches (download_and_prepare's num_proc)
        self._cutter: SplitCutter | None = None  # cuts every split's samples in the order they are written
        kwargs.setdefault("dataset_name", "histo_patches")
        super().__init__(*args, **kwargs)

    @property
    def sample_set(self) -> SampleSet:
        """The samples of the data folder (read once)."""
        if self._sample_set is None:
            c = self.config
            if c.data_dir is None and c.manifest is None:
                raise ValueError("HistoPatches needs data_dir=... (a data folder or a clean_manifest.csv)")
            self._sample_set = read_samples(c.data_dir or c.manifest, c.layout, c.on_error, c.manifest, c.exclude)
        return self._sample_set

    def _build_cache_dir(self) -> str:
        # Called from DatasetBuilder.__init__ once the config exists: fingerprint the data there.
        if self.hash is None:
            self.hash = dataset_fingerprint(self.sample_set, self.config.options())
        return super()._build_cache_dir()

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=f"hf-histo patches ({config_name(self.config.patching)}) of {self.config.data_dir}",
            features=patch_features(self.sample_set.labels),
        )

    def _readable(self, samples: list[Sample]) -> list[Sample]:
        """The samples whose image and mask decode (``on_error="skip"``); the others become skip records."""
        good = []
        for sample in samples:
            try:
                decode_sample(sample, self.config.patching, self.config.resize_masks, self.config.max_image_pixels)
            except DataError as e:
                logger.warning("skipping %s", e)
                error = [str(sample.image_path), str(e)]
                self._unreadable.append({"image_id": sample.image_id, "split": sample.split, "error": error})
                continue
            good.append(sample)
        return good

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        c = self.config
        train, test = self.sample_set.train, self.sample_set.test
        self._unreadable = []
        if c.on_error == "skip":  # a bad file found after splitting could empty a split (a missing split on reload)
            train, test = self._readable(train), self._readable(test)
        train, validation = split_samples(train, c.val_fraction, c.seed, c.n_folds, c.fold)
        splits = [(datasets.Split.TRAIN, train), (datasets.Split.VALIDATION, validation), (datasets.Split.TEST, test)]
        splits = [(name, samples) for name, samples in splits if samples]
        if self._cutter is not None:
            self._cutter.close()
        self._cutter = SplitCutter([samples for _, samples in splits], _cut_options(c), self._pool)
        return [
            datasets.SplitGenerator(name=name, gen_kwargs={"samples": samples, "split": str(name)})
            for name, samples in splits
        ]

    def _generate_tables(self, samples: list[Sample], split: str) -> Iterator[tuple[str, pa.Table]]:
        schema = self.info.features.arrow_schema
        label_names = self.info.features["label"].names
        records = []
        cutter = self._cutter
        if cutter is None or not cutter.expects(samples):  # a split asked for out of order: cut it on its own
            cutter = SplitCutter([samples], _cut_options(self.config), self._pool)
        for sample, result in zip(samples, cutter.cut(samples)):
            if isinstance(result, DataError):
                if self.config.on_error != "skip":
                    raise result
                logger.warning("skipping %s", result)
                error = [str(sample.image_path), str(result)]
                records.append({"image_id": sample.image_id, "split": split, "error": error})
                continue
            label = label_names.index(sample.label) if sample.label in label_names else -1
            n = len(result.boxes)
            columns = {  # one Arrow table per image, built by column: no per-row Python work in the writer
                "image": result.image_column(schema.field("image").type),
                "label": [label] * n,
                "image_id": [sample.image_id] * n,
                "group_id": [sample.group_id] * n,
                "bbox": [[box.x, box.y, box.w, box.h] for box in result.boxes],
                "foreground": [box.fraction for box in result.boxes],
                "patch_index": list(range(n)),
            }
            if n:
                yield sample.image_id, pa.Table.from_pydict(columns, schema=schema)
            records.append(
                {
                    "image_id": sample.image_id,
                    "group_id": sample.group_id,
                    "split": split,
                    "patches": n,
                    "mask_source": result.source,
                    "fallback": result.fell_back,
                }
            )
        # One file per split (datasets' generator jobs could run in other processes); merged after preparation.
        out = Path(self._output_dir) / _RECORDS_DIR
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{split}-{uuid.uuid4().hex}.json").write_text(json.dumps(records))

    def report(self, records: list[dict[str, Any]]) -> BuildReport:
        """The build report of this builder from per-image records (see ``BuildReport.from_records``)."""
        return BuildReport.from_records(
            records,
            data_dir=str(self.config.data_dir or self.config.manifest),
            layout=self.sample_set.layout,
            config_name=config_name(self.config.patching),
            label_names=self.info.features["label"].names,
            skipped=self.sample_set.skipped,
        )

    def report_from_dataset(self, dataset: datasets.DatasetDict) -> BuildReport:
        """A partial report (no mask sources or fallbacks) counted from a built dataset."""
        records = [
            {"image_id": i, "split": name, "patches": n, "mask_source": "unknown", "fallback": False}
            for name, split in dataset.items()
            for i, n in Counter(split["image_id"]).items()
        ]
        return self.report(records)

    def _download_and_prepare(self, dl_manager: Any, verification_mode: Any, **kwargs: Any) -> None:
        # datasets builds into `<cache>.incomplete` and reuses that folder after a killed build: empty it first, so
        # that no record (or shard) of the killed build is merged into this one.
        output_dir = Path(self._output_dir)
        if output_dir.name.endswith(".incomplete"):
            for entry in output_dir.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        shutil.rmtree(output_dir / _RECORDS_DIR, ignore_errors=True)
        # num_proc cuts patches in one pool of processes feeding one writer (`_generate_tables`), not datasets'
        # pool per split: the same rows in the same order as one process, without a pool start-up per split.
        num_proc = kwargs.pop("num_proc", None)
        if num_proc and num_proc > 1:
            prepare_sharing()
        self._pool = process_pool(num_proc)
        try:
            super()._download_and_prepare(dl_manager, verification_mode, **kwargs)
        finally:
            if self._cutter is not None:
                self._cutter.close()  # what was cut and not written is freed before the pool goes
                self._cutter = None
            if self._pool is not None:  # every result is collected: the workers exit without this build waiting
                self._pool.shutdown(wait=False, cancel_futures=True)
        for name in [name for name, split in self.info.splits.items() if not split.num_examples]:
            del self.info.splits[name]  # every image of the split was skipped: declared, it could not be loaded
        records_dir = output_dir / _RECORDS_DIR
        records = list(self._unreadable)
        for path in sorted(records_dir.glob("*.json")):
            records += json.loads(path.read_text())
            path.unlink()
        if records_dir.is_dir():
            records_dir.rmdir()
        report = self.report(records)
        # Written inside the builder's temporary folder, which datasets renames into the cache.
        (output_dir / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=1))


def _cut_options(c: HistoPatchesConfig) -> dict[str, Any]:
    """`cut_sample`'s options from a builder config."""
    options = ("patching", "patch_format", "resize_masks", "max_image_pixels")
    return {name: getattr(c, name) for name in options}


def _unwrap_data_error(error: BaseException) -> DataError | None:
    seen = error
    while seen is not None:
        if isinstance(seen, DataError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def build_patch_dataset(
    data: str | Path,
    patching: PatchingConfig | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    n_folds: int | None = None,
    fold: int | None = None,
    cache_dir: str | Path | None = None,
    layout: str | None = None,
    manifest: str | Path | None = None,
    exclude: str | Path | None = None,
    on_error: str = "raise",
    resize_masks: bool = False,
    max_image_pixels: int | None = None,
    num_proc: int | None = None,
    patch_format: str = "raw",
) -> tuple[datasets.DatasetDict, BuildReport]:
    """Build (or load from cache) the patch dataset of a data folder, and say what was done.

    Args:
        data: A data folder in any layout, or a ``clean_manifest.csv``.
        patching: How patches are cut (``PatchingConfig()`` defaults when None).
        val_fraction: Share of groups in the validation split (0: none).
        seed: Split seed.
        n_folds: Cross-validation folds (``fold`` is validation).
        fold: Validation fold.
        cache_dir: Arrow cache root (``datasets``' default cache when None).
        layout: Force a layout.
        manifest: Read this clean manifest instead of the folder's files.
        exclude: File of image ids to leave out.
        on_error: ``"raise"`` or ``"skip"`` bad images (listed in ``report.skipped``).
        resize_masks: Resize masks whose size differs from their image (nearest neighbour).
        max_image_pixels: Raise PIL's decompression-bomb limit.
        num_proc: Processes for building (images are split between them; the patches and their order are
            those of one process).
        patch_format: ``"raw"`` (uncompressed, fast) or ``"png"`` (half the disk) patch storage.

    Returns:
        ``(DatasetDict, BuildReport)``; the dict has ``train``, ``validation`` (unless
        ``val_fraction=0``) and ``test`` (when the data has unlabelled / test images).

    Raises:
        DataError: A problem with the data, naming the file.
        TypeError: ``patching`` is not a ``PatchingConfig``.
    """
    start = time.perf_counter()
    check_patch_format(patch_format)
    patching = PatchingConfig() if patching is None else patching
    if not isinstance(patching, PatchingConfig):  # checked before reading any file
        raise TypeError(
            f"patching must be a PatchingConfig, got {type(patching).__name__}: "
            "load_patch_dataset(data, PatchingConfig(strategy=..., patch_size=...), ...)"
        )
    sample_set = read_samples(manifest or data, layout, on_error, manifest, exclude)
    # datasets copies the predefined config of the strategy and sets every option that is not None on it
    # (None options keep that config's defaults, which are None too).
    builder = HistoPatches(
        cache_dir=None if cache_dir is None else str(cache_dir),
        config_name=patching.strategy,
        sample_set=sample_set,
        name=config_name(patching),
        data_dir=str(Path(data).resolve()),
        layout=layout,
        manifest=None if manifest is None else str(Path(manifest).resolve()),
        exclude=None if exclude is None else str(Path(exclude).resolve()),
        patching=patching,
        val_fraction=val_fraction,
        seed=seed,
        n_folds=n_folds,
        fold=fold,
        on_error=on_error,
        resize_masks=resize_masks,
        max_image_pixels=max_image_pixels,
        patch_format=patch_format,
    )
    report_path = Path(builder.cache_dir) / REPORT_NAME
    cached = (Path(builder.cache_dir) / datasets.config.DATASET_INFO_FILENAME).is_file()
    try:
        builder.download_and_prepare(num_proc=num_proc)
    except DatasetGenerationError as e:
        cause = _unwrap_data_error(e)
        if cause is not None:
            raise DataError(str(cause)) from e
        raise
    dataset = builder.as_dataset()
    if report_path.is_file():
        report = BuildReport.from_dict(json.loads(report_path.read_text()))
    else:  # a cache prepared without the report (by hand with another version): count what is there
        report = builder.report_from_dataset(dataset)
    report.cache_dir, report.cached, report.seconds = builder.cache_dir, cached, time.perf_counter() - start
    logger.debug("%s", report.summary())  # the caller shows it once (`hf-histo build` prints it, recipes log it)
    return dataset, report


def load_patch_dataset(
    data: str | Path,
    patching: PatchingConfig | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    n_folds: int | None = None,
    fold: int | None = None,
    cache_dir: str | Path | None = None,
    layout: str | None = None,
    manifest: str | Path | None = None,
    exclude: str | Path | None = None,
    on_error: str = "raise",
    resize_masks: bool = False,
    max_image_pixels: int | None = None,
    num_proc: int | None = None,
    patch_format: str = "raw",
) -> datasets.DatasetDict:
    """Build (or load from cache) the patch dataset of a data folder; the arguments are ``build_patch_dataset``'s.

    Example::

        patching = PatchingConfig(strategy="topk", patch_size=224, top_k=12)
        splits = load_patch_dataset("DATA", patching, val_fraction=0.2)
        names = splits["train"].features["label"].names

    Returns:
        A ``DatasetDict`` with ``train``, ``validation`` and, when the data has them, ``test`` patches;
        features ``image``, ``label`` (ClassLabel, -1 = no label), ``image_id``, ``group_id``,
        ``bbox`` (x, y, w, h), ``foreground`` (mask fraction) and ``patch_index``.
    """
    return build_patch_dataset(**locals())[0]
