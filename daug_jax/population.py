"""Several tower runs of one shape trained together: one vmapped program for a whole ablation.

    members = [{"name": "baseline/seed0", "seed": 0, "fill": "repeat", "clip_weight": 1.0}, ...]
    state, histories = train.train_population(config, members, source, workdir, class_names=...)

The runs of an ablation differ only in what the image tower's extra channels hold
(``model.vision.fill``), the weight of the hybrid loss (``train.clip_weight``) and the seed
(``train.seed``: initial parameters, dropout and batch order).  Their parameters have the same
shapes, so their states stack along a leading "member" axis and one compiled step serves them
all: the one run's `train.make_train_step`, ``jax.vmap``ped over blocks of ``train.member_chunk``
members (`Chunks`; one block of all M gives M-times-wider batched products, blocks of 1 are
fastest on CPU, docs/measurements.md).  Each member reads the batches its seed would read alone,
so member m of a population ends where a run of its config alone ends (up to float
reassociation in the batched products; `tests/test_population.py`).
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from daug_jax.tower_inputs import tower_batch

# What may differ between members, and where it lives in the towers config.
FIELDS = {"seed": ("train", "seed"), "fill": ("model", "vision", "fill"),
          "clip_weight": ("train", "clip_weight")}


def resolve(config: ml_collections.ConfigDict, members: Sequence[dict]) -> list[dict]:
    """Each member as {"name", "seed", "fill", "clip_weight"}, the config's values filled in."""
    members = list(members)
    if not members:
        raise ValueError("a population needs at least one member")
    defaults = {field: functools.reduce(operator.getitem, path, config)
                for field, path in FIELDS.items()}
    out = []
    for i, member in enumerate(members):
        resolved = {"name": f"member{i}", **defaults, **member}
        unknown = sorted(set(member) - set(FIELDS) - {"name"})
        if unknown:
            raise ValueError(f"member {i} ({resolved['name']!r}) sets {unknown}; members "
                             f"may differ only in {sorted(FIELDS)}")
        out.append({**resolved, "name": str(resolved["name"]), "seed": int(resolved["seed"]),
                    "clip_weight": float(resolved["clip_weight"])})
    names = [m["name"] for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"member names must be unique, got {names}")
    return out


def member_config(config: ml_collections.ConfigDict, member: dict) -> ml_collections.ConfigDict:
    """``config`` with one member's fields set (a copy)."""
    out = ml_collections.ConfigDict(config.to_dict())
    for field, path in FIELDS.items():
        functools.reduce(operator.getitem, path[:-1], out)[path[-1]] = member[field]
    return out


def stack(trees: Sequence[Any]) -> Any:
    """Leaves of equal-structure trees stacked on a new leading axis: M trees -> one [M, ...]."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def take(tree: Any, index: int) -> Any:
    """Member ``index`` of a stacked tree (the leading axis removed)."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


class Chunks:
    """The members in blocks of ``chunk`` (``train.member_chunk``; None or 0: all of them in one
    block), each block one call of the vmapped step."""

    def __init__(self, num_members: int, chunk: int | None = None):
        size = num_members if not chunk or chunk >= num_members else int(chunk)
        self.slices = [slice(i, min(i + size, num_members)) for i in range(0, num_members, size)]
        # One compiled program each way: slicing or concatenating leaf by leaf eagerly compiles
        # one op per (leaf shape, block), ~70 compiles for a 24-member towers state on CPU.
        # split: a stacked [M, ...] tree -> one [m, ...] tree per block.
        self.split = jax.jit(lambda tree: [jax.tree.map(lambda leaf: leaf[sl], tree)
                                           for sl in self.slices])
        self._join = jax.jit(lambda parts: jax.tree.map(lambda *leaves: jnp.concatenate(leaves),
                                                        *parts))

    def join(self, parts: Sequence[Any]) -> Any:
        """The inverse of `split`: blocks concatenated back along the member axis."""
        return parts[0] if len(parts) == 1 else self._join(list(parts))


def batches(configs: Sequence[ml_collections.ConfigDict], members: Sequence[dict],
            tokenizer: Any, streams: dict[int, Iterator[dict]]) -> Iterator[dict]:
    """A population's host batches, arrays [M, B, ...]: member m's rows from its seed's stream.

    streams: seed -> `data.pipeline.train_batches` iterator of `BatchReader` batches.  Members
    with the same seed and fill share one assembled batch (tokenised once)."""
    while True:
        drawn = {seed: next(stream) for seed, stream in streams.items()}
        assembled: dict[tuple, dict] = {}
        rows = []
        for config, member in zip(configs, members):
            key = (member["seed"], member["fill"])
            if key not in assembled:
                assembled[key] = tower_batch(config, tokenizer, drawn[member["seed"]])
            rows.append(assembled[key])
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}
