"""Data parallelism through `jax.jit` + `NamedSharding` on a 1-D device mesh.

The same train step runs on one CPU, eight GPUs or a multi-host TPU slice: parameters are
replicated, the batch is split along the mesh's ``"data"`` axis and XLA inserts the gradient
all-reduce.  Each process feeds its own rows (`host_slice`); `shard_batch` assembles them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
    """Starts JAX's multi-process runtime from ``DAUG_COORDINATOR`` (host:port),
    ``DAUG_NUM_PROCESSES`` and ``DAUG_PROCESS_ID``, or lets JAX discover them on TPU pods and SLURM
    (``DAUG_DISTRIBUTED=auto``).  Nothing for a single process.  Must precede any other JAX call."""
    if os.environ.get("DAUG_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return
    coordinator = os.environ.get("DAUG_COORDINATOR")
    if not coordinator:
        return
    # CPU collectives go through gloo (no effect on other devices).  Not conditioned on the
    # backend: asking would start it, and jax.distributed.initialize must come first.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["DAUG_NUM_PROCESSES"]),
                               process_id=int(os.environ["DAUG_PROCESS_ID"]))


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Axis ``axis`` (default the leading one) split over the data axis; other axes whole."""
    return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` on all devices of ``mesh`` (parameters, optimizer state)."""
    return jax.device_put(tree, replicated(mesh))


def host_slice(global_batch_size: int) -> slice:
    """The rows of a global batch that this process loads and feeds."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{count} processes")
    per = global_batch_size // count
    return slice(index * per, (index + 1) * per)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, axis: int = 0) -> dict[str, jax.Array]:
    """This process's rows of a batch as global arrays split over ``"data"``.

    batch: dict of host arrays, each [B_local, ...] with B_local = global batch / processes
    (with ``axis`` = 1, [M, B_local, ...]: the stacked batches of a population of runs).
    Returns dict of jax.Array [B_global, ...].  Non-numeric leaves (e.g. strings) are dropped.
    """
    sharding, n_dev = data_sharding(mesh, axis), mesh.devices.size
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            continue
        global_rows = value.shape[axis] * jax.process_count()
        if global_rows % n_dev:
            raise ValueError(f"batch field {key!r}: global batch of {global_rows} rows cannot "
                             f"be split over {n_dev} devices")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
