"""The epsilon-UNet's and the noise-aware classifier's train steps, pure.

``step(state, batch, key) -> (state, metrics)``: jitted by `daug_jax.diffusion.train` (in the
shared loop, `daug_jax.loop`) and by the benchmark (`daug_jax.bench_programs`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from daug_jax.diffusion.classifier import NoiseAwareClassifier
from daug_jax.diffusion.schedule import eps_loss, q_sample
from daug_jax.diffusion.unet import UNet
from daug_jax.loop import apply_update
from daug_jax.losses import masked_bce

State = dict  # {"step": int32 [], "params", "opt_state", and "ema" for the diffusion model}


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
        x_t, t, noise = _noised(batch["image"], key, state["step"], alpha_bar, num_steps - 1)

        def loss_fn(params):
            return eps_loss(module.apply({"params": params}, x_t, t), noise)

        def ema(params):
            # Warm-started decay (TF's num_updates rule): short CPU runs would otherwise keep a
            # large share of the random initialisation in the EMA weights.
            n = state["step"].astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
            return optax.incremental_update(params, state["ema"], 1.0 - decay)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        params, opt_state, ema_params, update = apply_update(
            tx, state["params"], state["opt_state"], grads, loss, skip_nonfinite=skip_nonfinite,
            follow=(ema, state["ema"]))
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
               "ema": ema_params}
        return new, {"loss": loss, **update}

    return step


def _noised(image: jax.Array, key: jax.Array, step: jax.Array, alpha_bar: Any,
            max_level: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Films [B, H, W, C] in [0, 1] -> (x_t, t [B] uniform in [0, max_level], the noise): the
    step's draws, from ``key`` folded with the step number."""
    x0 = image * 2.0 - 1.0
    k_t, k_eps = jax.random.split(jax.random.fold_in(key, step))
    t = jax.random.randint(k_t, (x0.shape[0],), 0, max_level + 1)
    noise = jax.random.normal(k_eps, x0.shape, x0.dtype)
    return q_sample(x0, t, noise, alpha_bar), t, noise


def classifier_step_fn(module: NoiseAwareClassifier, tx, alpha_bar: Any,
                       max_level: int, *, skip_nonfinite: bool = False) -> Callable:
    """``step(state, batch, key)``: masked BCE on x_t at levels uniform in [0, max_level].

    batch["image"]: [B, H, W, C] float32 in [0, 1]; batch["labels"], batch["label_mask"]: [B, K]
    float32 in {0, 1} (`daug_jax.losses.labels_and_mask`, the towers' label convention).
    """
    def step(state: State, batch: dict, key: jax.Array):
        labels, mask = batch["labels"], batch["label_mask"]
        x_t, t, _ = _noised(batch["image"], key, state["step"], alpha_bar, max_level)

        def loss_fn(params):
            logits = module.apply({"params": params}, x_t, t)
            return masked_bce(logits, labels, mask), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        params, opt_state, _, update = apply_update(
            tx, state["params"], state["opt_state"], grads, loss, skip_nonfinite=skip_nonfinite)
        known = mask > 0
        hits = jnp.where(known, (logits > 0) == (labels > 0.5), False)
        acc = jnp.sum(hits) / jnp.maximum(jnp.sum(known), 1)
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new, {"loss": loss, "accuracy": acc, **update}

    return step
