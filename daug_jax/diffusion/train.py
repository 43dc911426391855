"""Training the epsilon-UNet and the noise-aware classifier, and loading them back.

Both trainers share one loop (`_fit`): a pure ``step(state, batch, key) -> (state, metrics)``
under ``jax.jit`` (state replicated, batch split on the mesh's "data" axis, state donated),
streamed batches from `data.pipeline.train_batches` (a pure function of (seed, step)) and PRNG keys folded from the step inside the step, so a run
restored from its latest orbax checkpoint continues exactly as an uninterrupted one would.
The loss goes to ``<workdir>/log.jsonl`` and the tqdm bar every ``log_every`` steps; metrics are
fetched from the device only then, so the loop never waits on the accelerator in between.

``<workdir>/meta.json`` (also stored in every checkpoint) records the config, the image shape
and the class names, so a model is rebuilt from its workdir alone and a mismatching image gives
a clear error (`check_image_shape`).

CLI: ``daug-jax train-diffusion --config diffusion --workdir runs/diffusion [--set k=v ...]``
and ``daug-jax train-classifier --config diffusion --workdir runs/classifier``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from daug_jax import parallel
from daug_jax.checkpoint import Checkpointer
from daug_jax.data.pipeline import BatchReader, train_batches
from daug_jax.diffusion.classifier import NoiseAwareClassifier, masked_bce
from daug_jax.diffusion.schedule import alphas_cumprod, eps_loss, q_sample
from daug_jax.diffusion.unet import UNet
from daug_jax.files import write_text
from daug_jax.guard import check_finite, keep_if_finite

State = dict  # {"step": int32 [], "params", "opt_state", and "ema" for the diffusion model}

# RngBitGenerator-backed keys: on XLA:CPU, compiling the default (partitionable threefry) random
# ops of a UNet init took ~3x longer (measured 75 s vs 22 s); the stream stays a pure function
# of (seed, step).
PRNG_IMPL = "rbg"


def prng_key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl=PRNG_IMPL)


# ----------------------------------------------------------------------------- models
def _arch(cfg: ml_collections.ConfigDict) -> dict:
    """Module keyword arguments from a model config section (lists from JSON become tuples)."""
    return dict(ch=int(cfg.ch), channel_mult=tuple(cfg.channel_mult),
                num_res_blocks=int(cfg.num_res_blocks),
                attention_resolutions=tuple(cfg.attention_resolutions),
                num_heads=int(cfg.num_heads), norm_groups=int(cfg.norm_groups),
                dtype=jnp.dtype(cfg.dtype))


def make_unet(config: ml_collections.ConfigDict) -> UNet:
    return UNet(**_arch(config.unet))


def make_classifier(config: ml_collections.ConfigDict, num_classes: int) -> NoiseAwareClassifier:
    return NoiseAwareClassifier(num_classes=num_classes, **_arch(config.classifier))


def make_optimizer(tcfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW after global-norm clipping, linear warmup then constant rate (safe to extend a run)."""
    lr = optax.warmup_constant_schedule(0.0, tcfg.learning_rate, max(1, tcfg.warmup_steps))
    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip),
                       optax.adamw(lr, weight_decay=tcfg.weight_decay))


def alpha_bar_of(config: ml_collections.ConfigDict) -> np.ndarray:
    """``[T] float32`` signal fractions of the config's schedule."""
    return alphas_cumprod(config.diffusion.schedule, config.diffusion.num_steps).astype(np.float32)


# ----------------------------------------------------------------------------- train steps
def init_state(module, tx, image_shape: Sequence[int], key: jax.Array, *, ema: bool) -> State:
    """Fresh parameters (from a [1, H, W, C] dummy), optimizer state and optional EMA copy."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    params = module.init(key, x, jnp.zeros((1,), jnp.int32))["params"]
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, params)  # own buffers: the step donates both
    return state


def diffusion_step_fn(module: UNet, tx, alpha_bar: Any, ema_decay: float, *,
                      skip_nonfinite: bool = False) -> Callable:
    """``step(state, batch, key)``: one epsilon-MSE update at uniform random levels, plus EMA.

    batch["image"]: [B, H, W, C] float32 in [0, 1] (mapped to [-1, 1] here, on device).
    """
    num_steps = alpha_bar.shape[0]

    def step(state: State, batch: dict, key: jax.Array):
        x0 = batch["image"] * 2.0 - 1.0
        k_t, k_eps = jax.random.split(jax.random.fold_in(key, state["step"]))
        t = jax.random.randint(k_t, (x0.shape[0],), 0, num_steps)
        noise = jax.random.normal(k_eps, x0.shape, x0.dtype)
        x_t = q_sample(x0, t, noise, alpha_bar)

        def loss_fn(params):
            return eps_loss(module.apply({"params": params}, x_t, t), noise)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Warm-started decay (TF's num_updates rule): short CPU runs would otherwise keep a
        # large share of the random initialisation in the EMA weights.
        n = state["step"].astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
        ema = optax.incremental_update(params, state["ema"], 1.0 - decay)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if skip_nonfinite:
            (params, opt_state, ema), metrics["skipped"] = keep_if_finite(
                loss, grad_norm, (params, opt_state, ema),
                (state["params"], state["opt_state"], state["ema"]))
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}
        return new, metrics

    return step


def classifier_step_fn(module: NoiseAwareClassifier, tx, alpha_bar: Any,
                       max_level: int, *, skip_nonfinite: bool = False) -> Callable:
    """``step(state, batch, key)``: masked BCE on x_t at levels uniform in [0, max_level].

    batch["image"]: [B, H, W, C] float32 in [0, 1]; batch["labels"], batch["label_mask"]: [B, K]
    float32 in {0, 1} (`daug_jax.losses.labels_and_mask`, the towers' label convention).
    """
    def step(state: State, batch: dict, key: jax.Array):
        x0 = batch["image"] * 2.0 - 1.0
        labels, mask = batch["labels"], batch["label_mask"]
        k_t, k_eps = jax.random.split(jax.random.fold_in(key, state["step"]))
        t = jax.random.randint(k_t, (x0.shape[0],), 0, max_level + 1)
        x_t = q_sample(x0, t, jax.random.normal(k_eps, x0.shape, x0.dtype), alpha_bar)

        def loss_fn(params):
            logits = module.apply({"params": params}, x_t, t)
            return masked_bce(logits, labels, mask), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        known = mask > 0
        hits = jnp.where(known, (logits > 0) == (labels > 0.5), False)
        acc = jnp.sum(hits) / jnp.maximum(jnp.sum(known), 1)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": grad_norm}
        if skip_nonfinite:
            (params, opt_state), metrics["skipped"] = keep_if_finite(
                loss, grad_norm, (params, opt_state), (state["params"], state["opt_state"]))
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new, metrics

    return step


@functools.lru_cache(maxsize=8)
def _programs(kind: str, spec: str, mesh) -> tuple[Any, Callable, Callable]:
    """``(module, init, step)`` jitted for the model/optimizer described by ``spec`` (JSON).

    Cached on the spec because XLA:CPU needs tens of seconds per UNet compile: resuming, or
    training a second time in the same process, reuses the compiled programs.
    """
    cfg = ml_collections.ConfigDict(json.loads(spec))
    tx, alpha_bar = make_optimizer(cfg.train), alpha_bar_of(cfg)
    skip = bool(cfg.train.get("skip_nonfinite", False))  # see `daug_jax.guard`
    rep, split = parallel.replicated(mesh), parallel.data_sharding(mesh)
    if kind == "diffusion":
        module = make_unet(cfg)
        step = diffusion_step_fn(module, tx, alpha_bar, cfg.train.ema_decay, skip_nonfinite=skip)
        batch_spec = {"image": split}
    else:
        module = make_classifier(cfg, cfg.num_classes)
        step = classifier_step_fn(module, tx, alpha_bar, cfg.max_level, skip_nonfinite=skip)
        batch_spec = {"image": split, "labels": split, "label_mask": split}
    init = jax.jit(lambda key, shape: init_state(module, tx, shape, key, ema=kind == "diffusion"),
                   static_argnums=1, out_shardings=rep)
    step = jax.jit(step, in_shardings=(rep, batch_spec, rep), out_shardings=(rep, rep),
                   donate_argnums=0)
    return module, init, step


def trained_max_level(config: ml_collections.ConfigDict) -> int:
    """The highest level the classifier of ``config`` is trained at: ``classifier.max_level``
    (None: every level, T - 1), checked to lie in [0, T - 1]."""
    num_steps, max_level = config.diffusion.num_steps, config.classifier.max_level
    max_level = num_steps - 1 if max_level is None else int(max_level)
    if not 0 <= max_level < num_steps:
        raise ValueError(f"classifier.max_level={max_level} outside [0, {num_steps - 1}]")
    return max_level


def _spec(config: ml_collections.ConfigDict, kind: str, num_classes: int = 0) -> str:
    """The parts of ``config`` that shape the compiled programs, as canonical JSON."""
    section, train = ("unet", "unet_train") if kind == "diffusion" else ("classifier", "classifier_train")
    spec = {"diffusion": config.diffusion.to_dict(), section: config[section].to_dict(),
            "train": {k: v for k, v in config[train].to_dict().items()
                      if k not in ("steps", "batch_size", "save_every", "log_every", "seed")}}
    if kind == "classifier":
        spec.update(num_classes=num_classes, max_level=trained_max_level(config))
    return json.dumps(spec, sort_keys=True)


# ----------------------------------------------------------------------------- metadata
def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj))  # tuples -> lists, so stored and fresh metas compare equal


def _check_resume(saved: dict, meta: dict, workdir: str) -> None:
    """A checkpoint may only be resumed by the same kind of model, architecture, schedule and data shape."""
    for key in ("kind", "image_shape", "class_names"):
        if saved.get(key) != meta.get(key):
            raise ValueError(f"{workdir}: checkpoint has {key}={saved.get(key)!r}, this run has "
                             f"{meta.get(key)!r}; use another --workdir")
    for section in ("diffusion", meta["model_section"]):
        old, new = saved["config"].get(section) or {}, meta["config"].get(section) or {}
        diff = [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff:
            raise ValueError(f"{workdir}: the checkpoint was trained with another config "
                             f"({'; '.join(diff)}); use another --workdir")


def check_image_shape(config: ml_collections.ConfigDict, x: Any) -> None:
    """Raises if ``x: [B, H, W, C]`` does not match the images a loaded model was trained on."""
    expected = tuple(config.image_shape)
    if np.ndim(x) != 4 or tuple(np.shape(x)[1:]) != expected:
        raise ValueError(f"model in {config.get('workdir', '?')} was trained on images of shape "
                         f"[B, {', '.join(map(str, expected))}], got {list(np.shape(x))}")


def _abstract_state(init: Callable, image_shape: tuple, mesh) -> Any:
    """Shapes, dtypes and (replicated) shardings of a fresh state, without running init."""
    rep = parallel.replicated(mesh)
    shapes = init.eval_shape(prng_key(0), image_shape)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


# ----------------------------------------------------------------------------- the loop
def _fit(*, name: str, spec: str, meta: dict, reader: BatchReader,
         tcfg: ml_collections.ConfigDict, workdir: str) -> State:
    """Trains from the latest checkpoint in ``workdir`` (or from scratch) up to ``tcfg.steps``."""
    mesh = parallel.make_mesh()
    _, init, step = _programs(meta["kind"], spec, mesh)
    image_shape = tuple(meta["image_shape"])
    fields = ("image", "labels", "label_mask") if meta["kind"] == "classifier" else ("image",)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tcfg.save_every)
    meta_path, log_path = os.path.join(workdir, "meta.json"), os.path.join(workdir, "log.jsonl")
    if ckpt.latest_step() and os.path.exists(meta_path):
        with open(meta_path) as f:  # before restoring: a changed architecture would not fit
            _check_resume(json.load(f), meta, workdir)
    # Restored before the stream starts: a damaged newest checkpoint falls back to an older step.
    state, _, start = ckpt.restore_or(_abstract_state(init, image_shape, mesh))
    batches = train_batches(reader, int(tcfg.batch_size), seed=int(tcfg.seed), start_step=start,
                            num_threads=int(tcfg.get("input_threads", 2)))
    first = next(batches)  # bad input fails here, before anything is written
    if tuple(first["image"].shape[1:]) != image_shape:
        raise ValueError(f"{name}: records have images of shape {list(first['image'].shape[1:])}, "
                         f"the dataset declares {list(image_shape)}")
    os.makedirs(workdir, exist_ok=True)
    if not start:
        state = init(prng_key(tcfg.seed), image_shape)
    lead = jax.process_index() == 0
    if lead:
        write_text(meta_path, json.dumps(meta, indent=1))
        if os.path.exists(log_path):  # rows past the restored step are recomputed below
            with open(log_path) as f:
                rows = [r for r in f if r.strip() and json.loads(r)["step"] <= start]
            write_text(log_path, "".join(rows))

    # Created by a jitted program so that every process holds its shard of the replicated key
    # (device_put of a host value onto a multi-process sharding is refused).
    key = jax.jit(lambda: prng_key(tcfg.seed + 1), out_shardings=parallel.replicated(mesh))()
    pending, rows, t_first, saved = [], [], None, start or None
    bar = tqdm(range(start, tcfg.steps), initial=start, total=tcfg.steps, desc=name,
               disable=not lead)
    for i in bar:
        host = first if i == start else next(batches)
        batch = parallel.shard_batch({k: host[k] for k in fields}, mesh)
        state, metrics = step(state, batch, key)
        pending.append((i + 1, metrics))
        if i == start:
            jax.block_until_ready(metrics)   # the first step includes compilation
            t_first = time.perf_counter()
        done = i + 1
        logs = done % tcfg.log_every == 0 or done == tcfg.steps
        saves = done % tcfg.save_every == 0 or done == tcfg.steps
        if logs or saves:
            # Checked before anything is saved: a checkpoint never holds a non-finite update.
            rows += [{"step": s, **{k: float(v) for k, v in m.items()}}
                     for s, m in jax.device_get(pending)]
            pending = []
            check_finite(rows, name=name, workdir=workdir, last_saved=saved)
        if logs:
            if lead:
                with open(log_path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
            rows = []
        if saves:
            ckpt.save(done, state, meta, force=True)
            saved = done
    bar.close()
    ckpt.close()
    if t_first is not None and tcfg.steps - start > 1 and lead:
        jax.block_until_ready(state)
        per = (time.perf_counter() - t_first) / (tcfg.steps - start - 1)
        tqdm.write(f"{name}: steps {start}->{tcfg.steps}, {per:.3f} s/step after compilation "
                   f"(batch {tcfg.batch_size}, {jax.device_count()} {jax.default_backend()} device(s))")
    return state


# ----------------------------------------------------------------------------- public API
def _image_shape(source: Any) -> list[int]:
    """(H, W, C) of the records of ``source`` (its first record; every batch is checked)."""
    if len(source) == 0:
        raise ValueError("the training split is empty")
    return [int(s) for s in np.shape(source[0]["image"])]


def train_diffusion(config: ml_collections.ConfigDict, source: Any, workdir: str) -> Any:
    """Trains (or resumes) the epsilon-UNet on the films of ``source``; returns the EMA parameters.

    source: random-access split (`daug_jax.data.registry`, or `ArraySource`) whose records have
    "image" [H, W, C] uint8, or float32 in [0, 1]; read in streamed batches.
    """
    meta = {"kind": "diffusion", "model_section": "unet", "config": _json(config.to_dict()),
            "image_shape": _image_shape(source), "class_names": None}
    state = _fit(name="train-diffusion", spec=_spec(config, "diffusion"), meta=meta,
                 reader=BatchReader(source), tcfg=config.unet_train, workdir=workdir)
    return state["ema"]


def train_classifier(config: ml_collections.ConfigDict, source: Any, workdir: str, *,
                     class_names: Sequence[str], label_policy: str = "ignore") -> Any:
    """Trains (or resumes) the noise-aware classifier; returns its parameters.

    source: records with "image" (as for `train_diffusion`), "labels" int [K] in {-1, 0, 1} and
    optionally "missing" bool [K]; class_names: the K label columns, in order.  Labels become
    targets and a loss mask with `labels_and_mask` under ``label_policy``, as for the towers.
    """
    class_names = [str(c) for c in class_names]
    width = int(np.shape(source[0]["labels"])[-1]) if len(source) else 0
    if len(class_names) != width:
        raise ValueError(f"{len(class_names)} class names {class_names} for {width} label columns")
    spec = _spec(config, "classifier", num_classes=width)
    meta = {"kind": "classifier", "model_section": "classifier", "config": _json(config.to_dict()),
            "image_shape": _image_shape(source), "class_names": class_names}
    reader = BatchReader(source, label_columns=range(width), label_policy=label_policy)
    state = _fit(name="train-classifier", spec=spec, meta=meta, reader=reader,
                 tcfg=config.classifier_train, workdir=workdir)
    return state["params"]


def _load(workdir: str, kind: str, mesh=None):
    path = os.path.join(workdir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trained {kind} model in {workdir} (missing meta.json)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("kind") != kind:
        raise ValueError(f"{workdir} holds a {meta.get('kind')} model, not a {kind} model")
    config = ml_collections.ConfigDict(meta["config"])
    spec = _spec(config, kind, num_classes=len(meta["class_names"] or ()))
    mesh = parallel.make_mesh() if mesh is None else mesh
    module, init, _ = _programs(kind, spec, mesh)
    config.image_shape = tuple(meta["image_shape"])
    config.class_names = tuple(meta["class_names"] or ())
    config.workdir = workdir
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    state, _ = ckpt.restore(_abstract_state(init, config.image_shape, mesh))
    ckpt.close()
    return module, state["ema" if kind == "diffusion" else "params"], config


def load_diffusion(workdir: str, mesh=None) -> tuple[UNet, Any, ml_collections.ConfigDict]:
    """``(unet, ema_params, config)`` from the latest checkpoint; ``config.image_shape`` is (H, W, C).

    The parameters are replicated over ``mesh`` (default: every device of every process).
    """
    return _load(workdir, "diffusion", mesh)


def load_classifier(workdir: str, mesh=None) -> tuple[NoiseAwareClassifier, Any,
                                                      ml_collections.ConfigDict]:
    """``(classifier, params, config)``; ``config.class_names`` orders the logits."""
    return _load(workdir, "classifier", mesh)


# ----------------------------------------------------------------------------- CLI
def main(command: str, argv: list[str]) -> int:
    from daug_jax.config import load_config
    from daug_jax.data import registry
    from daug_jax.lock import workdir_lock

    kind = "classifier" if command == "train-classifier" else "diffusion"
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}")
    parser.add_argument("--config", default="diffusion", help="experiments/<name>.py or a .py path")
    parser.add_argument("--workdir", default=f"runs/{kind}")
    registry.add_data_args(parser)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set unet_train.steps=200 (repeatable)")
    args = parser.parse_args(argv)
    parallel.maybe_initialize_distributed()
    config = load_config(args.config, args.set)
    registry.apply_data_args(config, args)
    dataset = registry.open_dataset(config.data)
    source = dataset.source(config.data.get("train_split", "train"))
    with workdir_lock(args.workdir, what=command):  # one run per workdir
        if kind == "diffusion":
            train_diffusion(config, source, args.workdir)
        else:
            train_classifier(config, source, args.workdir, class_names=dataset.class_names,
                             label_policy=config.data.get("label_policy", "ignore"))
    print(f"{command}: {dataset.name} ({len(source)} films); checkpoints, meta.json and "
          f"log.jsonl in {args.workdir}")
    return 0
