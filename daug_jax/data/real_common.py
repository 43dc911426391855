"""Shared pieces of the real chest X-ray builders (``mimic_cxr``, ``chexpert_cxr``, ``nih_cxr14``).

The datasets are manual downloads (TFDS's convention: files placed under a ``manual_dir``);
``download_and_prepare`` converts them to array_record shards readable without TensorFlow.  The
builders are ``tfds.core.ShardBasedBuilder``s, each shard written straight from its generator in
CSV order (``GeneratorBasedBuilder`` shuffles through TensorFlow once a split passes 1 GB).
Shards are planned from the CSVs alone and the images read while a shard is written, so memory
stays bounded by the shard size (see `shard`).

MIMIC-CXR and CheXpert produce the same features, so a training loop can switch dataset by name:

    image       uint8 [S, S, 1]   grayscale, resized to the config's S x S
    report      text              report section(s); "" where the dataset has no reports
    labels      int8  [14]        CheXpert labeller output in CHEXPERT_CLASSES order: 1, 0, -1
    missing     bool  [14]        True where the label was blank (not mentioned)
    id, study_id, subject_id, view   text

Records that cannot be used (unwanted view, absent or corrupt image, absent report, ...) are
skipped, never fatal: their per-reason counts are logged when the build ends and stored in the
dataset metadata under ``"dropped"`` (``builder.info.metadata["dropped"][split][reason]``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import gzip
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

# The 14 observations of the CheXpert labeller, in its own spelling and column order.
CHEXPERT_CLASSES = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)

# Why a record was skipped (keys of the "dropped" metadata).
VIEW_EXCLUDED = "view_excluded"          # not one of the config's views (e.g. a lateral)
METADATA_MISSING = "metadata_missing"    # image listed in the split file but not in the metadata
LABELS_MISSING = "labels_missing"        # study has no row in the label file
REPORT_MISSING = "report_missing"        # report file absent
REPORT_NO_SECTIONS = "report_no_sections"  # report has neither FINDINGS nor IMPRESSION
IMAGE_MISSING = "image_missing"          # image file absent
IMAGE_CORRUPT = "image_corrupt"          # image file unreadable (truncated, not an image)
DUPLICATE = "duplicate"                  # same image listed twice

_DECODE_CHUNK = 64  # images decoded concurrently before they are yielded in order

# TFDS's ShardWriter tees a shard's example iterator to count it, so a whole shard's examples are
# in memory while it is written: shards are bounded in records and in raw example bytes.
MAX_SHARD_RECORDS = 1024
MAX_SHARD_BYTES = 64 << 20
TEXT_BYTES = 4096  # allowance per record for the report, ids and Python object overhead


def features(image_size: int) -> tfds.features.FeaturesDict:
    """The feature spec shared by both real datasets (see module docstring)."""
    n = len(CHEXPERT_CLASSES)
    return tfds.features.FeaturesDict({
        # tfds.features.Image would need TensorFlow to encode; raw uint8 tensors do not.
        "image": tfds.features.Tensor(shape=(image_size, image_size, 1), dtype=np.uint8),
        "report": tfds.features.Text(),
        "labels": tfds.features.Tensor(shape=(n,), dtype=np.int8),
        "missing": tfds.features.Tensor(shape=(n,), dtype=np.bool_),
        "id": tfds.features.Text(),
        "study_id": tfds.features.Text(),
        "subject_id": tfds.features.Text(),
        "view": tfds.features.Text(),
    })


def predefined(builder_cls, config):
    """The predefined config equal to ``config``, else ``config`` itself (TFDS rejects a new
    config object carrying a predefined config's name, even when every field is equal)."""
    if not isinstance(config, tfds.core.BuilderConfig):
        return config  # a name, or None for the default
    same = builder_cls.builder_configs.get(config.name)
    if same is not None and dataclasses.astuple(same) == dataclasses.astuple(config):
        return same
    return config


def require_files(dl_manager, dataset: str, required: Sequence[str]) -> os.PathLike:
    """The manual directory of ``dl_manager``; raises FileNotFoundError naming the first of the
    ``required`` paths (relative to it, in order) that is absent."""
    try:
        root = dl_manager.manual_dir
    except AssertionError as err:  # TFDS: directory absent or empty; its message has the path
        raise FileNotFoundError(
            f"{dataset}: required file {required[0]!r} not found: the manual directory is "
            f"missing or empty ({str(err).splitlines()[0]}). See the builder's "
            f"MANUAL_DOWNLOAD_INSTRUCTIONS.") from None
    for rel in required:
        if not (root / rel).exists():
            raise FileNotFoundError(
                f"{dataset}: required file {rel!r} not found in the manual directory {root}. "
                f"See the builder's MANUAL_DOWNLOAD_INSTRUCTIONS.")
    return root


def first_present(dl_manager, names: Sequence[str]) -> str:
    """The first of ``names`` present in the manual directory, else the first (for the error)."""
    try:
        root = dl_manager.manual_dir
    except AssertionError:  # absent or empty: require_files reports it
        return names[0]
    return next((n for n in names if (root / n).exists()), names[0])


def iter_csv(path: os.PathLike, required_columns: Iterable[str]) -> Iterator[dict[str, str]]:
    """Rows of a (optionally gzipped) CSV as dicts of strings, one at a time; checks the header
    first."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        absent = [c for c in required_columns if c not in header]
        if absent:
            raise ValueError(f"{path}: missing column(s) {absent}; header is {header}")
        yield from reader


def encode_labels(row: Mapping[str, str], where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """CheXpert label columns -> (labels int8 [14] in {-1, 0, 1}, missing bool [14]).

    A blank cell ("not mentioned") is label 0 with ``missing`` True, so that losses can mask it
    apart from an explicit negative; ``where`` names the row in the ValueError of a bad cell.
    """
    labels = np.zeros(len(CHEXPERT_CLASSES), np.int8)
    missing = np.zeros(len(CHEXPERT_CLASSES), np.bool_)
    for i, name in enumerate(CHEXPERT_CLASSES):
        raw = (row.get(name) or "").strip()
        if not raw:
            missing[i] = True
            continue
        try:
            value = float(raw)
        except ValueError:
            value = None
        if value not in (-1.0, 0.0, 1.0):
            raise ValueError(f"{where}: label {name!r} has value {raw!r}; expected 1.0, 0.0, "
                             f"-1.0 or blank")
        labels[i] = int(value)
    return labels, missing


def load_image(path: os.PathLike, size: int) -> np.ndarray:
    """Decodes an image file to grayscale uint8 [size, size, 1]; raises OSError for absent or
    corrupt (also truncated) files.  A plain resize, not a centre crop: radiographs are close to
    square (MIMIC about 5:6) and a crop would cut the field of view."""
    with Image.open(path) as im:
        im.draft("L", (size, size))  # JPEG: decoded at the smallest 1/2^k scale >= size (fast)
        im = im.convert("L").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)[..., None]


def load_images(items: Iterable[Any], path_of: Callable[[Any], os.PathLike], size: int, *,
                workers: int | None = None) -> Iterator[tuple[Any, np.ndarray | None, str | None]]:
    """Yields ``(item, image, None)`` or ``(item, None, reason)`` in input order, decoded on a
    thread pool (Pillow releases the GIL) a chunk at a time, so that memory stays bounded."""
    def decode(item):
        path = path_of(item)
        try:
            return item, load_image(path, size), None
        except FileNotFoundError:
            return item, None, IMAGE_MISSING
        except (OSError, ValueError, SyntaxError) as err:  # truncated, not an image, bad header
            log.debug("unreadable image %s: %s", path, err)
            return item, None, IMAGE_CORRUPT

    workers = workers or min(8, os.cpu_count() or 1)
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        while chunk := [item for _, item in zip(range(_DECODE_CHUNK), items)]:
            yield from pool.map(decode, chunk)


def shard(items: Sequence, record_bytes: int) -> list[Sequence]:
    """Consecutive slices of ``items``, each within the shard bounds for examples of
    ``record_bytes`` raw bytes; no items give one empty shard, so that every split is written."""
    per_shard = max(1, min(MAX_SHARD_RECORDS, MAX_SHARD_BYTES // max(1, record_bytes)))
    return [items[i:i + per_shard] for i in range(0, len(items), per_shard)] or [items[:0]]


def real_record_bytes(image_size: int) -> int:
    """Raw size of one `features` example: pixels, labels, missing flags and text."""
    return image_size * image_size + 2 * len(CHEXPERT_CLASSES) + TEXT_BYTES


def new_drop_counts(info: tfds.core.DatasetInfo,
                    splits: Iterable[str]) -> dict[str, collections.Counter]:
    """Empty per-split drop counters for a new build, the stored counts reset (a rebuild does not
    add to the previous build's); the shards run in this process (no Beam runner), so the
    counters see every drop, and `DropCountingBuilder` stores them once every shard is written."""
    info.metadata["dropped"] = {}
    return {split: collections.Counter() for split in splits}


class ArrayRecordBuilder(tfds.core.ShardBasedBuilder):
    """A builder writing array_record, its config also given by value (see `predefined`), that
    leaves out the splits that kept no record (e.g. ``num_validation=0``), shard files included:
    ``as_data_source()`` opens every split, and array_record cannot open one without records.
    Abstract (no ``_info``): TFDS registers only its subclasses."""

    def __init__(self, *, config=None, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=predefined(type(self), config), **kwargs)

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config)
        info = self.info
        empty = [s for s in info.splits.values() if s.num_examples == 0]
        for split_info in empty:
            log.warning("%s: split %s kept no record; it is left out", info.full_name,
                        split_info.name)
            for path in split_info.filepaths:
                path.unlink(missing_ok=True)
        if empty:
            info.set_splits(tfds.core.SplitDict(
                [s for s in info.splits.values() if s.num_examples > 0]))


class DropCountingBuilder(ArrayRecordBuilder):
    """The real builders' common end of a build: every split's drop counts (``self._drops``,
    from `new_drop_counts`) are stored in the metadata written next to the data and logged."""

    _drops: dict

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config)  # empty splits dropped
        info, name = self.info, f"{self.name}/{self.builder_config.name}"
        for split, counter in self._drops.items():
            counts = {k: int(v) for k, v in sorted(counter.items())}
            info.metadata["dropped"][split] = counts
            kept = info.splits[split].num_examples if split in info.splits else 0
            detail = ", ".join(f"{k}={v}" for k, v in counts.items()) or "none"
            (log.warning if counts else log.info)(
                "%s %s: kept %d records; dropped %d (%s)", name, split, kept, sum(counts.values()),
                detail)
