"""``daug-jax bench``: how close the train steps come to the machine's dense-matmul speed.

    daug-jax bench [--quick] [--batch 32] [--size 32] [--out runs/bench/bench.json]
    daug-jax bench --peer torch            # each part beside the same computation in PyTorch
    daug-jax bench --profile gpu [--tiny]  # the paper's sizes in bfloat16 (--tiny: CPU smoke run)

Measures, in one run on the default device(s):
  * the dense-matmul rate: an n x n matmul (float32, n = 2048; gpu profile: bfloat16, n = 8192);
  * the epsilon-UNet, classifier and two-tower train steps, compiled as training compiles them
    (`compile_step`): XLA's FLOPs of the step / median wall time, the ratio to the matmul rate,
    and images/s;
  * the heatmap program (guided DDIM translation, the heatmap job's), in images x target classes
    per second and FLOP/s;
  * the input pipeline: two-tower steps fed by the streaming pipeline from a TFDS split vs from
    arrays already in memory (steps/s and their ratio);
  * peak host RSS, device memory where the backend reports it, device kind and count, JAX version;
  * with ``--peer torch``: the UNet, classifier and two-tower steps and the translation beside
    their PyTorch ports (`daug_jax.bench_peer`, ``peers/``), with parameter and FLOP counts.
Sizes come from a profile (``experiments/bench.py``), flags override them.
Every time is the median of ``--repeats`` calls after warm-up, each ended by ``block_until_ready``.
Results go to ``--out`` (JSON, written to a temporary name and renamed) and to stdout.

``daug-jax bench heatmaps`` is ``daug-jax bench --parts heatmaps``.
The step builders (`unet_step`, `towers_step`) are also what the data-parallel tests run.
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
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from daug_jax import bench_peer, loop, parallel, tower_inputs
from daug_jax import train as towers_train
from daug_jax.config import load_config, read_config
from daug_jax.data import pipeline, registry, synthetic
from daug_jax.data.pipeline import ArraySource
from daug_jax.diffusion import train as dtrain
from daug_jax.diffusion.schedule import to_model_space
from daug_jax.files import write_json
from daug_jax.heatmaps import blur_matrix, init_models, make_heatmap_fn, make_translation
from daug_jax.losses import labels_and_mask
from daug_jax.models.two_tower import build_two_tower, text_shape

PARTS = ("matmul", "unet", "classifier", "towers", "heatmaps", "input")


# ----------------------------------------------------------------------------- measuring
def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """``call()``'s result, blocked on, and its wall seconds."""
    start = time.perf_counter()
    result = jax.block_until_ready(call())
    return result, time.perf_counter() - start


def median_time(call: Callable[[], Any], repeats: int,
                warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of ``call()`` (its result blocked on) after ``warmup`` calls."""
    times = [timed(call)[1] for _ in range(warmup + repeats)][warmup:]
    return statistics.median(times), times


def bench_step(step_fn: Callable, init_state: Callable, source: ArraySource, batch_size: int,
               repeats: int, mesh, matmul: tuple | None = None,
               peer: Callable[[], Any] | None = None) -> dict:
    """Achieved FLOP/s and images/s of a train step; the state is threaded through the calls.

    matmul: `matmul_program` output, timed right before every step call so that each ratio
    compares timings under the same machine load; the reported ratio is their median.
    peer: builds the peer's same step (a `peers.PeerStep`), timed in back-to-back pairs
    (`bench_peer.compare`) into ``out["peer"]``.
    """
    batch = parallel.shard_batch(pipeline.read(source, range(batch_size)), mesh)
    state = init_state(mesh)
    if peer is not None:  # before the first call: the step donates the state it is given
        jax_flops = matmul_flops(step_fn, state, batch)  # traced only: nothing runs
        jax_params = bench_peer.param_count(
            state["params"] if isinstance(state, dict) else state.params)
    compiled, compile_s = timed(lambda: compile_step(step_fn, state, batch, mesh))
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
            mm_s, step_s = timed(mm_call)[1], timed(call)[1]
            ratios.append((flops / step_s) / (mm_flops / mm_s))
    median, times = median_time(call, repeats, warmup=2)
    _, metrics = call()
    out = {"batch": batch_size, "image_shape": list(source.arrays["image"].shape[1:]),
           "devices": mesh.devices.size, "flops_per_device": flops, "compile_s": compile_s,
           "median_s": median, "times_s": times, "flops_per_s": flops * mesh.devices.size / median,
           "flops_per_s_per_device": flops / median, "images_per_s": batch_size / median,
           "loss": float(np.asarray(metrics["loss"].addressable_data(0)))}
    if ratios:
        out["ratio_to_matmul"] = statistics.median(ratios)
        out["ratios_to_matmul"] = ratios
    if peer is not None:
        out["peer"] = bench_peer.compare(call, peer(), jax_flops=jax_flops,
                                         jax_params=jax_params, repeats=repeats)
    return out


def bench_heatmaps(config: Any, args: argparse.Namespace, peer: Callable[..., Any] | None = None
                   ) -> dict:
    """The guided-translation program (`heatmaps.make_heatmap_fn`, the heatmap job's) for fresh
    models of the diffusion ``config`` and ``args.heatmap_batch`` films of ``args.size`` px:
    images x targets per second and FLOP/s.

    FLOPs: ``xla_flops`` (a rolled loop's body may be counted once) and ``matmul_flops`` (loops
    counted per trip).  peer: ``peer(x, num_classes, index, direction, grid, scale, blur)``
    builds the peer's same translation (`peers.PeerStep`), timed against the compiled program.
    """
    size, batch = args.size, args.heatmap_batch
    models = init_models(config, (size, size, 1), synthetic.CLASS_NAMES, jax.random.key(0))
    smooth = 1.0
    settings = dict(level=args.level, num_steps=args.ddim_steps, smooth_sigma=smooth,
                    reference="x0", unroll=args.unroll or True,  # 0: fully unrolled
                    guidance="sigmoid")
    f = make_heatmap_fn(models, args.targets, make_translation(models, settings), args.scale)
    x = to_model_space(np.random.default_rng(0).uniform(size=(batch, size, size, 1)))
    inputs = (models.eps_fn, models.logit_fn, x)
    compiled, compile_s = timed(lambda: f.program.lower(*inputs).compile())
    work = batch * len(f.targets)
    flops = {"xla_flops": xla_flops(compiled), "matmul_flops": matmul_flops(f.program, *inputs)}
    out = {"batch": batch, "image_size": size, "targets": len(f.targets), "level": args.level,
           "ddim_steps_each_way": args.ddim_steps, "compile_s": compile_s, **flops}
    call = lambda: compiled(*inputs)  # noqa: E731
    first = timed(call)[1]
    median, times = median_time(call, args.repeats, warmup=0)
    out["compiled"] = {"first_call_s": first, "median_s": median, "times_s": times,
                       "images_classes_per_s": work / median,
                       **{k.replace("flops", "flops_per_s"): v / median for k, v in flops.items()}}
    if peer is not None:
        step = peer(x, len(models.class_names), [t.index for t in f.targets],
                    [t.direction for t in f.targets], f.translation.grid, f.scale,
                    blur_matrix(size, smooth))
        out["peer"] = bench_peer.compare(
            call, step, jax_flops=flops["matmul_flops"],
            jax_params=bench_peer.param_count((models.eps_fn, models.logit_fn)),
            repeats=args.repeats)
    return out


def bench_input(config: Any, data_config: Any, batch: int, steps: int, repeats: int, mesh) -> dict:
    """Two-tower train steps fed by the streaming pipeline (a TFDS ``synthetic_cxr`` split, built
    under ``data_config.data_dir`` if missing) vs by slices of arrays in memory: steps/s of both
    and their ratio (pipeline / in memory)."""
    dataset = registry.open_dataset(data_config, image_size=int(data_config.image_size))
    source = dataset.source("train")
    if len(source) < batch * steps:
        raise ValueError(f"bench input needs {batch * steps} films, the split has {len(source)}")
    config = config.copy_and_resolve_references()
    config.train.batch_size = batch
    reader = tower_inputs.make_reader(config, source, dataset.class_names)
    with tempfile.TemporaryDirectory() as workdir:
        step_fn, init_state, *_ = towers_step(config, pipeline.read(source, range(2 * batch)),
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
        stream = pipeline.train_batches(reader, batch, seed=r,
                                        num_threads=int(config.train.input_threads))
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


# ----------------------------------------------------------------------------- step builders
def unet_step(config: Any, images: np.ndarray, *, classifier_labels: np.ndarray | None = None,
              init_config: Any | None = None,
              key_seed: int = 1) -> tuple[Callable, Callable, ArraySource]:
    """``(step(state, batch), init_state(mesh), source)`` for the diffusion config's UNet.

    images: [N, H, W, C] float32 in [0, 1].  With ``classifier_labels`` ([N, K] int in {-1, 0, 1})
    the noise-aware classifier's step instead.  ``init_config`` (default ``config``) builds the
    module that initialises the parameters: parameters are float32 whatever the compute dtype,
    so a float32 config can initialise a bfloat16 run.
    """
    classifier = classifier_labels is not None

    def build(cfg):
        if classifier:
            return (dtrain.make_classifier(cfg, classifier_labels.shape[1]),
                    dtrain.make_optimizer(cfg.classifier_train))
        return dtrain.make_unet(cfg), dtrain.make_optimizer(cfg.unet_train)

    module, tx = build(config)
    init_module, init_tx = build(init_config or config)
    tcfg = config.classifier_train if classifier else config.unet_train
    alpha_bar, key = dtrain.alpha_bar_of(config), loop.prng_key(key_seed, tcfg.prng_impl)
    if classifier:
        step_fn = dtrain.classifier_step_fn(module, tx, alpha_bar, dtrain.trained_max_level(config))
        labels, mask = labels_and_mask(np.asarray(classifier_labels, np.float32))
        source = ArraySource({"image": images, "labels": labels, "label_mask": mask})
    else:
        step_fn = dtrain.diffusion_step_fn(module, tx, alpha_bar, config.unet_train.ema_decay)
        source = ArraySource({"image": images})
    # One compiled program instead of one dispatch per initialiser.
    init = jax.jit(dtrain.init_state, static_argnums=(0, 1, 2), static_argnames="ema")

    def init_state(mesh):
        state = init(init_module, init_tx, tuple(images.shape[1:]),
                     loop.prng_key(0, tcfg.prng_impl), ema=not classifier)
        return parallel.replicate(state, mesh)

    # The key is a constant of the program: identical on every process, no transfer needed.
    return (lambda state, batch: step_fn(state, batch, key)), init_state, source


def towers_step(config: Any, data: dict, workdir: str, *, init_config: Any | None = None
                ) -> tuple[Callable, Callable, ArraySource, tuple, int]:
    """``(step(state, batch), init_state(mesh), source, class_tokens, vocab_size)`` for the two
    towers, as `train_towers` builds them; a peer builds the same step from the last two: the
    class prompts' tokens ``(ids, mask)`` [K, L] and the vocabulary size.

    data: records like `synthetic.generate` output; workdir: where the learnt tokenizer is saved
    (and reloaded from, if there).  ``init_config`` as in `unet_step`."""
    source = ArraySource({k: data[k] for k in ("image", "labels", "report", "id")})
    reader = tower_inputs.make_reader(config, source, synthetic.CLASS_NAMES)
    tokenizer = tower_inputs.make_tokenizer(config.model.text, tower_inputs.report_corpus(reader),
                                            workdir)
    arrays = tower_inputs.tower_batch(config, tokenizer, reader(range(len(source))))
    class_tokens = tuple(jnp.asarray(a) for a in tower_inputs.class_prompt_tokens(
        tokenizer, config.model.class_names, config.model))
    shape = text_shape(config.model.text, len(tokenizer))
    model, init_model = (build_two_tower(c.model, shape) for c in (config, init_config or config))
    tx, schedule = towers_train.make_optimizer(config.train)
    step_fn = towers_train.make_train_step(model, tx, schedule, class_tokens, config)
    init = jax.jit(towers_train.init_fn(init_model, tx, {k: v[:1] for k, v in arrays.items()},
                                        class_tokens, config.train.prng_impl))

    def init_state(mesh):
        state = init(int(config.train.seed), float(config.train.clip_weight))
        return parallel.replicate(state, mesh)

    class_arrays = tuple(np.asarray(a) for a in class_tokens)
    return step_fn, init_state, ArraySource(arrays), class_arrays, len(tokenizer)


def compile_step(step_fn: Callable, state: Any, batch: dict, mesh) -> Any:
    """``jit(step_fn)`` with training's shardings (state replicated and donated), compiled."""
    rep = parallel.replicated(mesh)
    spec = {k: parallel.data_sharding(mesh) for k in batch}
    return jax.jit(step_fn, in_shardings=(rep, spec), out_shardings=(rep, rep),
                   donate_argnums=0).lower(state, batch).compile()


# ----------------------------------------------------------------------------- FLOPs
def xla_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled program (per device for a partitioned one), from XLA."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0]
    flops = float((cost or {}).get("flops", 0.0))
    if flops <= 0:
        raise RuntimeError(f"XLA's cost analysis reports no FLOPs on {jax.default_backend()}")
    return flops


def matmul_flops(fn: Callable, *args) -> float:
    """FLOPs of the matrix products and convolutions in ``fn(*args)``'s program: 2 x the
    multiply-adds of every ``dot_general`` and ``conv_general_dilated`` in its jaxpr, loops
    counted once per trip.  What PyTorch's `FlopCounterMode` counts; XLA's cost analysis also
    counts elementwise work."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (lhs_contract, _), (lhs_batch, _) = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contracted = np.prod([lhs[d] for d in lhs_contract], dtype=np.float64)
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape, dtype=np.float64) * contracted
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
            per_output = rhs[spec[1]] * np.prod([rhs[d] for d in spec[2:]], dtype=np.float64)
            # The input gradient of a strided convolution is a convolution of the cotangent
            # dilated by the stride: only 1 / prod(dilation) of its taps meet non-zero inputs.
            per_output /= np.prod(params["lhs_dilation"], dtype=np.float64)
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape, dtype=np.float64) * per_output
        trips = params.get("length", 1) if name == "scan" else 1
        for value in params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += trips * _jaxpr_flops(inner)
    return total


def matmul_program(n: int, dtype: str = "float32") -> tuple[Callable[[], Any], float, float]:
    """``(call, flops, xla_flops)``: one n x n matmul (2 n^3 FLOPs) on fixed operands of ``dtype``
    (float32; bfloat16, the accelerators' rate the paper-scale steps are compared with)."""
    a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype)
            for k in jax.random.split(jax.random.key(0)))
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    return (lambda: compiled(a, b)), 2.0 * n ** 3, xla_flops(compiled)


# ----------------------------------------------------------------------------- the summary
STEP_NAMES = {"unet_train_step": "UNet train step", "classifier_train_step": "classifier step",
              "towers_train_step": "two-tower step"}
# The parts measured beside a peer framework (``--peer``).
PEER_NAMES = {**STEP_NAMES, "heatmaps": "heatmap translation"}


def _rate(flops_per_s: float) -> str:
    return (f"{flops_per_s / 1e12:9.2f} TFLOP/s" if flops_per_s >= 1e12
            else f"{flops_per_s / 1e9:9.1f} GFLOP/s")


def report(result: dict) -> str:
    """The human-readable summary printed after a run."""
    d = result["device"]
    lines = [f"bench: {d['count']} x {d['kind']} ({d['platform']}), jax {d['jax']}"]
    if "matmul" in result:
        m = result["matmul"]
        lines.append(f"  matmul {m['n']}^2 {m['dtype']:<10} {_rate(m['flops_per_s'])} "
                     f"({m['median_s'] * 1e3:.1f} ms)")
    for key, name in STEP_NAMES.items():
        if key in result:
            s = result[key]
            ratio = f", {s['ratio_to_matmul']:.2f} x matmul" if "ratio_to_matmul" in s else ""
            lines.append(f"  {name:<24} {_rate(s['flops_per_s'])}{ratio}; "
                         f"{s['images_per_s']:.1f} images/s (batch {s['batch']}, "
                         f"{s['median_s'] * 1e3:.1f} ms/step, {s['flops_per_device'] / 1e9:.2f} "
                         f"GFLOP/step/device)")
    if "heatmaps" in result:
        h = result["heatmaps"]
        c = h["compiled"]
        ratio = f", {c['ratio_to_matmul']:.2f} x matmul" if "ratio_to_matmul" in c else ""
        lines.append(f"  heatmap translation      {c['images_classes_per_s']:9.2f} images*classes/s; "
                     f"{_rate(c['xla_flops_per_s']).strip()}{ratio}")
    if "input" in result:
        i = result["input"]
        lines.append(f"  input pipeline            {i['pipeline_steps_per_s']:9.2f} steps/s vs "
                     f"{i['in_memory_steps_per_s']:.2f} from arrays in memory = "
                     f"{i['ratio']:.2f}x (two-tower step, batch {i['batch']}, "
                     f"{i['image_size']} px, {i['dataset']})")
    if "peer" in result:
        p = result["peer"]
        lines.append(f"  peer: {p['framework']} {p['version']} on {p['device']}, "
                     f"{p['threads']} threads (median of back-to-back pairs)")
        lines += [bench_peer.summary_line(PEER_NAMES[k], result[k]["peer"]) for k in PEER_NAMES
                  if "peer" in result.get(k, {})]
    mem = result["memory"]
    lines.append(f"  peak host RSS {mem['host_peak_rss_bytes'] / 2 ** 20:.0f} MiB"
                 + ("" if not mem["device"] else "; device peak " + ", ".join(
                     f"{m.get('peak_bytes_in_use', 0) / 2 ** 20:.0f} MiB" for m in mem["device"])))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict:
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
        key, value = _run_part(part, args, inputs)
        result[key] = value
    if "matmul" in result and "heatmaps" in result:
        compiled = result["heatmaps"]["compiled"]
        compiled["ratio_to_matmul"] = compiled["xla_flops_per_s"] / result["matmul"]["flops_per_s"]
    if peer is not None:
        result["peer"]["ratios"] = {key: result[key]["peer"]["ratio"] for key in PEER_NAMES
                                    if "peer" in result.get(key, {})}
    result["memory"] = memory_stats()
    return result


def _run_part(part: str, args: argparse.Namespace, inputs: dict) -> tuple[str, dict]:
    """Measures one of `PARTS` with `run`'s ``inputs``: (its key in the result, its
    measurement)."""
    dcfg, tcfg, images, films = (inputs[k] for k in ("dcfg", "tcfg", "images", "films"))
    matmul, mesh, peer = inputs["matmul"], inputs["mesh"], inputs["peer"]
    if part == "matmul":  # the dense matmul rate: 2 n^3 FLOPs over the median time
        call, flops, xla = matmul
        median, times = median_time(call, args.repeats)
        return "matmul", {"n": args.matmul_n, "dtype": args.matmul_dtype, "flops": flops,
                          "xla_flops": xla, "median_s": median, "times_s": times,
                          "flops_per_s": flops / median}
    if part == "input":
        tcfg.data.update(image_size=args.input_size, data_dir=args.data_dir,
                         num_train=max(64 if args.quick else 2048, args.batch * args.input_steps))
        return "input", bench_input(tcfg, tcfg.data, args.batch, args.input_steps, args.repeats,
                                    mesh)
    if part == "heatmaps":
        build = peer and (lambda *a: peer.diffusion.translation(dcfg, *a, peer.device))
        return "heatmaps", bench_heatmaps(dcfg, args, peer=build)
    if part == "unet":
        step_fn, init_state, source = unet_step(dcfg, images)
        build = peer and (lambda: peer.diffusion.unet_step(dcfg, images, peer.device))
    elif part == "classifier":
        step_fn, init_state, source = unet_step(dcfg, images, classifier_labels=films["labels"])
        build = peer and (lambda: peer.diffusion.classifier_step(
            dcfg, images, source.arrays["labels"], source.arrays["label_mask"], peer.device))
    else:
        tcfg.train.batch_size = args.batch
        with tempfile.TemporaryDirectory() as workdir:  # the tokenizer is learnt, then held
            step_fn, init_state, source, class_tokens, vocab = towers_step(tcfg, films, workdir)
        build = peer and (lambda: peer.towers.towers_step(tcfg, source.arrays, class_tokens, vocab))
    return f"{part}_train_step", bench_step(step_fn, init_state, source, args.batch, args.repeats,
                                            mesh, matmul, peer=build)


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"),
                        help="sizes (experiments/bench.py): cpu = the demo's, gpu = the paper's")
    parser.add_argument("--tiny", action="store_true",
                        help="the gpu profile's program shapes at tiny sizes (a CPU smoke run)")
    parser.add_argument("--quick", action="store_true",
                        help="cpu profile, small sizes and few repeats "
                             "(a smoke run, not a measurement)")
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
    parser.add_argument("--scale", type=float, default=None, help="heatmap guidance scale")
    parser.add_argument("--unroll", type=int, default=None,
                        help="heatmap DDIM loops: 0 fully unrolled, 1 rolled")
    parser.add_argument("--input-size", type=int, default=None,
                        help="image size of the input-pipeline part")
    parser.add_argument("--input-steps", type=int, default=None,
                        help="steps per timed run of the input-pipeline part")
    parser.add_argument("--data-dir", default=os.path.join("runs", "tfds"),
                        help="where the input part's synthetic_cxr dataset is (built if missing)")
    parser.add_argument("--out", default=os.path.join("runs", "bench", "bench.json"))
    return parser


def main(command: str, argv: list[str]) -> int:
    if command == "bench heatmaps":  # the heatmap part alone
        argv = ["--parts", "heatmaps", *argv]
    parser = _parser(command)
    args = parser.parse_args(argv)
    if (args.profile == "cpu" and args.tiny) or (args.profile == "gpu" and args.quick):
        parser.error("--quick shrinks the cpu profile, --tiny the gpu profile (smoke runs)")
    suffix = "-quick" if args.quick else "-tiny" if args.tiny else ""
    profile = read_config(f"bench:{args.profile}{suffix}")  # experiments/bench.py
    for key, value in profile.settings.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.diffusion_set = list(profile.diffusion_set) + args.diffusion_set
    args.towers_set = list(profile.towers_set) + args.towers_set
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        parser.error(f"unknown --parts {unknown}; valid: {list(PARTS)}")
    for key in ("batch", "size", "repeats", "matmul_n", "ddim_steps", "heatmap_batch",
                "input_size", "input_steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    args.parts = args.parts.split(",")
    result = run(args)
    print(report(result))
    if jax.process_index() == 0:
        write_json(args.out, result)
        print(f"bench: results in {args.out}")
    return 0
