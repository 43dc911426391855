"""Runs a few data-parallel train steps and saves metrics and final states (launched by tests).

    python tests/_distributed_worker.py OUT.npz --run diffusion float32 1 --run diffusion float32 4

Each ``--run MODEL DTYPE N`` runs the real train step of MODEL ("diffusion": the epsilon-UNet,
"classifier": the noise-aware classifier, "towers": the two towers) with compute dtype DTYPE for
``NUM_STEPS`` steps on a mesh of the first N devices of this process (N = "all": every device of
every process) and stores, under the prefix ``MODEL/DTYPE/N/``, the metrics of every step, the
final state leaves and the number of bfloat16 values in the lowered program.

Launched as one of several processes (``DAUG_COORDINATOR``, ``DAUG_NUM_PROCESSES``,
``DAUG_PROCESS_ID``), each process feeds only its rows of every global batch
(``host_slice`` of the same global batch) and process 0 writes the file.  The device count of a process
comes from ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set by the launching test: it
must be in the environment before JAX is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (XLA_FLAGS is already in the environment)
import numpy as np  # noqa: E402

from daug_jax import bench, parallel  # noqa: E402
from daug_jax.config import load_config  # noqa: E402
from daug_jax.data.pipeline import read  # noqa: E402

NUM_STEPS = 3     # the first step runs at learning rate 0 (warm-up), so the weights move twice
GLOBAL_BATCH = 8
IMAGE_SIZE = 32   # the synthetic benchmark's smallest size


def diffusion_setup(model: str, dtype: str) -> tuple:
    """``(step(state, batch), init_state(mesh), source)`` for a tiny UNet or classifier."""
    section = "unet" if model == "diffusion" else "classifier"

    def configure(compute_dtype):
        return load_config("diffusion", [
            f"{section}.ch=8", f"{section}.channel_mult=(1,)", f"{section}.norm_groups=4",
            f"{section}.dtype={compute_dtype}", f"{section}_train.warmup_steps=1"])

    rng = np.random.default_rng(0)  # any images in [0, 1] do: only the arithmetic is compared
    images = rng.uniform(size=(2 * GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    labels = rng.integers(-1, 2, size=(2 * GLOBAL_BATCH, 7)).astype(np.int8)
    # float32 parameters whatever the compute dtype: one init program for every run.
    return bench.unet_step(configure(dtype), images, init_config=configure("float32"),
                           classifier_labels=labels if model == "classifier" else None)


def towers_setup(dtype: str, workdir: str) -> tuple:
    """``(step(state, batch), init_state(mesh), source)`` for tiny two towers.

    The tokenizer is learnt by the first run into ``workdir`` and reloaded by every later run
    and process: all must agree on the token ids.
    """
    from daug_jax.data import synthetic

    def configure(compute_dtype):
        return load_config("towers", [
            "model.vision.resnet={'stage_sizes': (1,), 'widths': (8,), 'stem_width': 8}",
            f"model.vision.dtype={compute_dtype}", f"model.text.dtype={compute_dtype}",
            "model.text.vocab_size=200", "model.text.hidden_size=16", "model.text.num_layers=1",
            "model.text.intermediate_size=32", "model.text.max_length=48", "model.embed_dim=16",
            "train.warmup=1", f"train.batch_size={GLOBAL_BATCH}"])

    data = synthetic.generate(2 * GLOBAL_BATCH, image_size=IMAGE_SIZE, seed=0)
    return bench.towers_step(configure(dtype), data, workdir, init_config=configure("float32"))[:3]


def run(model: str, dtype: str, devices: list, workdir: str) -> dict:
    """NUM_STEPS steps on a mesh of ``devices``: metrics per step, final state, bf16 count."""
    step_fn, init_state, source = (towers_setup(dtype, workdir) if model == "towers"
                                   else diffusion_setup(model, dtype))
    mesh = parallel.make_mesh(devices)
    rep = parallel.replicated(mesh)
    batch_spec = {k: parallel.data_sharding(mesh) for k in source.arrays}
    state = init_state(mesh)

    def batch(i):  # this process's rows of global batch i (the same global batch everywhere)
        rows = np.random.default_rng([0, i]).permutation(len(source))[:GLOBAL_BATCH]
        return parallel.shard_batch(read(source, rows[parallel.host_slice(GLOBAL_BATCH)]), mesh)

    lowered = jax.jit(step_fn, in_shardings=(rep, batch_spec), out_shardings=(rep, rep),
                      donate_argnums=0).lower(state, batch(0))
    out: dict = {"bf16_values": np.asarray(lowered.as_text().count("bf16"))}
    step = lowered.compile()
    history: dict[str, list] = {}
    for i in range(NUM_STEPS):
        state, metrics = step(state, batch(i))
        for name, value in metrics.items():
            history.setdefault(name, []).append(np.asarray(value.addressable_data(0)))
    out.update({f"metric/{k}": np.stack(v) for k, v in history.items()})
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        # Replicated: every process holds a whole copy on each of its devices.
        out["state" + jax.tree_util.keystr(path)] = np.asarray(leaf.addressable_data(0))
    out["num_devices"] = np.asarray(len(devices))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--workdir", required=True,
                        help="shared by all runs and processes: the towers' tokenizer is learnt "
                             "once, and every run must see the same token ids")
    parser.add_argument("--run", nargs=3, action="append", required=True,
                        metavar=("MODEL", "DTYPE", "DEVICES"))
    args = parser.parse_args()
    parallel.maybe_initialize_distributed()
    results = {"process_count": np.asarray(jax.process_count())}
    for model, dtype, n in args.run:
        if model not in ("diffusion", "classifier", "towers"):
            raise ValueError(f"unknown model {model!r}")
        devices = jax.devices() if n == "all" else jax.local_devices()[:int(n)]
        t0 = time.perf_counter(), time.process_time()
        out = run(model, dtype, devices, args.workdir)
        results.update({f"{model}/{dtype}/{n}/{k}": v for k, v in out.items()})
        print(f"{model} {dtype} on {len(devices)} devices: {time.perf_counter() - t0[0]:.1f} s "
              f"({time.process_time() - t0[1]:.1f} s CPU)", file=sys.stderr)
    if jax.process_index() == 0:
        tmp = f"{args.out}.tmp.npz"
        np.savez(tmp, **results)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
