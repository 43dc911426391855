"""``daug-jax bench``: how close the train steps come to the machine's dense-matmul speed.

    daug-jax bench [--quick] [--batch 32] [--size 32] [--out runs/bench/bench.json]
    daug-jax bench --peer torch            # each part beside the same computation in PyTorch
    daug-jax bench --profile gpu [--tiny]  # the paper's sizes in bfloat16 (--tiny: CPU smoke run)

Measures, in one run on the default device(s):
  * the achievable dense-matmul rate: an n x n matmul (float32, n = 2048; the gpu profile:
    bfloat16, n = 8192), 2 n^3 FLOPs / median time;
  * the epsilon-UNet, classifier and two-tower train steps, compiled exactly as training
    compiles them (replicated state, batch split on the "data" mesh axis, state donated): FLOPs
    from XLA's cost analysis of the compiled step / median wall time after warm-up, the ratio to
    the matmul rate, and images/s;
  * the heatmap program (guided DDIM translation) compiled as one program vs dispatched from a
    Python loop, in images x target classes per second;
  * the input pipeline: two-tower steps fed by the streaming pipeline from a TFDS split vs the
    same steps fed from arrays already in memory (steps/s and their ratio);
  * peak host RSS, device memory statistics where the backend reports them, device kind and
    count, JAX version.
  * with ``--peer torch``: the UNet, classifier and two-tower steps and the translation beside
    their PyTorch ports (`daug_jax.bench_peer`, ``peers/``), with parameter and FLOP counts.
Sizes come from a profile (``experiments/bench.py``), flags override them.
Every time is the median of ``--repeats`` calls after warm-up, each ended by ``block_until_ready``.
Results go to ``--out`` (JSON, written to a temporary name and renamed) and to stdout.

What is run (step builders, the matmul) and the FLOP counts live in `daug_jax.bench_programs`,
the printed summary in `daug_jax.bench_report`.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from daug_jax import parallel
from daug_jax.bench_programs import (compile_step, matmul_flops, matmul_program, towers_parts,
                                     towers_step, unet_step, xla_flops)
from daug_jax.bench_report import PEER_KEYS, report
from daug_jax.config import load_config
from daug_jax.data.pipeline import ArraySource
from daug_jax.files import write_json

PARTS = ("matmul", "unet", "classifier", "towers", "heatmaps", "input")


# ----------------------------------------------------------------------------- measuring
def median_time(call: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of ``call()`` (its result blocked on) after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def bench_matmul(matmul: tuple[Callable[[], Any], float, float], n: int, repeats: int,
                 dtype: str = "float32") -> dict:
    """The dense matmul rate: ``2 n^3`` FLOPs over the median time."""
    call, flops, xla = matmul
    median, times = median_time(call, repeats)
    return {"n": n, "dtype": dtype, "flops": flops, "xla_flops": xla,
            "median_s": median, "times_s": times, "flops_per_s": flops / median}


def bench_step(step_fn: Callable, init_state: Callable, source: ArraySource, batch_size: int,
               repeats: int, mesh, matmul: tuple | None = None,
               peer: Callable[[], Any] | None = None) -> dict:
    """Achieved FLOP/s and images/s of a train step; the state is threaded through the calls.

    matmul: `matmul_program` output, the reference matmul, timed right before every step call so
    that each ratio compares two timings taken under the same machine load (a shared machine
    drifts between a run's parts); the reported ratio is the median of these paired ratios.
    peer: builds the peer framework's same step (a `peers.PeerStep`), timed against this one in
    back-to-back pairs (`bench_peer.compare`) into ``out["peer"]``.
    """
    from daug_jax import bench_peer
    from daug_jax.data.pipeline import read

    batch = parallel.shard_batch(read(source, range(batch_size)), mesh)
    state = init_state(mesh)
    if peer is not None:  # before the first call: the step donates the state it is given
        jax_flops = matmul_flops(step_fn, state, batch)  # traced only: nothing runs
        jax_params = bench_peer.param_count(
            state["params"] if isinstance(state, dict) else state.params)
    start = time.perf_counter()
    compiled = compile_step(step_fn, state, batch, mesh)
    compile_s = time.perf_counter() - start
    flops = xla_flops(compiled)
    holder = {"state": state}

    def call():
        # The step donates its input state: keep only the newest one alive.
        holder["state"], metrics = compiled(holder["state"], batch)
        return holder["state"], metrics

    ratios = []
    if matmul is not None:
        mm_call, mm_flops, _ = matmul
        jax.block_until_ready(call())
        for _ in range(repeats):
            mm_s, _ = median_time(mm_call, 1, warmup=0)
            step_s, _ = median_time(call, 1, warmup=0)
            ratios.append((flops / step_s) / (mm_flops / mm_s))
    median, times = median_time(call, repeats, warmup=2)
    _, metrics = call()
    out = {"batch": batch_size, "image_shape": list(source.arrays["image"].shape[1:]),
           "devices": mesh.devices.size, "flops_per_device": flops, "compile_s": compile_s,
           "median_s": median, "times_s": times,
           "flops_per_s": flops * mesh.devices.size / median,
           "flops_per_s_per_device": flops / median, "images_per_s": batch_size / median,
           "loss": float(np.asarray(metrics["loss"].addressable_data(0)))}
    if ratios:
        out["ratio_to_matmul"] = statistics.median(ratios)
        out["ratios_to_matmul"] = ratios
    if peer is not None:
        out["peer"] = bench_peer.compare(call, peer(), jax_flops=jax_flops,
                                         jax_params=jax_params, repeats=repeats)
    return out


def bench_heatmaps(config: Any, size: int, batch: int, *, targets: str, level: int,
                   num_steps: int, scale: float, repeats: int,
                   peer: Callable[..., Any] | None = None) -> dict:
    """The guided-translation program compiled whole vs dispatched step by step from Python.

    FLOPs of the compiled program: XLA's cost analysis (``xla_flops``; a rolled loop's body may
    be counted once) and the matmuls and convolutions of its jaxpr, loops counted per trip
    (``matmul_flops``).  peer: ``peer(x, num_classes, index, direction, grid, scale, blur)``
    builds the peer framework's same translation (`peers.PeerStep`), timed against the compiled
    program.
    """
    from daug_jax import bench_peer
    from daug_jax.data import synthetic
    from daug_jax.heatmaps import (blur_matrix, init_models, make_heatmap_fn, to_model_space,
                                   translate_python_loop)

    models = init_models(config, (size, size, 1), synthetic.CLASS_NAMES, jax.random.key(0))
    smooth = 1.0
    f = make_heatmap_fn(models.eps_fn, models.logit_fn, models.alpha_bar, targets,
                        models.class_names, level=level, num_steps=num_steps, scale=scale,
                        smooth_sigma=smooth, image_shape=models.image_shape,
                        max_level=models.max_level)
    x = to_model_space(np.random.default_rng(0).uniform(size=(batch, size, size, 1)))
    start = time.perf_counter()
    compiled = f.program.lower(f.eps_fn, f.logit_fn, x).compile()
    compile_s = time.perf_counter() - start
    work = batch * len(f.targets)
    flops = {"xla_flops": xla_flops(compiled),
             "matmul_flops": matmul_flops(f.program, f.eps_fn, f.logit_fn, x)}
    out = {"batch": batch, "image_size": size, "targets": len(f.targets), "level": level,
           "ddim_steps_each_way": num_steps, "compile_s": compile_s, **flops}
    calls = {"compiled": lambda: compiled(f.eps_fn, f.logit_fn, x),
             "python_loop": lambda: translate_python_loop(f, x)}
    for name, call in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(call())  # the loop compiles each network call here
        first = time.perf_counter() - start
        median, times = median_time(call, repeats, warmup=0)
        out[name] = {"first_call_s": first, "median_s": median, "times_s": times,
                     "images_classes_per_s": work / median}
    out["speedup"] = out["python_loop"]["median_s"] / out["compiled"]["median_s"]
    for key in ("xla_flops", "matmul_flops"):
        out["compiled"][key.replace("flops", "flops_per_s")] = flops[key] / out["compiled"]["median_s"]
    if peer is not None:
        index = [t.index for t in f.targets]
        direction = [t.direction for t in f.targets]
        step = peer(x, len(models.class_names), index, direction, f.grid, f.scale,
                    blur_matrix(size, smooth))
        out["peer"] = bench_peer.compare(
            calls["compiled"], step, jax_flops=flops["matmul_flops"],
            jax_params=bench_peer.param_count((f.eps_fn, f.logit_fn)), repeats=repeats)
    return out


def bench_input(config: Any, data_config: Any, batch: int, steps: int, repeats: int,
                mesh) -> dict:
    """Two-tower train steps fed by the streaming pipeline vs the same steps fed from host
    arrays already in memory: does the input keep up with the step?

    The pipeline reads a TFDS ``synthetic_cxr`` split (built under ``data_config.data_dir`` if
    missing), decodes, labels and tokenises in its background threads; the in-memory feed slices
    pre-assembled arrays.  Returns steps/s of both and their ratio (pipeline / in memory).
    """
    from daug_jax import tower_inputs
    from daug_jax.data import pipeline, registry

    dataset = registry.open_dataset(data_config, image_size=int(data_config.image_size))
    source = dataset.source("train")
    if len(source) < batch * steps:
        raise ValueError(f"bench input needs {batch * steps} films, the split has {len(source)}")
    config = config.copy_and_resolve_references()
    config.train.batch_size = batch
    reader = tower_inputs.make_reader(config, source, dataset.class_names)
    with tempfile.TemporaryDirectory() as workdir:
        step_fn, init_state, _ = towers_step(config, pipeline.read(source, range(2 * batch)),
                                             workdir)
        tokenizer = tower_inputs.make_tokenizer(config.model.text, (), workdir)
    arrays = tower_inputs.tower_batch(config, tokenizer, reader(range(batch * steps)))
    state = init_state(mesh)
    compiled = compile_step(step_fn, state, parallel.shard_batch(
        {k: v[:batch] for k, v in arrays.items()}, mesh), mesh)
    holder = {"state": state}

    def run(next_batch):
        start = time.perf_counter()
        for i in range(steps):
            holder["state"], metrics = compiled(holder["state"],
                                                parallel.shard_batch(next_batch(i), mesh))
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    def in_memory(i):
        return {k: v[i * batch:(i + 1) * batch] for k, v in arrays.items()}

    times = {"in_memory": [], "pipeline": []}
    run(in_memory)  # warm-up: first calls, caches
    for r in range(repeats):  # interleaved, so that both see the same machine load
        times["in_memory"].append(run(in_memory))
        stream = pipeline.train_batches(reader, batch, seed=r, num_threads=int(
            config.train.get("input_threads", 2)))
        times["pipeline"].append(run(lambda i: tower_inputs.tower_batch(config, tokenizer,
                                                                   next(stream))))
    out = {"batch": batch, "image_size": int(data_config.image_size), "steps": steps,
           "dataset": dataset.name, "num_films": len(source), "times_s": times}
    for name, values in times.items():
        out[f"{name}_steps_per_s"] = steps / statistics.median(values)
    out["ratio"] = out["pipeline_steps_per_s"] / out["in_memory_steps_per_s"]
    return out


def memory_stats() -> dict:
    """Peak host RSS (bytes) and, where the backend reports it, device memory in use and peak."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if platform.system() == "Darwin" else 1024  # Linux reports KiB
    devices = []
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats:
            devices.append({"device": str(device), **{k: int(stats[k]) for k in (
                "bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}})
    return {"host_peak_rss_bytes": int(rss), "device": devices or None}


# ----------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict:
    from daug_jax import bench_peer
    from daug_jax.data import synthetic

    mesh = parallel.make_mesh()
    device = jax.devices()[0]
    result: dict = {
        "device": {"platform": device.platform, "kind": device.device_kind,
                   "count": jax.device_count(), "processes": jax.process_count(),
                   "jax": jax.__version__, "host_cpus": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    peer = bench_peer.load(args.peer) if args.peer else None
    if peer is not None:
        result["peer"] = peer.info()
    parts = [p for p in PARTS if p in args.parts]
    rng = np.random.default_rng(0)
    inputs = {
        "dcfg": load_config(args.diffusion_config, args.diffusion_set),
        "tcfg": load_config(args.towers_config, args.towers_set),
        "images": rng.uniform(size=(args.batch, args.size, args.size, 1)).astype(np.float32),
        # Films with labels and reports, for the classifier's and the towers' steps.
        "films": (synthetic.generate(args.batch, image_size=args.size, seed=0)
                  if {"classifier", "towers"} & set(parts) else None),
        "matmul": matmul_program(args.matmul_n, args.matmul_dtype) if "matmul" in parts else None,
        "mesh": mesh, "peer": peer}
    for part in tqdm(parts, desc="bench", unit="part"):
        key, value = _run_part(part, args, **inputs)
        result[key] = value
    if "matmul" in result and "heatmaps" in result:
        compiled = result["heatmaps"]["compiled"]
        compiled["ratio_to_matmul"] = compiled["xla_flops_per_s"] / result["matmul"]["flops_per_s"]
    if peer is not None:
        result["peer"]["ratios"] = {key: result[key]["peer"]["ratio"] for key in PEER_KEYS
                                    if "peer" in result.get(key, {})}
    result["memory"] = memory_stats()
    return result


def _run_part(part: str, args: argparse.Namespace, *, dcfg, tcfg, images, films, matmul, mesh,
              peer) -> tuple[str, dict]:
    """Measures one of `PARTS`: (its key in the result, its measurement)."""
    if part == "matmul":
        return "matmul", bench_matmul(matmul, args.matmul_n, args.repeats, args.matmul_dtype)
    if part == "unet":
        build = peer and (lambda: peer.diffusion.unet_step(dcfg, images, peer.device))
        return "unet_train_step", bench_step(*unet_step(dcfg, images), args.batch, args.repeats,
                                             mesh, matmul, peer=build)
    if part == "classifier":
        step_fn, init_state, source = unet_step(dcfg, images, classifier_labels=films["labels"])
        build = peer and (lambda: peer.diffusion.classifier_step(
            dcfg, images, source.arrays["labels"], source.arrays["label_mask"], peer.device))
        return "classifier_train_step", bench_step(step_fn, init_state, source, args.batch,
                                                   args.repeats, mesh, matmul, peer=build)
    if part == "towers":
        tcfg.train.batch_size = args.batch
        with tempfile.TemporaryDirectory() as workdir:
            step_fn, init_state, source, class_tokens, vocab = towers_parts(tcfg, films, workdir)
            build = peer and (lambda: peer.towers.towers_step(tcfg, source.arrays, class_tokens,
                                                              vocab))
            return "towers_train_step", bench_step(step_fn, init_state, source, args.batch,
                                                   args.repeats, mesh, matmul, peer=build)
    if part == "input":
        tcfg.data.update(image_size=args.input_size, data_dir=args.data_dir,
                         num_train=max(64 if args.quick else 2048, args.batch * args.input_steps))
        return "input", bench_input(tcfg, tcfg.data, args.batch, args.input_steps, args.repeats,
                                    mesh)
    build = peer and (lambda *a: peer.diffusion.translation(dcfg, *a, peer.device))
    return "heatmaps", bench_heatmaps(
        dcfg, args.size, args.heatmap_batch, targets=args.targets, level=args.level,
        num_steps=args.ddim_steps, scale=3.0, repeats=args.repeats, peer=build)


def _parser(command: str) -> argparse.ArgumentParser:
    from daug_jax import bench_peer

    parser = argparse.ArgumentParser(prog=f"daug-jax {command}", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"),
                        help="sizes (experiments/bench.py): cpu = the demo's, gpu = the paper's")
    parser.add_argument("--tiny", action="store_true",
                        help="the gpu profile's program shapes at tiny sizes (a CPU smoke run)")
    parser.add_argument("--quick", action="store_true",
                        help="cpu profile, small sizes and few repeats (a smoke run, not a measurement)")
    parser.add_argument("--peer", default=None, choices=bench_peer.PEERS,
                        help="time each part beside the same computation in PyTorch "
                             "(peers/; the optional extra .[peer])")
    parser.add_argument("--batch", type=int, default=None, help="train-step batch")
    parser.add_argument("--size", type=int, default=None, help="image size")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls")
    parser.add_argument("--matmul-n", type=int, default=None, help="matmul size")
    parser.add_argument("--matmul-dtype", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--parts", default=None, help=f"subset of {','.join(PARTS)}")
    parser.add_argument("--diffusion-config", default="diffusion")
    parser.add_argument("--diffusion-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the UNet/classifier config, e.g. unet.ch=64")
    parser.add_argument("--towers-config", default="towers")
    parser.add_argument("--towers-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--targets", default="Pleural Effusion,No Finding")
    parser.add_argument("--level", type=int, default=None, help="heatmap encode level")
    parser.add_argument("--ddim-steps", type=int, default=None, help="DDIM moves each way")
    parser.add_argument("--heatmap-batch", type=int, default=None, help="heatmap batch")
    parser.add_argument("--input-size", type=int, default=None,
                        help="image size of the input-pipeline part")
    parser.add_argument("--input-steps", type=int, default=None,
                        help="steps per timed run of the input-pipeline part")
    parser.add_argument("--data-dir", default=os.path.join("runs", "tfds"),
                        help="where the input part's synthetic_cxr dataset is (built if missing)")
    parser.add_argument("--out", default=os.path.join("runs", "bench", "bench.json"))
    return parser


def main(command: str, argv: list[str]) -> int:
    from experiments.bench import get_profile

    parser = _parser(command)
    args = parser.parse_args(argv)
    try:
        profile = get_profile(args.profile, tiny=args.tiny, quick=args.quick)
    except ValueError as e:
        parser.error(str(e))
    for key, value in profile["settings"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.diffusion_set = profile["diffusion_set"] + args.diffusion_set
    args.towers_set = profile["towers_set"] + args.towers_set
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        parser.error(f"unknown --parts {unknown}; valid: {list(PARTS)}")
    for key in ("batch", "size", "repeats", "matmul_n", "ddim_steps", "heatmap_batch",
                "input_size", "input_steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    args.parts = args.parts.split(",")
    parallel.maybe_initialize_distributed()
    result = run(args)
    print(report(result))
    if jax.process_index() == 0:
        write_json(args.out, result)
        print(f"bench: results in {args.out}")
    return 0
