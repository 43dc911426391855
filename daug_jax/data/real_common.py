"""Shared pieces of the real chest X-ray builders (``mimic_cxr``, ``chexpert_cxr``).

Both datasets are credentialed downloads, so their builders follow TFDS's manual-download
convention: the files are placed under a ``manual_dir`` and ``download_and_prepare`` converts them
to array_record shards readable without TensorFlow.  They are ``tfds.core.ShardBasedBuilder``s:
each shard is written straight from its generator, in CSV order.  (``GeneratorBasedBuilder``
shuffles every record first, and its shuffler spills to disk through TensorFlow once a split
passes 1 GB.)  Shards are planned from the CSVs alone; the file reads happen while a shard is
written, so memory stays bounded by the shard size (see `shard`).

Both produce the same features, so a training loop can switch dataset by name:

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
    """The predefined config equal to ``config``, else ``config`` itself.

    TFDS rejects a new config object that carries a predefined config's name, even when every
    field is equal; this lets callers build configs from values (e.g. from an experiment).
    """
    if not isinstance(config, tfds.core.BuilderConfig):
        return config  # a name, or None for the default
    same = builder_cls.builder_configs.get(config.name)
    if same is not None and dataclasses.astuple(same) == dataclasses.astuple(config):
        return same
    return config


def require_files(dl_manager, dataset: str, required: Sequence[str]) -> os.PathLike:
    """Returns the manual directory, or raises naming the first required file that is absent.

    Args:
      dl_manager: the builder's ``tfds.download.DownloadManager``.
      dataset: dataset name for the message.
      required: paths relative to the manual directory, in the order they are reported.
    """
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


def read_csv(path: os.PathLike, required_columns: Iterable[str]) -> list[dict[str, str]]:
    """Rows of a (optionally gzipped) CSV as dicts of strings; checks the header first."""
    return list(iter_csv(path, required_columns))


def iter_csv(path: os.PathLike, required_columns: Iterable[str]) -> Iterator[dict[str, str]]:
    """`read_csv` one row at a time (MIMIC's metadata CSV is 377k rows of 12 columns)."""
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

    A blank cell is "not mentioned": label 0 with ``missing`` True, so that losses can mask it
    separately from an explicit negative.  ``where`` names the row in error messages.
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
    """Decodes an image file to grayscale uint8 [size, size, 1] (aspect ratio not kept).

    Chest radiographs are close to square (MIMIC about 5:6), so a plain resize keeps the whole
    field of view, which a centre crop would cut.  Raises OSError for absent or corrupt files
    (truncated JPEGs raise: truncated images are not silently padded).
    """
    with Image.open(path) as im:
        # JPEG only: let libjpeg decode at the smallest 1/2^k scale still >= size (much faster
        # for 3000-pixel radiographs); a no-op for other formats.
        im.draft("L", (size, size))
        im = im.convert("L").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)[..., None]


def load_images(items: Iterable[Any], path_of: Callable[[Any], os.PathLike], size: int, *,
                workers: int | None = None) -> Iterator[tuple[Any, np.ndarray | None, str | None]]:
    """Yields ``(item, image, None)`` or ``(item, None, reason)`` in input order.

    Decoding runs on a thread pool (Pillow releases the GIL while decoding), a chunk at a time so
    memory stays bounded on a 377k-image dataset.
    """
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
    """Consecutive slices of ``items`` (in order), each within the shard bounds.

    ``record_bytes`` is the raw size of one example (`real_record_bytes` for the real datasets).
    No items give one empty shard, so that every split is written (see `drop_empty_splits`).
    """
    per_shard = max(1, min(MAX_SHARD_RECORDS, MAX_SHARD_BYTES // max(1, record_bytes)))
    return [items[i:i + per_shard] for i in range(0, len(items), per_shard)] or [items[:0]]


def drop_empty_splits(info: tfds.core.DatasetInfo) -> None:
    """Removes the splits that kept no record, and their empty shard files.

    TFDS cannot open a split without records (array_record needs at least one non-empty file),
    and ``as_data_source()`` opens every split: an empty one (e.g. ``num_validation=0``, or all
    of a split's images unreadable) is left out of the dataset instead.
    """
    empty = [s for s in info.splits.values() if s.num_examples == 0]
    for split_info in empty:
        log.warning("%s: split %s kept no record; it is left out", info.full_name, split_info.name)
        for path in split_info.filepaths:
            path.unlink(missing_ok=True)
    if empty:
        info.set_splits(tfds.core.SplitDict(
            [s for s in info.splits.values() if s.num_examples > 0]))


def real_record_bytes(image_size: int) -> int:
    """Raw size of one `features` example: pixels, labels, missing flags and text."""
    return image_size * image_size + 2 * len(CHEXPERT_CLASSES) + TEXT_BYTES


def start_drop_counts(info: tfds.core.DatasetInfo) -> None:
    """Resets the drop counts so that a rebuild does not add to the previous build's."""
    info.metadata["dropped"] = {}


def store_drop_counts(info: tfds.core.DatasetInfo, split: str, counts: collections.Counter) -> None:
    """Saves a split's drop counts into the metadata written next to the data."""
    info.metadata["dropped"][split] = {k: int(v) for k, v in sorted(counts.items())}


def new_drop_counts(info: tfds.core.DatasetInfo,
                    splits: Iterable[str]) -> dict[str, collections.Counter]:
    """Resets the stored counts and returns empty per-split counters for a new build.

    Planning and the shard generators add to these counters; `finish_drop_counts` stores them
    once every shard is written, before TFDS writes the metadata next to the data.  The shards
    run in this process (the builders take no Beam runner), so the counters see every drop.
    """
    start_drop_counts(info)
    return {split: collections.Counter() for split in splits}


def finish_drop_counts(name: str, info: tfds.core.DatasetInfo,
                       drops: Mapping[str, collections.Counter]) -> None:
    """Stores every split's drop counts in the metadata and logs them."""
    for split, counts in drops.items():
        store_drop_counts(info, split, counts)
    log_drop_counts(name, info)


class DropCountingBuilder(tfds.core.ShardBasedBuilder):
    """The real builders' common end of a build: splits left empty by the drops are removed,
    and every split's drop counts (``self._drops``, from `new_drop_counts`) are stored in the
    metadata and logged.  Abstract (no ``_info``): TFDS registers only its subclasses."""

    _drops: dict

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config)
        drop_empty_splits(self.info)
        finish_drop_counts(f"{self.name}/{self.builder_config.name}", self.info, self._drops)


def log_drop_counts(name: str, info: tfds.core.DatasetInfo) -> None:
    """Logs how many records each split kept and dropped, by reason."""
    for split, counts in info.metadata.get("dropped", {}).items():
        kept = info.splits[split].num_examples if split in info.splits else 0
        detail = ", ".join(f"{k}={v}" for k, v in counts.items()) or "none"
        (log.warning if counts else log.info)(
            "%s %s: kept %d records; dropped %d (%s)", name, split, kept, sum(counts.values()),
            detail)
