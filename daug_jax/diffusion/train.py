"""Training the epsilon-UNet and the noise-aware classifier, and loading them back.

    daug-jax train-diffusion  --config diffusion --workdir runs/diffusion [--set k=v ...]
    daug-jax train-classifier --config diffusion --workdir runs/classifier

Both are one pure ``step(state, batch, key) -> (state, metrics)`` (`diffusion_step_fn`,
`classifier_step_fn`) under ``jax.jit`` (state replicated, batch split on the mesh's "data"
axis, state donated), run by the shared loop (`daug_jax.loop`: a rerun resumes exactly).  Every
step's metrics go to ``<workdir>/log.jsonl``.

``<workdir>/meta.json`` (also stored in every checkpoint) records the config, the image shape
and the class names, so a model is rebuilt from its workdir alone (a film of another shape is
refused where it is translated, `heatmaps.check_images`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from daug_jax import loop, parallel
from daug_jax.checkpoint import Checkpointer
from daug_jax.data import registry
from daug_jax.data.registry import NO_FINDING
from daug_jax.data.pipeline import BatchReader, train_batches
from daug_jax.diffusion.schedule import alphas_cumprod, eps_loss, q_sample, to_model_space
from daug_jax.diffusion.unet import DISEASED, HEALTHY, NULL_LABEL, NoiseAwareClassifier, UNet
from daug_jax.files import as_json, read_json, write_json
from daug_jax.lock import workdir_lock
from daug_jax.losses import masked_bce

State = dict  # {"step": int32 [], "params", "opt_state", and "ema" for the diffusion model}


# ----------------------------------------------------------------------------- models
def _arch(cfg: ml_collections.ConfigDict) -> dict:
    """Module keyword arguments from a model config section (lists from JSON become tuples)."""
    return dict(ch=int(cfg.ch), channel_mult=tuple(cfg.channel_mult),
                num_res_blocks=int(cfg.num_res_blocks),
                attention_resolutions=tuple(cfg.attention_resolutions),
                num_heads=int(cfg.num_heads), norm_groups=int(cfg.norm_groups),
                dtype=jnp.dtype(cfg.dtype))


def make_unet(config: ml_collections.ConfigDict) -> UNet:
    """The epsilon-UNet of ``config.unet``, conditioned on the film's healthy / diseased side
    when ``unet.class_cond``."""
    return UNet(**_arch(config.unet), num_labels=2 if config.unet.class_cond else 0)


def make_classifier(config: ml_collections.ConfigDict, num_classes: int) -> NoiseAwareClassifier:
    return NoiseAwareClassifier(num_classes=num_classes, **_arch(config.classifier))


def make_optimizer(tcfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW after global-norm clipping, linear warmup then constant rate (safe to extend a run)."""
    return loop.adamw(learning_rate=tcfg.learning_rate, warmup=max(1, tcfg.warmup_steps),
                      grad_clip=tcfg.grad_clip, weight_decay=tcfg.weight_decay)[0]


def alpha_bar_of(config: ml_collections.ConfigDict) -> np.ndarray:
    """``[T] float32`` signal fractions of the config's schedule."""
    return alphas_cumprod(config.diffusion.schedule, config.diffusion.num_steps).astype(np.float32)


def trained_max_level(config: ml_collections.ConfigDict) -> int:
    """The highest level the classifier of ``config`` is trained at: ``classifier.max_level``
    (None: every level, T - 1), checked to lie in [0, T - 1]."""
    num_steps, max_level = config.diffusion.num_steps, config.classifier.max_level
    max_level = num_steps - 1 if max_level is None else int(max_level)
    if not 0 <= max_level < num_steps:
        raise ValueError(f"classifier.max_level={max_level} outside [0, {num_steps - 1}]")
    return max_level


# ----------------------------------------------------------------------------- steps
def init_state(module, tx, image_shape: Sequence[int], key: jax.Array, *, ema: bool) -> State:
    """Fresh parameters (from a [1, H, W, C] dummy), optimizer state and optional EMA copy."""
    x, t = jnp.zeros((1, *image_shape), jnp.float32), jnp.zeros((1,), jnp.int32)
    labels = (t,) if getattr(module, "num_labels", 0) else ()  # a class-conditional UNet's
    params = module.init(key, x, t, *labels)["params"]
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, params)  # own buffers: the step donates both
    return state


def _noised(image: jax.Array, key: jax.Array, step: jax.Array, alpha_bar: Any,
            max_level: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Films [B, H, W, C] in [0, 1] -> (x_t, t [B] uniform in [0, max_level], the noise): the
    step's draws, from ``key`` folded with the step number."""
    x0 = to_model_space(image)
    k_t, k_eps = jax.random.split(jax.random.fold_in(key, step))
    t = jax.random.randint(k_t, (x0.shape[0],), 0, max_level + 1)
    noise = jax.random.normal(k_eps, x0.shape, x0.dtype)
    return q_sample(x0, t, noise, alpha_bar), t, noise


def _update(tx, state: State, grads: Any, loss: jax.Array, skip_nonfinite: bool,
            ema: Callable | None = None) -> tuple[State, dict]:
    """The optimizer update (and the EMA that follows the parameters); with ``skip_nonfinite``
    a non-finite step leaves all of it as it was (`loop.keep_if_finite`)."""
    params, opt_state, grad_norm = loop.apply_update(tx, state["params"], state["opt_state"], grads)
    new = {"params": params, "opt_state": opt_state}
    if ema is not None:
        new["ema"] = ema(params)
    metrics = {"grad_norm": grad_norm}
    if skip_nonfinite:
        new, metrics["skipped"] = loop.keep_if_finite(loss, grad_norm, new,
                                                      {k: state[k] for k in new})
    return {"step": state["step"] + 1, **new}, metrics


def diffusion_step_fn(module: UNet, tx, alpha_bar: Any, ema_decay: float, *,
                      label_dropout: float = 0.0, skip_nonfinite: bool = False) -> Callable:
    """``step(state, batch, key)``: one epsilon-MSE update at uniform random levels, plus EMA;
    batch["image"]: [B, H, W, C] float32 in [0, 1] (mapped to [-1, 1] here, on device).

    A class-conditional UNet (``module.num_labels``) also reads the film's "No Finding" label,
    batch["labels"] / batch["label_mask"] [B, 1]: `HEALTHY` where it is 1, `DISEASED` where 0,
    `NULL_LABEL` where unknown, and the null label with probability ``label_dropout`` so that
    the model also learns to run unconditioned."""
    num_steps = alpha_bar.shape[0]

    def step(state: State, batch: dict, key: jax.Array):
        x_t, t, noise = _noised(batch["image"], key, state["step"], alpha_bar, num_steps - 1)
        y = ()
        if module.num_labels:
            known, healthy = batch["label_mask"][:, 0] > 0, batch["labels"][:, 0] > 0.5
            dropped = jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(
                key, state["step"]), 2), label_dropout, t.shape)
            y = (jnp.where(known & ~dropped, jnp.where(healthy, HEALTHY, DISEASED), NULL_LABEL),)

        def loss_fn(params):
            return eps_loss(module.apply({"params": params}, x_t, t, *y), noise)

        def ema(params):
            # Warm-started decay (TF's num_updates rule): short CPU runs would otherwise keep a
            # large share of the random initialisation in the EMA weights.
            n = state["step"].astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
            return optax.incremental_update(params, state["ema"], 1.0 - decay)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        new, metrics = _update(tx, state, grads, loss, skip_nonfinite, ema)
        return new, {"loss": loss, **metrics}

    return step


def classifier_step_fn(module: NoiseAwareClassifier, tx, alpha_bar: Any,
                       max_level: int, *, skip_nonfinite: bool = False) -> Callable:
    """``step(state, batch, key)``: masked BCE on x_t at levels uniform in [0, max_level];
    batch["image"]: [B, H, W, C] float32 in [0, 1]; batch["labels"], batch["label_mask"]: [B, K]
    float32 in {0, 1} (`daug_jax.losses.labels_and_mask`, the towers' label convention)."""
    def step(state: State, batch: dict, key: jax.Array):
        labels, mask = batch["labels"], batch["label_mask"]
        x_t, t, _ = _noised(batch["image"], key, state["step"], alpha_bar, max_level)

        def loss_fn(params):
            logits = module.apply({"params": params}, x_t, t)
            return masked_bce(logits, labels, mask), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        new, metrics = _update(tx, state, grads, loss, skip_nonfinite)
        known = mask > 0
        hits = jnp.where(known, (logits > 0) == (labels > 0.5), False)
        acc = jnp.sum(hits) / jnp.maximum(jnp.sum(known), 1)
        return new, {"loss": loss, "accuracy": acc, **metrics}

    return step


# ----------------------------------------------------------------------------- training
def train_diffusion(config: ml_collections.ConfigDict, source: Any, workdir: str, *,
                    class_names: Sequence[str] | None = None) -> Any:
    """Trains (or resumes) the epsilon-UNet on the films of ``source``; returns the EMA parameters.

    source: random-access split (`daug_jax.data.registry`, or `ArraySource`) whose records have
    "image" [H, W, C] uint8, or float32 in [0, 1] (and "labels" [K] for a class-conditional
    UNet, ``unet.class_cond``, whose label is the "No Finding" column among ``class_names``);
    read in streamed batches.
    """
    tcfg, module = config.unet_train, make_unet(config)
    tx = make_optimizer(tcfg)
    step = diffusion_step_fn(module, tx, alpha_bar_of(config), tcfg.ema_decay,
                             label_dropout=float(config.unet.label_dropout),
                             skip_nonfinite=bool(tcfg.skip_nonfinite))
    reader, names = BatchReader(source), None
    if module.num_labels:
        names = [str(c) for c in class_names or ()]
        if NO_FINDING not in names:
            raise ValueError(f"unet.class_cond conditions the UNet on the {NO_FINDING!r} label, "
                             f"which the data's classes {names} do not have")
        reader = BatchReader(source, label_columns=[names.index(NO_FINDING)])
        names = [NO_FINDING]
    meta = {"kind": "diffusion", "model_section": "unet", "config": as_json(config.to_dict()),
            "image_shape": _image_shape(source), "class_names": names}
    return _fit("train-diffusion", (module, tx, step), meta, reader, tcfg, workdir)["ema"]


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
    tcfg, module = config.classifier_train, make_classifier(config, width)
    tx = make_optimizer(tcfg)
    step = classifier_step_fn(module, tx, alpha_bar_of(config), trained_max_level(config),
                              skip_nonfinite=bool(tcfg.skip_nonfinite))
    meta = {"kind": "classifier", "model_section": "classifier",
            "config": as_json(config.to_dict()), "image_shape": _image_shape(source),
            "class_names": class_names}
    reader = BatchReader(source, label_columns=range(width), label_policy=label_policy)
    return _fit("train-classifier", (module, tx, step), meta, reader, tcfg, workdir)["params"]


def _fit(name: str, model: tuple, meta: dict, reader: BatchReader,
         tcfg: ml_collections.ConfigDict, workdir: str) -> State:
    """Trains from the latest checkpoint in ``workdir`` (or from scratch) up to ``tcfg.steps``;
    returns the final state.  model: (module, its optimizer, its step function)."""
    module, tx, step = model
    mesh = parallel.make_mesh()
    rep, split = parallel.replicated(mesh), parallel.data_sharding(mesh)
    image_shape = tuple(meta["image_shape"])
    init = jax.jit(lambda key: init_state(module, tx, image_shape, key,
                                          ema=meta["kind"] == "diffusion"), out_shardings=rep)
    fields = ("image", "labels", "label_mask") if meta["class_names"] else ("image",)
    step = jax.jit(step, in_shardings=(rep, {k: split for k in fields}, rep),
                   out_shardings=(rep, rep), donate_argnums=0)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tcfg.save_every)
    # Restored before the stream starts: a damaged newest checkpoint falls back to an older step.
    template = jax.eval_shape(init, loop.prng_key(0, tcfg.prng_impl))
    state, start = loop.resume(ckpt, template, meta, workdir, _compared)
    batches = train_batches(reader, int(tcfg.batch_size), seed=int(tcfg.seed), start_step=start,
                            num_threads=int(tcfg.input_threads))
    first = next(batches)  # bad input fails here, before anything is written
    if tuple(first["image"].shape[1:]) != image_shape:
        raise ValueError(f"{name}: records have images of shape {list(first['image'].shape[1:])}, "
                         f"the dataset declares {list(image_shape)}")
    os.makedirs(workdir, exist_ok=True)
    if not start:
        state = init(loop.prng_key(tcfg.seed, tcfg.prng_impl))
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "meta.json"), meta)
    # Created by a jitted program so that every process holds its shard of the replicated key
    # (device_put of a host value onto a multi-process sharding is refused).
    key = jax.jit(lambda: loop.prng_key(tcfg.seed + 1, tcfg.prng_impl), out_shardings=rep)()
    job = loop.Job(name=name, workdir=workdir, steps=int(tcfg.steps),
                   log_every=int(tcfg.log_every), save_every=int(tcfg.save_every),
                   log_file="log.jsonl", ckpt=ckpt, meta=meta)
    state, _ = loop.fit(job, state, lambda state, host: step(
        state, parallel.shard_batch({k: host[k] for k in fields}, mesh), key), batches,
        start=start, first=first)
    return state


def _compared(meta: dict) -> dict:
    """What a checkpoint and the run resuming it must share: the kind of model, the data's
    shape and classes, the schedule and the architecture."""
    fields = {k: meta.get(k) for k in ("kind", "image_shape", "class_names")}
    for section in ("diffusion", meta["model_section"]):
        for k, v in (meta["config"].get(section) or {}).items():
            fields[f"{section}.{k}"] = v
    return fields


def _image_shape(source: Any) -> list[int]:
    """(H, W, C) of the records of ``source`` (its first record; every batch is checked)."""
    if len(source) == 0:
        raise ValueError("the training split is empty")
    return [int(s) for s in np.shape(source[0]["image"])]


# ----------------------------------------------------------------------------- loading
def _load(workdir: str, kind: str, mesh=None):
    meta = read_json(os.path.join(workdir, "meta.json"))
    if meta is None:
        raise FileNotFoundError(f"no trained {kind} model in {workdir} (missing meta.json)")
    if meta.get("kind") != kind:
        raise ValueError(f"{workdir} holds a {meta.get('kind')} model, not a {kind} model")
    config = ml_collections.ConfigDict(meta["config"])
    if kind == "diffusion":
        module, tcfg = make_unet(config), config.unet_train
    else:
        module, tcfg = make_classifier(config, len(meta["class_names"])), config.classifier_train
    image_shape = tuple(meta["image_shape"])
    rep = parallel.replicated(parallel.make_mesh() if mesh is None else mesh)
    init = jax.jit(lambda key: init_state(module, make_optimizer(tcfg), image_shape, key,
                                          ema=kind == "diffusion"), out_shardings=rep)
    config.update(image_shape=image_shape, class_names=tuple(meta["class_names"] or ()),
                  workdir=workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    state, _ = ckpt.restore(jax.eval_shape(init, loop.prng_key(0, tcfg.prng_impl)))
    ckpt.close()
    return module, state["ema" if kind == "diffusion" else "params"], config


def load_diffusion(workdir: str, mesh=None) -> tuple[UNet, Any, ml_collections.ConfigDict]:
    """``(unet, ema_params, config)`` from the latest checkpoint, the parameters replicated over
    ``mesh`` (default: every device of every process); ``config.image_shape`` is (H, W, C)."""
    return _load(workdir, "diffusion", mesh)


def load_classifier(workdir: str, mesh=None) -> tuple[NoiseAwareClassifier, Any,
                                                      ml_collections.ConfigDict]:
    """``(classifier, params, config)``; ``config.class_names`` orders the logits."""
    return _load(workdir, "classifier", mesh)


# ----------------------------------------------------------------------------- CLI
def main(command: str, argv: list[str]) -> int:
    kind = "classifier" if command == "train-classifier" else "diffusion"
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}")
    registry.add_run_args(parser, config="diffusion", workdir=f"runs/{kind}",
                          example="unet_train.steps=200")
    args = parser.parse_args(argv)
    config, dataset = registry.open_run(args)
    source = dataset.source(config.data.train_split)
    with workdir_lock(args.workdir, what=command):  # one run per workdir
        if kind == "diffusion":
            train_diffusion(config, source, args.workdir, class_names=dataset.class_names)
        else:
            train_classifier(config, source, args.workdir, class_names=dataset.class_names,
                             label_policy=config.data.label_policy)
    print(f"{command}: {dataset.name} ({len(source)} films); checkpoints, meta.json and "
          f"log.jsonl in {args.workdir}")
    return 0
