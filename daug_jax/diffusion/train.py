"""Training the epsilon-UNet and the noise-aware classifier, and loading them back.

Both trainers share one loop (`_fit`): a pure ``step(state, batch, key) -> (state, metrics)``
under ``jax.jit`` (state replicated, batch split on the mesh's "data" axis, state donated),
batches from `Loader.batch(step)` and PRNG keys folded from the step inside the step, so a run
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
from daug_jax.data.pipeline import ArraySource, Loader
from daug_jax.diffusion.classifier import NoiseAwareClassifier, masked_bce
from daug_jax.diffusion.schedule import alphas_cumprod, eps_loss, q_sample
from daug_jax.diffusion.unet import UNet
from daug_jax.files import write_text

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


def diffusion_step_fn(module: UNet, tx, alpha_bar: Any, ema_decay: float) -> Callable:
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
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def classifier_step_fn(module: NoiseAwareClassifier, tx, alpha_bar: Any,
                       max_level: int) -> Callable:
    """``step(state, batch, key)``: masked BCE on x_t at levels uniform in [0, max_level].

    batch["image"]: [B, H, W, C] float32 in [0, 1]; batch["labels"]: [B, K] int in {-1, 0, 1}.
    """
    def step(state: State, batch: dict, key: jax.Array):
        x0 = batch["image"] * 2.0 - 1.0
        labels = batch["labels"].astype(jnp.int32)
        k_t, k_eps = jax.random.split(jax.random.fold_in(key, state["step"]))
        t = jax.random.randint(k_t, (x0.shape[0],), 0, max_level + 1)
        x_t = q_sample(x0, t, jax.random.normal(k_eps, x0.shape, x0.dtype), alpha_bar)

        def loss_fn(params):
            logits = module.apply({"params": params}, x_t, t)
            return masked_bce(logits, labels), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        known = labels >= 0
        hits = jnp.where(known, (logits > 0) == (labels == 1), False)
        acc = jnp.sum(hits) / jnp.maximum(jnp.sum(known), 1)
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new, {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads)}

    return step


@functools.lru_cache(maxsize=8)
def _programs(kind: str, spec: str, mesh) -> tuple[Any, Callable, Callable]:
    """``(module, init, step)`` jitted for the model/optimizer described by ``spec`` (JSON).

    Cached on the spec because XLA:CPU needs tens of seconds per UNet compile: resuming, or
    training a second time in the same process, reuses the compiled programs.
    """
    cfg = ml_collections.ConfigDict(json.loads(spec))
    tx, alpha_bar = make_optimizer(cfg.train), alpha_bar_of(cfg)
    rep, split = parallel.replicated(mesh), parallel.data_sharding(mesh)
    if kind == "diffusion":
        module = make_unet(cfg)
        step = diffusion_step_fn(module, tx, alpha_bar, cfg.train.ema_decay)
        batch_spec = {"image": split}
    else:
        module = make_classifier(cfg, cfg.num_classes)
        step = classifier_step_fn(module, tx, alpha_bar, cfg.max_level)
        batch_spec = {"image": split, "labels": split}
    init = jax.jit(lambda key, shape: init_state(module, tx, shape, key, ema=kind == "diffusion"),
                   static_argnums=1, out_shardings=rep)
    step = jax.jit(step, in_shardings=(rep, batch_spec, rep), out_shardings=(rep, rep),
                   donate_argnums=0)
    return module, init, step


def _spec(config: ml_collections.ConfigDict, kind: str, num_classes: int = 0) -> str:
    """The parts of ``config`` that shape the compiled programs, as canonical JSON."""
    section, train = ("unet", "unet_train") if kind == "diffusion" else ("classifier", "classifier_train")
    spec = {"diffusion": config.diffusion.to_dict(), section: config[section].to_dict(),
            "train": {k: v for k, v in config[train].to_dict().items()
                      if k not in ("steps", "batch_size", "save_every", "log_every", "seed")}}
    if kind == "classifier":
        num_steps, max_level = config.diffusion.num_steps, config.classifier.max_level
        max_level = num_steps - 1 if max_level is None else int(max_level)
        if not 0 <= max_level < num_steps:
            raise ValueError(f"classifier.max_level={max_level} outside [0, {num_steps - 1}]")
        spec.update(num_classes=num_classes, max_level=max_level)
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


def _validate_images(images: Any) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"images must be in [0, 1] (they are mapped to [-1, 1] for the model); "
                         f"got range [{lo:.3f}, {hi:.3f}]")
    return images


def _abstract_state(init: Callable, image_shape: tuple, mesh) -> Any:
    """Shapes, dtypes and (replicated) shardings of a fresh state, without running init."""
    rep = parallel.replicated(mesh)
    shapes = init.eval_shape(prng_key(0), image_shape)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


# ----------------------------------------------------------------------------- the loop
def _fit(*, name: str, spec: str, meta: dict, source: ArraySource,
         tcfg: ml_collections.ConfigDict, workdir: str) -> State:
    """Trains from the latest checkpoint in ``workdir`` (or from scratch) up to ``tcfg.steps``."""
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.make_mesh()
    _, init, step = _programs(meta["kind"], spec, mesh)
    image_shape = tuple(meta["image_shape"])
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tcfg.save_every)
    meta_path, log_path = os.path.join(workdir, "meta.json"), os.path.join(workdir, "log.jsonl")
    start = ckpt.latest_step() or 0
    if start:
        if os.path.exists(meta_path):
            with open(meta_path) as f:  # before restoring: a changed architecture would not fit
                _check_resume(json.load(f), meta, workdir)
        state, _ = ckpt.restore(_abstract_state(init, image_shape, mesh), start)
    else:
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
    fields = ("image", "labels") if meta["kind"] == "classifier" else ("image",)
    loader = Loader(source, tcfg.batch_size, seed=tcfg.seed)
    pending, t_first = [], None
    bar = tqdm(range(start, tcfg.steps), initial=start, total=tcfg.steps, desc=name,
               disable=not lead)
    for i in bar:
        host = loader.batch(i)
        batch = parallel.shard_batch({k: host[k] for k in fields}, mesh)
        state, metrics = step(state, batch, key)
        pending.append((i + 1, metrics))
        if i == start:
            jax.block_until_ready(metrics)   # the first step includes compilation
            t_first = time.perf_counter()
        done = i + 1
        if done % tcfg.log_every == 0 or done == tcfg.steps:
            rows = [{"step": s, **{k: float(v) for k, v in m.items()}}
                    for s, m in jax.device_get(pending)]
            pending = []
            if lead:
                with open(log_path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
        if done % tcfg.save_every == 0 or done == tcfg.steps:
            ckpt.save(done, state, meta, force=True)
    bar.close()
    ckpt.close()
    if t_first is not None and tcfg.steps - start > 1 and lead:
        jax.block_until_ready(state)
        per = (time.perf_counter() - t_first) / (tcfg.steps - start - 1)
        tqdm.write(f"{name}: steps {start}->{tcfg.steps}, {per:.3f} s/step after compilation "
                   f"(batch {tcfg.batch_size}, {jax.device_count()} {jax.default_backend()} device(s))")
    return state


# ----------------------------------------------------------------------------- public API
def train_diffusion(config: ml_collections.ConfigDict, images: Any, workdir: str) -> Any:
    """Trains (or resumes) the epsilon-UNet on ``images: [N, H, W, C] float32 in [0, 1]``.

    Returns the EMA parameters (what sampling should use).
    """
    images = _validate_images(images)
    meta = {"kind": "diffusion", "model_section": "unet", "config": _json(config.to_dict()),
            "image_shape": list(images.shape[1:]), "class_names": None}
    state = _fit(name="train-diffusion", spec=_spec(config, "diffusion"), meta=meta,
                 source=ArraySource({"image": images}), tcfg=config.unet_train, workdir=workdir)
    return state["ema"]


def train_classifier(config: ml_collections.ConfigDict, images: Any, labels: Any, workdir: str,
                     *, class_names: Sequence[str] | None = None) -> Any:
    """Trains (or resumes) the noise-aware classifier; returns its parameters.

    images: [N, H, W, C] float32 in [0, 1]; labels: [N, K] int in {-1, 0, 1} (-1 = uncertain,
    masked); class_names: K names (default: the synthetic benchmark's classes).
    """
    images = _validate_images(images)
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be [N={images.shape[0]}, K], got shape {labels.shape}")
    bad = ~np.isin(labels, (-1, 0, 1))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ValueError(f"labels must be in {{-1, 0, 1}}; labels[{row}, {col}] = {labels[row, col]}")
    if class_names is None:
        from daug_jax.data.synthetic import CLASS_NAMES as class_names
    if len(class_names) != labels.shape[1]:
        raise ValueError(f"{len(class_names)} class names {list(class_names)} for "
                         f"{labels.shape[1]} label columns")
    spec = _spec(config, "classifier", num_classes=labels.shape[1])
    meta = {"kind": "classifier", "model_section": "classifier", "config": _json(config.to_dict()),
            "image_shape": list(images.shape[1:]), "class_names": list(class_names)}
    source = ArraySource({"image": images, "labels": labels.astype(np.int8)})
    state = _fit(name="train-classifier", spec=spec, meta=meta, source=source,
                 tcfg=config.classifier_train, workdir=workdir)
    return state["params"]


def _load(workdir: str, kind: str):
    path = os.path.join(workdir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trained {kind} model in {workdir} (missing meta.json)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("kind") != kind:
        raise ValueError(f"{workdir} holds a {meta.get('kind')} model, not a {kind} model")
    config = ml_collections.ConfigDict(meta["config"])
    spec = _spec(config, kind, num_classes=len(meta["class_names"] or ()))
    mesh = parallel.make_mesh()
    module, init, _ = _programs(kind, spec, mesh)
    config.image_shape = tuple(meta["image_shape"])
    config.class_names = tuple(meta["class_names"] or ())
    config.workdir = workdir
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    state, _ = ckpt.restore(_abstract_state(init, config.image_shape, mesh))
    ckpt.close()
    return module, state["ema" if kind == "diffusion" else "params"], config


def load_diffusion(workdir: str) -> tuple[UNet, Any, ml_collections.ConfigDict]:
    """``(unet, ema_params, config)`` from the latest checkpoint; ``config.image_shape`` is (H, W, C)."""
    return _load(workdir, "diffusion")


def load_classifier(workdir: str) -> tuple[NoiseAwareClassifier, Any, ml_collections.ConfigDict]:
    """``(classifier, params, config)``; ``config.class_names`` orders the logits."""
    return _load(workdir, "classifier")


# ----------------------------------------------------------------------------- CLI
def main(command: str, argv: list[str]) -> int:
    from daug_jax.config import load_config
    from daug_jax.data import synthetic

    kind = "classifier" if command == "train-classifier" else "diffusion"
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}")
    parser.add_argument("--config", default="diffusion", help="experiments/<name>.py or a .py path")
    parser.add_argument("--workdir", default=f"runs/{kind}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set unet_train.steps=200 (repeatable)")
    args = parser.parse_args(argv)
    parallel.maybe_initialize_distributed()
    config = load_config(args.config, args.set)
    data = synthetic.generate(config.data.num_train, image_size=config.data.image_size,
                              seed=config.data.seed, progress=True)
    if kind == "diffusion":
        train_diffusion(config, data["image"], args.workdir)
    else:
        train_classifier(config, data["image"], data["labels"], args.workdir,
                         class_names=synthetic.CLASS_NAMES)
    print(f"{command}: checkpoints, meta.json and log.jsonl in {args.workdir}")
    return 0
