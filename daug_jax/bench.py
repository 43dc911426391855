"""``daug-jax bench``: how close the train steps come to the machine's dense-matmul speed.

    daug-jax bench [--quick] [--batch 32] [--size 32] [--out runs/bench/bench.json]

Measures, in one run on the default device(s):
  * the achievable dense-matmul rate: an n x n float32 matmul (n = 2048), 2 n^3 FLOPs / median time;
  * the epsilon-UNet train step and the two-tower train step, compiled exactly as training
    compiles them (replicated state, batch split on the "data" mesh axis, state donated): FLOPs
    from XLA's cost analysis of the compiled step / median wall time after warm-up, the ratio to
    the matmul rate, and images/s;
  * the heatmap program (guided DDIM translation) compiled as one program vs dispatched from a
    Python loop, in images x target classes per second;
  * the input pipeline: two-tower steps fed by the streaming pipeline from a TFDS split vs the
    same steps fed from arrays already in memory (steps/s and their ratio);
  * peak host RSS, device memory statistics where the backend reports them, device kind and
    count, JAX version.
Every time is the median of ``--repeats`` calls after warm-up, each ended by ``block_until_ready``.
Results go to ``--out`` (JSON, written to a temporary name and renamed) and to stdout.

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

from daug_jax import parallel
from daug_jax.config import load_config
from daug_jax.data import synthetic
from daug_jax.data.pipeline import ArraySource
from daug_jax.losses import labels_and_mask
from daug_jax.files import write_json

PARTS = ("matmul", "unet", "towers", "heatmaps", "input")


# ----------------------------------------------------------------------------- step builders
def unet_step(config: Any, images: np.ndarray, *, classifier_labels: np.ndarray | None = None,
              init_config: Any | None = None, key_seed: int = 1) -> tuple[Callable, Callable, ArraySource]:
    """``(step(state, batch), init_state(mesh), source)`` for the diffusion config's UNet.

    images: [N, H, W, C] float32 in [0, 1].  With ``classifier_labels`` ([N, K] int in {-1, 0, 1})
    the noise-aware classifier's step instead.  ``init_config`` (default ``config``) builds the
    module that initialises the parameters: parameters are float32 whatever the compute dtype,
    so a float32 config can initialise a bfloat16 run.
    """
    from daug_jax.diffusion import train as dtrain

    classifier = classifier_labels is not None

    def build(cfg):
        if classifier:
            return (dtrain.make_classifier(cfg, classifier_labels.shape[1]),
                    dtrain.make_optimizer(cfg.classifier_train))
        return dtrain.make_unet(cfg), dtrain.make_optimizer(cfg.unet_train)

    module, tx = build(config)
    init_module, init_tx = build(init_config or config)
    # Keys of the implementation training uses: the random stream (and, for some
    # implementations, how it is split across devices) is part of what is measured and tested.
    alpha_bar, key = dtrain.alpha_bar_of(config), dtrain.prng_key(key_seed)
    if classifier:
        max_level = config.classifier.max_level
        max_level = config.diffusion.num_steps - 1 if max_level is None else int(max_level)
        step_fn = dtrain.classifier_step_fn(module, tx, alpha_bar, max_level)
        labels, mask = labels_and_mask(np.asarray(classifier_labels, np.float32))
        source = ArraySource({"image": images, "labels": labels, "label_mask": mask})
    else:
        step_fn = dtrain.diffusion_step_fn(module, tx, alpha_bar, config.unet_train.ema_decay)
        source = ArraySource({"image": images})
    # One compiled program instead of one dispatch per initialiser.
    init = jax.jit(dtrain.init_state, static_argnums=(0, 1, 2), static_argnames="ema")

    def init_state(mesh):
        state = init(init_module, init_tx, tuple(images.shape[1:]), dtrain.prng_key(0),
                     ema=not classifier)
        return parallel.replicate(state, mesh)

    # The key is a constant of the program: identical on every process, no transfer needed.
    return (lambda state, batch: step_fn(state, batch, key)), init_state, source


def towers_step(config: Any, data: dict, workdir: str, *,
                init_config: Any | None = None) -> tuple[Callable, Callable, ArraySource]:
    """``(step(state, batch), init_state(mesh), source)`` for the two towers, as `train_towers` builds them.

    data: records like `synthetic.generate` output; workdir: where the learnt tokenizer is saved
    (and reloaded from, if there).  ``init_config`` as in `unet_step`.
    """
    from daug_jax import tower_inputs
    from daug_jax import train as ttrain
    from daug_jax.models import text as text_lib
    from daug_jax.models.two_tower import build_two_tower, class_prompts

    init_config = init_config or config
    text_cfg = config.model.text
    source = ArraySource({k: data[k] for k in ("image", "labels", "report", "id")})
    reader = tower_inputs.make_reader(config, source, synthetic.CLASS_NAMES)
    tokenizer = tower_inputs.make_tokenizer(text_cfg, tower_inputs.report_corpus(reader), workdir)
    arrays = tower_inputs.tower_batch(config, tokenizer, reader(range(len(source))))
    length = int(text_cfg.max_length)
    class_tokens = tuple(jnp.asarray(a) for a in text_lib.tokenize(
        tokenizer, class_prompts(list(config.model.class_names),
                                 config.model.get("prompts", "single")), length))
    bert = ttrain.bert_config(text_cfg, len(tokenizer))
    model = build_two_tower(config.model, bert)
    init_model = build_two_tower(init_config.model, bert)
    tx, schedule = ttrain.make_optimizer(config.train)
    init_key, step_key = jax.random.split(
        jax.random.key(int(config.train.seed), impl=config.train.prng_impl))
    train_step = ttrain.make_train_step(model, tx, schedule,
                                        prompts=config.model.get("prompts", "single"))
    consts = ttrain.step_constants(class_tokens, config, step_key)
    step_fn = lambda state, batch: train_step(state, batch, consts)  # noqa: E731
    example = {k: v[:1] for k, v in arrays.items()}

    def init_state(mesh):
        return ttrain.create_state(init_model, tx, init_key, example, class_tokens, init_config,
                                   mesh)

    return step_fn, init_state, ArraySource(arrays)


def compile_step(step_fn: Callable, state: Any, batch: dict, mesh) -> Any:
    """``jit(step_fn)`` with training's shardings (state replicated and donated), compiled."""
    rep = parallel.replicated(mesh)
    spec = {k: parallel.data_sharding(mesh) for k in batch}
    return jax.jit(step_fn, in_shardings=(rep, spec), out_shardings=(rep, rep),
                   donate_argnums=0).lower(state, batch).compile()


# ----------------------------------------------------------------------------- measuring
def xla_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled program (per device for a partitioned one), from XLA."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0]
    flops = float((cost or {}).get("flops", 0.0))
    if flops <= 0:
        raise RuntimeError(f"XLA's cost analysis reports no FLOPs on {jax.default_backend()}")
    return flops


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


def matmul_program(n: int) -> tuple[Callable[[], Any], float, float]:
    """``(call, flops, xla_flops)``: one n x n float32 matmul (2 n^3 FLOPs) on fixed operands."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    return (lambda: compiled(a, b)), 2.0 * n ** 3, xla_flops(compiled)


def bench_matmul(matmul: tuple[Callable[[], Any], float, float], n: int, repeats: int) -> dict:
    """The dense float32 matmul rate: ``2 n^3`` FLOPs over the median time."""
    call, flops, xla = matmul
    median, times = median_time(call, repeats)
    return {"n": n, "dtype": "float32", "flops": flops, "xla_flops": xla,
            "median_s": median, "times_s": times, "flops_per_s": flops / median}


def bench_step(step_fn: Callable, init_state: Callable, source: ArraySource, batch_size: int,
               repeats: int, mesh, matmul: tuple | None = None) -> dict:
    """Achieved FLOP/s and images/s of a train step; the state is threaded through the calls.

    matmul: `matmul_program` output, the reference matmul, timed right before every step call so
    that each ratio compares two timings taken under the same machine load (a shared machine
    drifts between a run's parts); the reported ratio is the median of these paired ratios.
    """
    from daug_jax.data.pipeline import read

    batch = parallel.shard_batch(read(source, range(batch_size)), mesh)
    state = init_state(mesh)
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
    return out


def bench_heatmaps(config: Any, size: int, batch: int, *, targets: str, level: int,
                   num_steps: int, scale: float, repeats: int) -> dict:
    """The guided-translation program compiled whole vs dispatched step by step from Python."""
    from daug_jax.data import synthetic
    from daug_jax.heatmaps import init_models, make_heatmap_fn, to_model_space, translate_python_loop

    models = init_models(config, (size, size, 1), synthetic.CLASS_NAMES, jax.random.key(0))
    heatmap_fn = make_heatmap_fn(models.eps_fn, models.logit_fn, models.alpha_bar, targets,
                                 models.class_names, level=level, num_steps=num_steps,
                                 scale=scale, smooth_sigma=1.0, image_shape=models.image_shape)
    x = to_model_space(np.random.default_rng(0).uniform(size=(batch, size, size, 1)))
    work = batch * len(heatmap_fn.targets)
    out = {"batch": batch, "image_size": size, "targets": len(heatmap_fn.targets),
           "level": level, "ddim_steps_each_way": num_steps}
    for name, call in (("compiled", lambda: heatmap_fn(x)),
                       ("python_loop", lambda: translate_python_loop(heatmap_fn, x))):
        start = time.perf_counter()
        jax.block_until_ready(call())  # compiles: the whole program / each network call
        first = time.perf_counter() - start
        median, times = median_time(call, repeats, warmup=0)
        out[name] = {"first_call_s": first, "median_s": median, "times_s": times,
                     "images_classes_per_s": work / median}
    out["speedup"] = out["python_loop"]["median_s"] / out["compiled"]["median_s"]
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
    from daug_jax.data import synthetic

    mesh = parallel.make_mesh()
    device = jax.devices()[0]
    result: dict = {
        "device": {"platform": device.platform, "kind": device.device_kind,
                   "count": jax.device_count(), "processes": jax.process_count(),
                   "jax": jax.__version__, "host_cpus": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    dcfg = load_config(args.diffusion_config, args.diffusion_set)
    tcfg = load_config(args.towers_config, args.towers_set)
    parts = [p for p in PARTS if p in args.parts]
    rng = np.random.default_rng(0)
    matmul = matmul_program(args.matmul_n) if "matmul" in parts else None
    for part in tqdm(parts, desc="bench", unit="part"):
        if part == "matmul":
            result["matmul"] = bench_matmul(matmul, args.matmul_n, args.repeats)
        elif part == "unet":
            images = rng.uniform(size=(args.batch, args.size, args.size, 1)).astype(np.float32)
            result["unet_train_step"] = bench_step(*unet_step(dcfg, images), args.batch,
                                                   args.repeats, mesh, matmul)
        elif part == "towers":
            tcfg.train.batch_size = args.batch
            data = synthetic.generate(args.batch, image_size=args.size, seed=0)
            with tempfile.TemporaryDirectory() as workdir:
                result["towers_train_step"] = bench_step(*towers_step(tcfg, data, workdir),
                                                         args.batch, args.repeats, mesh, matmul)
        elif part == "input":
            tcfg.data.update(image_size=args.input_size, data_dir=args.data_dir,
                             num_train=max(64 if args.quick else 2048,
                                           args.batch * args.input_steps))
            result["input"] = bench_input(tcfg, tcfg.data, args.batch, args.input_steps,
                                          args.repeats, mesh)
        else:
            result["heatmaps"] = bench_heatmaps(
                dcfg, args.size, args.heatmap_batch, targets=args.targets, level=args.level,
                num_steps=args.ddim_steps, scale=3.0, repeats=args.repeats)
    result["memory"] = memory_stats()
    return result


def report(result: dict) -> str:
    """The human-readable summary printed after a run."""
    d = result["device"]
    lines = [f"bench: {d['count']} x {d['kind']} ({d['platform']}), jax {d['jax']}"]
    if "matmul" in result:
        m = result["matmul"]
        lines.append(f"  matmul {m['n']}^2 float32      {m['flops_per_s'] / 1e9:9.1f} GFLOP/s "
                     f"({m['median_s'] * 1e3:.1f} ms)")
    for key, name in (("unet_train_step", "UNet train step"), ("towers_train_step", "two-tower step")):
        if key in result:
            s = result[key]
            ratio = f", {s['ratio_to_matmul']:.2f} x matmul" if "ratio_to_matmul" in s else ""
            lines.append(f"  {name:<24} {s['flops_per_s'] / 1e9:9.1f} GFLOP/s{ratio}; "
                         f"{s['images_per_s']:.1f} images/s (batch {s['batch']}, "
                         f"{s['median_s'] * 1e3:.1f} ms/step, {s['flops_per_device'] / 1e9:.2f} "
                         f"GFLOP/step/device)")
    if "heatmaps" in result:
        h = result["heatmaps"]
        for name in ("compiled", "python_loop"):
            lines.append(f"  heatmaps {name:<15} {h[name]['images_classes_per_s']:9.2f} "
                         f"images*classes/s")
        lines.append(f"  heatmaps compiled / python loop: {h['speedup']:.2f}x")
    if "input" in result:
        i = result["input"]
        lines.append(f"  input pipeline            {i['pipeline_steps_per_s']:9.2f} steps/s vs "
                     f"{i['in_memory_steps_per_s']:.2f} from arrays in memory = "
                     f"{i['ratio']:.2f}x (two-tower step, batch {i['batch']}, "
                     f"{i['image_size']} px, {i['dataset']})")
    mem = result["memory"]
    lines.append(f"  peak host RSS {mem['host_peak_rss_bytes'] / 2 ** 20:.0f} MiB"
                 + ("" if not mem["device"] else "; device peak " + ", ".join(
                     f"{m.get('peak_bytes_in_use', 0) / 2 ** 20:.0f} MiB" for m in mem["device"])))
    return "\n".join(lines)


def main(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (a smoke run, not a measurement)")
    parser.add_argument("--batch", type=int, default=None, help="train-step batch (default 32)")
    parser.add_argument("--size", type=int, default=None, help="image size (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 10)")
    parser.add_argument("--matmul-n", type=int, default=None, help="matmul size (default 2048)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    parser.add_argument("--diffusion-config", default="diffusion")
    parser.add_argument("--diffusion-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the UNet/classifier config, e.g. unet.ch=64")
    parser.add_argument("--towers-config", default="towers")
    parser.add_argument("--towers-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--targets", default="Pleural Effusion,No Finding")
    parser.add_argument("--level", type=int, default=None, help="heatmap encode level (500)")
    parser.add_argument("--ddim-steps", type=int, default=None, help="DDIM moves each way (10)")
    parser.add_argument("--heatmap-batch", type=int, default=None, help="heatmap batch (8)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="image size of the input-pipeline part (default 64)")
    parser.add_argument("--input-steps", type=int, default=None,
                        help="steps per timed run of the input-pipeline part (default 30)")
    parser.add_argument("--data-dir", default=os.path.join("runs", "tfds"),
                        help="where the input part's synthetic_cxr dataset is (built if missing)")
    parser.add_argument("--out", default=os.path.join("runs", "bench", "bench.json"))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        parser.error(f"unknown --parts {unknown}; valid: {list(PARTS)}")
    defaults = dict(batch=32, size=32, repeats=10, matmul_n=2048, level=500, ddim_steps=10,
                    heatmap_batch=8, input_size=64, input_steps=30)
    if args.quick:
        defaults.update(batch=4, size=32, repeats=2, matmul_n=256, level=100, ddim_steps=2,
                        heatmap_batch=2, input_size=32, input_steps=3)
        # Tiny models: the smoke run checks the plumbing, not the speed of the real sizes.
        args.diffusion_set = ["unet.ch=8", "unet.channel_mult=(1,)", "unet.norm_groups=4",
                              "classifier.ch=8", "classifier.channel_mult=(1,)",
                              "classifier.norm_groups=4"] + args.diffusion_set
        args.towers_set = [
            "model.vision.resnet={'stage_sizes': (1,), 'widths': (8,), 'stem_width': 8}",
            "model.text.vocab_size=200", "model.text.hidden_size=16", "model.text.num_layers=1",
            "model.text.intermediate_size=32", "model.text.max_length=48",
            "model.embed_dim=16"] + args.towers_set
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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
