"""Training the epsilon-UNet and the noise-aware classifier, and loading them back.

Both train through the shared loop (`daug_jax.loop`): a pure ``step(state, batch, key) ->
(state, metrics)`` under ``jax.jit`` (state replicated, batch split on the mesh's "data" axis,
state donated) over streamed batches (`data.pipeline.train_batches`, a pure function of (seed,
step)); PRNG keys are folded from the step inside the step, so a run restored from its latest
orbax checkpoint continues exactly as an uninterrupted one would.  Every step's metrics go to
``<workdir>/log.jsonl``, written every ``log_every`` steps.

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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from daug_jax import loop, parallel
from daug_jax.checkpoint import Checkpointer
from daug_jax.data.pipeline import BatchReader, train_batches
from daug_jax.diffusion.classifier import NoiseAwareClassifier
from daug_jax.diffusion.schedule import alphas_cumprod
from daug_jax.diffusion.unet import UNet
from daug_jax.files import as_json, write_text
from daug_jax.diffusion.steps import (  # noqa: F401  (the steps: re-exported)
    State, classifier_step_fn, diffusion_step_fn, init_state)

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
    tx, _ = loop.adamw(learning_rate=tcfg.learning_rate, warmup=max(1, tcfg.warmup_steps),
                       grad_clip=tcfg.grad_clip, weight_decay=tcfg.weight_decay)
    return tx


def alpha_bar_of(config: ml_collections.ConfigDict) -> np.ndarray:
    """``[T] float32`` signal fractions of the config's schedule."""
    return alphas_cumprod(config.diffusion.schedule, config.diffusion.num_steps).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _model_fns(kind: str, spec: str) -> tuple[Any, Callable, Callable, dict]:
    """``(module, init(key, shape), step(state, batch, key), batch fields)`` for the
    model/optimizer described by ``spec`` (JSON), as plain functions.

    Kept per spec so that the same function objects come back: jitting them again (a resumed
    run, or loading a model just trained in the same process) reuses JAX's traced and compiled
    programs instead of another tens-of-seconds UNet compile on XLA:CPU.
    """
    cfg = ml_collections.ConfigDict(json.loads(spec))
    tx, alpha_bar = make_optimizer(cfg.train), alpha_bar_of(cfg)
    skip = bool(cfg.train.get("skip_nonfinite", False))  # see `daug_jax.guard`
    if kind == "diffusion":
        module = make_unet(cfg)
        step = diffusion_step_fn(module, tx, alpha_bar, cfg.train.ema_decay, skip_nonfinite=skip)
        fields = ("image",)
    else:
        module = make_classifier(cfg, cfg.num_classes)
        step = classifier_step_fn(module, tx, alpha_bar, cfg.max_level, skip_nonfinite=skip)
        fields = ("image", "labels", "label_mask")
    init = functools.partial(_init, module, tx, ema=kind == "diffusion")
    return module, init, step, fields


def _init(module, tx, key, shape, *, ema):
    return init_state(module, tx, shape, key, ema=ema)


def _programs(kind: str, spec: str, mesh) -> tuple[Any, Callable, Callable]:
    """``(module, init, step)``: `_model_fns` jitted for ``mesh`` (state replicated, batch split
    over its "data" axis, state donated)."""
    module, init, step, fields = _model_fns(kind, spec)
    rep, split = parallel.replicated(mesh), parallel.data_sharding(mesh)
    init = jax.jit(init, static_argnums=1, out_shardings=rep)
    step = jax.jit(step, in_shardings=(rep, {k: split for k in fields}, rep),
                   out_shardings=(rep, rep), donate_argnums=0)
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
def _compared(meta: dict) -> dict:
    """What a checkpoint and the run resuming it must share: the kind of model, the data's
    shape and classes, the schedule and the architecture."""
    fields = {k: meta.get(k) for k in ("kind", "image_shape", "class_names")}
    for section in ("diffusion", meta["model_section"]):
        for k, v in (meta["config"].get(section) or {}).items():
            fields[f"{section}.{k}"] = v
    return fields


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


# ----------------------------------------------------------------------------- training
def _fit(*, name: str, spec: str, meta: dict, reader: BatchReader,
         tcfg: ml_collections.ConfigDict, workdir: str) -> State:
    """Trains from the latest checkpoint in ``workdir`` (or from scratch) up to ``tcfg.steps``
    with the shared loop (`daug_jax.loop`)."""
    mesh = parallel.make_mesh()
    _, init, step = _programs(meta["kind"], spec, mesh)
    image_shape = tuple(meta["image_shape"])
    fields = _model_fns(meta["kind"], spec)[3]
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tcfg.save_every)
    # Restored before the stream starts: a damaged newest checkpoint falls back to an older step.
    state, start = loop.resume(ckpt, _abstract_state(init, image_shape, mesh), meta, workdir,
                               _compared)
    batches = train_batches(reader, int(tcfg.batch_size), seed=int(tcfg.seed), start_step=start,
                            num_threads=int(tcfg.get("input_threads", 2)))
    first = next(batches)  # bad input fails here, before anything is written
    if tuple(first["image"].shape[1:]) != image_shape:
        raise ValueError(f"{name}: records have images of shape {list(first['image'].shape[1:])}, "
                         f"the dataset declares {list(image_shape)}")
    os.makedirs(workdir, exist_ok=True)
    if not start:
        state = init(prng_key(tcfg.seed), image_shape)
    if jax.process_index() == 0:
        write_text(os.path.join(workdir, "meta.json"), json.dumps(meta, indent=1))
    # Created by a jitted program so that every process holds its shard of the replicated key
    # (device_put of a host value onto a multi-process sharding is refused).
    key = jax.jit(lambda: prng_key(tcfg.seed + 1), out_shardings=parallel.replicated(mesh))()

    def run_step(state, host):
        return step(state, parallel.shard_batch({k: host[k] for k in fields}, mesh), key)

    job = loop.Job(name=name, workdir=workdir, steps=int(tcfg.steps),
                   log_every=int(tcfg.log_every), save_every=int(tcfg.save_every),
                   log_file="log.jsonl")
    state, _ = loop.fit(job, state, run_step, batches, start=start, ckpt=ckpt, meta=meta,
                        first=first)
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
    meta = {"kind": "diffusion", "model_section": "unet", "config": as_json(config.to_dict()),
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
    meta = {"kind": "classifier", "model_section": "classifier", "config": as_json(config.to_dict()),
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
    from daug_jax.data import registry
    from daug_jax.lock import workdir_lock

    kind = "classifier" if command == "train-classifier" else "diffusion"
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}")
    registry.add_run_args(parser, config="diffusion", workdir=f"runs/{kind}",
                          example="unet_train.steps=200")
    args = parser.parse_args(argv)
    config, dataset = registry.open_run(args)
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
