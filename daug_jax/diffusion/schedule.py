"""Noise schedules, forward noising and the deterministic DDIM step.

Level ``t`` (``0 <= t < T``) has signal fraction ``alpha_bar[t] = prod_{i<=t} (1 - beta_i)``;
``x_t = sqrt(alpha_bar[t]) * x_0 + sqrt(1 - alpha_bar[t]) * eps``.  A clean image is treated as
sitting at level 0 (``alpha_bar[0]`` is 1 - beta_0, within 1e-4 of 1).

Schedules are computed once in float64 NumPy (tiny, exact); the train steps and samplers take
``alpha_bar`` as a float32 device array.  The models work in [-1, 1] (`to_model_space`).
"""

from __future__ import annotations

import math

import chex
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")


def betas(schedule: str, num_steps: int) -> np.ndarray:
    """Per-level noise variances ``beta: [T] float64``.

    "linear": DDPM (Ho et al. 2020) betas, ``linspace(1e-4, 0.02)`` scaled by ``1000 / T`` so
      that other ``T`` keep the same total noise (the guided-diffusion convention).
    "cosine": Nichol & Dhariwal (2021), ``alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2)``
      with ``s = 0.008``; betas clipped at 0.999 to avoid a singular last step.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if schedule == "linear":
        scale = 1000.0 / num_steps
        if scale * 0.02 >= 1.0:
            # beta >= 1 wipes the signal out (alpha_bar reaches 0, then turns negative).
            raise ValueError(f"linear schedule with num_steps = {num_steps}: its largest beta "
                             f"would be 20 / {num_steps} = {scale * 0.02:.3g} >= 1; use "
                             f"num_steps >= 21 or the cosine schedule")
        return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
    if schedule == "cosine":
        s = 0.008
        u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
        f = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {SCHEDULES}")


def alphas_cumprod(schedule: str, num_steps: int) -> np.ndarray:
    """``alpha_bar: [T] float64``, strictly decreasing from ~1 towards 0."""
    return np.cumprod(1.0 - betas(schedule, num_steps))


def to_model_space(images):
    """Stored pixels -> the models' [-1, 1]: uint8 in [0, 255] or floats in [0, 1]; same shape.

    NumPy in, NumPy out; a JAX array (also inside jit) stays a JAX array."""
    images = images if hasattr(images, "dtype") else np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32) * 2.0 - 1.0


def q_sample(x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray,
             alpha_bar: jnp.ndarray) -> jnp.ndarray:
    """Forward noising ``x_t = sqrt(ab[t]) x0 + sqrt(1 - ab[t]) noise``.

    x0, noise: [B, H, W, C]; t: [B] int levels; alpha_bar: [T].  Returns [B, H, W, C].
    """
    chex.assert_equal_shape([x0, noise])
    chex.assert_rank(t, 1)
    ab = jnp.asarray(alpha_bar)[t].reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def eps_loss(eps_pred: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """The DDPM "simple" objective, a float32 scalar: the MSE of eps_pred [B, H, W, C] vs noise."""
    chex.assert_equal_shape([eps_pred, noise])
    diff = eps_pred.astype(jnp.float32) - noise.astype(jnp.float32)
    return jnp.mean(diff * diff)


def ddim_step(x_t, eps, alpha_bar_t, alpha_bar_next):
    """Deterministic DDIM (eta = 0) move from level t to any other level, up or down.

    x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t);  x_next = sqrt(ab_next) x0_hat + sqrt(1 - ab_next) eps.
    Moving up with ``eps`` and back down with the same ``eps`` returns ``x_t``: encoding is the
    inverse of decoding.  ``alpha_bar_*`` are scalars or arrays broadcastable against ``x_t``
    (e.g. [B, 1, 1, 1]).
    """
    x0_hat = (x_t - jnp.sqrt(1.0 - alpha_bar_t) * eps) / jnp.sqrt(alpha_bar_t)
    return jnp.sqrt(alpha_bar_next) * x0_hat + jnp.sqrt(1.0 - alpha_bar_next) * eps
