"""Shared pieces of the real chest X-ray builders (``mimic_cxr``, ``chexpert_cxr``).

Both datasets are credentialed downloads, so their builders follow TFDS's manual-download
convention: the files are placed under a ``manual_dir`` and ``download_and_prepare`` converts them
to array_record shards readable without TensorFlow.  Both produce the same features, so a
training loop can switch dataset by name:

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
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        absent = [c for c in required_columns if c not in header]
        if absent:
            raise ValueError(f"{path}: missing column(s) {absent}; header is {header}")
        return list(reader)


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


def start_drop_counts(info: tfds.core.DatasetInfo) -> None:
    """Resets the drop counts so that a rebuild does not add to the previous build's."""
    info.metadata["dropped"] = {}


def store_drop_counts(info: tfds.core.DatasetInfo, split: str, counts: collections.Counter) -> None:
    """Saves a split's drop counts into the metadata written next to the data."""
    info.metadata["dropped"][split] = {k: int(v) for k, v in sorted(counts.items())}


def log_drop_counts(name: str, info: tfds.core.DatasetInfo) -> None:
    """Logs how many records each split kept and dropped, by reason."""
    for split, counts in info.metadata.get("dropped", {}).items():
        kept = info.splits[split].num_examples if split in info.splits else 0
        detail = ", ".join(f"{k}={v}" for k, v in counts.items()) or "none"
        (log.warning if counts else log.info)(
            "%s %s: kept %d records; dropped %d (%s)", name, split, kept, sum(counts.values()),
            detail)
