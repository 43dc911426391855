"""The streaming input pipeline: random-access sources -> per-process batches, on ``grain``.

A source is anything with ``len()`` and integer indexing that returns a dict of arrays/strings:
a TFDS ``as_data_source()`` split (array_record, read lazily from disk), or `ArraySource` over
in-memory arrays.  Nothing here holds a split: only the records of the batches in flight.

Training batches (`train_batches`):

    grain.MapDataset.range(N).seed(seed).shuffle().repeat().batch(B)   # global index batches
      -> this process's rows of each batch (``parallel.host_slice``)
      -> `BatchReader`: read those records, decode, labels + loss mask, heatmap channels
      -> background threads prefetching the next batches

Batch ``step`` is a pure function of ``(seed, step)`` (grain's shuffle is a seeded random
permutation per epoch, indexable), so a run restarted at step ``k`` is fed the very batches an
uninterrupted run would: exact resume needs no iterator state.  The union of the processes' rows
of a global batch is the same set of records whatever the process count.

`ordered_batches` reads a split once in order (evaluation, heatmap jobs), in fixed-size chunks.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from daug_jax import parallel
from daug_jax.losses import labels_and_mask


class ArraySource:
    """Random access over a dict of equal-length arrays: ``source[i] -> {key: array[i]}``."""

    def __init__(self, arrays: Mapping[str, Any]):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"ArraySource fields have different lengths: {lengths}")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self._len = next(iter(lengths.values()), 0)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        return {k: v[index] for k, v in self.arrays.items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self[i] for i in indices]


def read(source: Any, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The records at ``indices`` of ``source`` (read batched when the source supports it) as a
    dict of stacked numpy arrays (bytes decoded to str)."""
    indices = [int(i) for i in indices]
    batched = hasattr(source, "__getitems__")
    records = source.__getitems__(indices) if batched else [source[i] for i in indices]
    if not records:
        raise ValueError("cannot stack an empty list of records")
    return {k: np.stack([np.asarray(r[k].decode("utf-8") if isinstance(r[k], bytes) else r[k])
                         for r in records]) for k in records[0]}


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """Stored pixels -> float32 in [0, 1]: uint8 / 255, floats (already in [0, 1]) as they are."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    return image.astype(np.float32)


class BatchReader:
    """``reader(indices) -> batch``: the records at ``indices`` decoded for a train step.

    batch: "image" [b, H, W, 1] float32 in [0, 1]; "id" str [b]; with ``label_columns``,
    "labels" / "label_mask" [b, C'] float32 from `labels_and_mask` (columns ``label_columns`` of
    the records' labels, blank ones masked via their "missing" field, uncertain per
    ``label_policy``); "report" str [b] when ``reports``; "heatmaps" [b, H, W, K] float32 in [0, 1]
    from ``heatmaps`` (a source aligned with ``source`` by index, e.g. `HeatmapSource`), each
    record's heatmap checked to carry the record's id.
    """

    def __init__(self, source: Any, *, label_columns: Sequence[int] | None = None,
                 label_policy: str = "ignore", reports: bool = False, heatmaps: Any = None):
        self.source, self.heatmaps, self.reports = source, heatmaps, reports
        self.label_columns = None if label_columns is None else [int(c) for c in label_columns]
        self.label_policy = label_policy
        if heatmaps is not None and len(heatmaps) != len(source):
            raise ValueError(f"the heatmap dataset has {len(heatmaps)} records, the image split "
                             f"{len(source)}: they were not made from this split")

    def __call__(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        records = read(self.source, indices)
        ids = (records["id"].astype(str) if "id" in records
               else np.array([f"#{i}" for i in indices]))
        batch = {"image": _checked_image(records["image"], indices, ids), "id": ids}
        if self.label_columns is not None:
            raw = records["labels"][:, self.label_columns].astype(np.float32)
            bad = np.argwhere(~np.isin(raw, (-1.0, 0.0, 1.0)))
            if bad.size:
                j, c = (int(v) for v in bad[0])
                raise ValueError(f"record {int(indices[j])} (id {str(ids[j])!r}) has label "
                                 f"{raw[j, c]:g} in column {self.label_columns[c]}; expected "
                                 f"1, 0 or -1 (uncertain)")
            missing = records.get("missing")
            missing = None if missing is None else missing[:, self.label_columns]
            batch["labels"], batch["label_mask"] = labels_and_mask(raw, self.label_policy,
                                                                   missing=missing)
        if self.reports:
            batch["report"] = records["report"].astype(str)
        if self.heatmaps is not None:
            maps = read(self.heatmaps, indices)
            wrong = np.flatnonzero(maps["id"].astype(str) != batch["id"])
            if wrong.size:
                j = int(wrong[0])
                raise ValueError(f"record {int(indices[j])} of the image split has id "
                                 f"{str(batch['id'][j])!r} but its heatmap record has id "
                                 f"{str(maps['id'][j])!r}: the heatmaps were made from another "
                                 f"split or dataset")
            batch["heatmaps"] = to_unit_float(maps["heatmaps"])
        return batch


def _checked_image(image: np.ndarray, indices: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Pixels as float32 in [0, 1]; a float record outside [0, 1] is named (models map [0, 1] to
    [-1, 1], and an image already in [-1, 1] would otherwise train silently on the wrong range)."""
    image = to_unit_float(image)
    flat = image.reshape(len(image), -1)
    bad = np.flatnonzero((flat.min(axis=1) < -1e-3) | (flat.max(axis=1) > 1 + 1e-3))
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"record {int(indices[j])} (id {str(ids[j])!r}) has pixels in "
                         f"[{flat[j].min():.3g}, {flat[j].max():.3g}]; images must be uint8 or "
                         f"float in [0, 1]")
    return image


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=max(1, int(num_threads)),
                             prefetch_buffer_size=max(1, int(prefetch)))


def train_batches(reader: BatchReader, global_batch: int, *, seed: int, start_step: int = 0,
                  num_threads: int = 2, prefetch: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of global batches ``start_step, start_step + 1, ...`` (endless), read
    and decoded ahead by ``num_threads`` background threads.  Records are shuffled anew every
    epoch (a seeded permutation); batches run across epoch boundaries, so every batch is full."""
    n = len(reader.source)
    if global_batch <= 0:
        raise ValueError(f"batch size must be positive, got {global_batch}")
    if n < global_batch:
        raise ValueError(f"batch size {global_batch} is larger than the {n} records of the split")
    rows = parallel.host_slice(global_batch)
    ds = (grain.MapDataset.range(n).seed(int(seed)).shuffle().repeat().batch(global_batch)
          .map(lambda index: index[rows]))
    ds = ds[int(start_step):].map(reader)
    return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))


def ordered_batches(reader: BatchReader, batch_size: int, *, start: int = 0,
                    stop: int | None = None, num_threads: int = 2,
                    prefetch: int = 2) -> Iterator[tuple[np.ndarray, dict]]:
    """``(indices, batch)`` for records ``start .. stop - 1`` in order, ``batch_size`` at a time
    (the last chunk may be shorter), read ahead in the background; for evaluation and jobs."""
    stop = len(reader.source) if stop is None else int(stop)
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    chunks = [np.arange(s, min(s + batch_size, stop)) for s in range(int(start), stop, batch_size)]
    if not chunks:
        return iter(())
    ds = grain.MapDataset.source(chunks).map(lambda index: (index, reader(index)))
    return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """``x [b, ...]`` -> ``[size, ...]`` by repeating its last row: one compiled batch shape for a
    split's last, shorter chunk (rows are independent; callers drop the padding)."""
    x = np.asarray(x)
    if len(x) > size:
        raise ValueError(f"cannot pad {len(x)} rows to {size}")
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x
