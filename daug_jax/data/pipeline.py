"""A small, exactly resumable batch pipeline over random-access data sources.

Batch ``step`` is a pure function of ``(seed, step)``: epoch ``e`` visits the records in the
order ``permutation(seed, e)``, so a job restarted at step ``k`` sees the very batches an
uninterrupted job would.  Each process reads only its rows of every global batch (``host_slice``).

A source is anything with ``len()`` and integer indexing that returns a dict of arrays/strings:
a TFDS ``as_data_source()`` split, or `ArraySource` over in-memory arrays.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from daug_jax import parallel


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


def _decode(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def stack_records(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """List of per-record dicts -> dict of stacked numpy arrays (bytes decoded to str)."""
    if not records:
        raise ValueError("cannot stack an empty list of records")
    return {k: np.stack([np.asarray(_decode(r[k])) for r in records]) for k in records[0]}


def read(source: Any, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Reads ``indices`` from ``source`` (batched when the source supports it) and stacks them."""
    indices = [int(i) for i in indices]
    if hasattr(source, "__getitems__"):
        records = source.__getitems__(indices)
    else:
        records = [source[i] for i in indices]
    return stack_records(records)


class Loader:
    """Deterministic, per-process batches: ``loader.batch(step)`` or ``iter(loader.from_step(k))``.

    Args:
      source: random-access source (see module docstring).
      batch_size: global batch size (all processes together).
      seed: shuffling seed; ``shuffle=False`` keeps source order.
      drop_remainder: whole batches only (always true for training; the last partial
        batch is kept for evaluation with ``drop_remainder=False`` and ``shuffle=False``).
    """

    def __init__(self, source: Any, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_remainder: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(source) == 0:
            raise ValueError("data source is empty")
        if drop_remainder and len(source) < batch_size:
            raise ValueError(
                f"batch size {batch_size} is larger than the {len(source)} records")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.shuffle, self.drop_remainder = shuffle, drop_remainder
        n = len(source)
        self.steps_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)

    def global_indices(self, step: int) -> np.ndarray:
        """Record indices of global batch ``step`` (all processes)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        n = len(self.source)
        order = (np.random.default_rng([self.seed, epoch]).permutation(n)
                 if self.shuffle else np.arange(n))
        return order[within * self.batch_size:(within + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``step``."""
        idx = self.global_indices(step)
        if len(idx) == self.batch_size:
            idx = idx[parallel.host_slice(self.batch_size)]
        return read(self.source, idx)

    def from_step(self, start: int, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        step = start
        while stop is None or step < stop:
            yield self.batch(step)
            step += 1

    def epoch(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass in order (evaluation)."""
        return self.from_step(0, self.steps_per_epoch)
