"""Deterministic DDIM walks and classifier guidance: the pieces of the image-to-image translation.

The recipe of Wolleb et al. (2022) that DAug uses to make its heatmap channels.  An image sits at
level ``grid[0] = 0``; it is walked up the respaced grid ``0 = t_0 < t_1 < ... < t_S = L`` with the
eta = 0 DDIM step and no guidance (`ddim_encode`).  The walk is a discretised ODE, so ``x_L``
still carries the patient's anatomy.  Walking back down with classifier guidance towards a class
(`guided_ddim_decode`) changes what the classifier needs changed and little else:

    eps_hat = eps(x_t, t) - s * sqrt(1 - alpha_bar_t) * grad_x log sigmoid(d * logit_c(x_t, t))

with ``d = +1`` towards the presence of class ``c`` and ``d = -1`` towards its absence
(``log sigmoid(-z) = log(1 - sigmoid(z))``), or, as the authors' code guides, ``d`` times the
gradient of ``log softmax(logits)_c``.  A class-conditional UNet also decodes conditioned on the
target's side (healthy or diseased).  `heatmaps.Translation` composes these pieces into the
translation every stage uses.

Models enter as closures, not modules:

    eps_fn(x, t, y) -> eps   x: [B, H, W, C] float32 in [-1, 1], t: [B] int32 levels,
                             y: [B] int32 labels of a class-conditional UNet (else ignored)
    logit_fn(x, t) -> logits [B, num_classes]

so the same loops drive a Flax UNet (``lambda x, t, y: unet.apply({"params": p}, x, t, y)``) or
the closed-form eps of a Gaussian in the tests.  Loops are ``lax.scan``s: encode + decode trace
into one XLA program, 2 * S network evaluations (plus S classifier gradients) per image and
target.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from daug_jax.diffusion.schedule import ddim_step
from daug_jax.diffusion.unet import NULL_LABEL

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
LogitFn = Callable[[jax.Array, jax.Array], jax.Array]
# How the classifier's logits steer (``heatmaps.guidance``): "sigmoid", the log-probability of
# the one class as the classifier is trained (multi-label), or "softmax", the log-softmax over
# all logits as the authors' code guides.
GUIDANCE_FORMS = ("sigmoid", "softmax")


@flax.struct.dataclass
class Guidance:
    """Where a decode is steered: the classifier's logit ``index`` (int), ``direction`` +1
    (towards presence) or -1 (towards absence), the class-conditional UNet's ``label``
    (`unet.HEALTHY` or `unet.DISEASED`; ignored by an unconditional UNet), each a scalar or [B]
    (one target per row), and the scale s >= 0.  A pytree: the decode can be vmapped over
    targets, or jitted with them as inputs."""
    index: Any
    direction: Any
    scale: Any
    label: Any = NULL_LABEL


def ddim_grid(num_levels: int, level: int, num_steps: int) -> np.ndarray:
    """``num_steps`` evenly spaced DDIM moves from 0 up to ``level``: ``[num_steps + 1] int32``
    (T = 1000, level 500, 10 steps: 0, 50, ..., 500).  Unlike a fixed stride it always has exactly
    ``num_steps`` moves, so a translation costs the 2 * num_steps network calls the config says."""
    if not 0 < level < num_levels:
        raise ValueError(f"encode level must be in [1, {num_levels - 1}], got {level}")
    if not 1 <= num_steps <= level:
        raise ValueError(f"num_steps must be in [1, level={level}], got {num_steps}")
    return np.round(np.linspace(0, level, num_steps + 1)).astype(np.int32)


def grid_levels(alpha_bar, grid) -> tuple[np.ndarray, jax.Array]:
    """Checks a DDIM grid and returns its levels and signal fractions.

    alpha_bar: [T] (float64 numpy from `alphas_cumprod`, or a float32 array); grid: [S + 1]
    increasing ints in [0, T) (`ddim_grid`; concrete: it fixes the loop length).
    Returns ``(t: [S + 1] int32 numpy, ab: [S + 1] float32 = alpha_bar[t])``.
    """
    t = np.asarray(grid)
    num_levels = np.shape(alpha_bar)[0]
    if t.ndim != 1 or t.size < 2:
        raise ValueError(f"grid must be a 1-D array of at least 2 levels, got shape {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"grid must hold integer levels, got dtype {t.dtype}")
    if np.any(np.diff(t) <= 0) or t[0] < 0 or t[-1] >= num_levels:
        raise ValueError(f"grid must increase strictly within [0, {num_levels}), got {t.tolist()}")
    t = t.astype(np.int32)
    return t, jnp.asarray(alpha_bar, jnp.float32)[t]


def guided_eps(eps_fn: EpsFn, logit_fn: LogitFn, x: jax.Array, t, alpha_bar_t,
               guidance: Guidance, form: str = "sigmoid") -> jax.Array:
    """Classifier-guided noise estimate at one level: x [B, H, W, C], t scalar int level,
    alpha_bar_t scalar -> eps_hat [B, H, W, C] (`GUIDANCE_FORMS`: the gradient of
    log sigmoid(d * logit_c), or d times the gradient of log softmax(logits)_c).

    The gradient of the batch sum of log-probabilities is the per-example gradient because each
    example's logit depends on that example only (no batch statistics in the classifier).
    """
    batch = x.shape[0]
    t_b = jnp.full((batch,), t, jnp.int32)                            # the networks' [B] levels
    index, sign, label = (jnp.broadcast_to(jnp.asarray(v, dtype), (batch,)) for v, dtype in (
        (guidance.index, jnp.int32), (guidance.direction, jnp.float32),
        (guidance.label, jnp.int32)))

    def log_prob(x):
        logits = logit_fn(x, t_b).astype(jnp.float32)                 # [B, num_classes]
        if form == "softmax":
            chosen = jnp.take_along_axis(jax.nn.log_softmax(logits), index[:, None], axis=1)
            return jnp.sum(sign * chosen[:, 0])
        chosen = jnp.take_along_axis(logits, index[:, None], axis=1)[:, 0]
        return jnp.sum(jax.nn.log_sigmoid(sign * chosen))

    grad = jax.grad(log_prob)(x)
    eps = eps_fn(x, t_b, label).astype(x.dtype)
    return eps - guidance.scale * jnp.sqrt(1.0 - alpha_bar_t) * grad


def _walk(eps_at, x: jax.Array, alpha_bar, grid, up: bool, unroll: int | bool) -> jax.Array:
    """DDIM steps (eta = 0) along ``grid`` (`grid_levels`), up from ``grid[0]`` or down from
    ``grid[-1]``; ``eps_at(x, t, alpha_bar_t)`` is the noise estimate of each step (guided or
    not).  unroll: how far ``lax.scan`` unrolls the loop (``heatmaps.unroll`` of the config)."""
    t, ab = grid_levels(alpha_bar, grid)
    if up:
        levels = (jnp.asarray(t[:-1]), ab[:-1], ab[1:])          # (t_from, ab_from, ab_to) [S]
    else:
        levels = (jnp.asarray(t[:0:-1]), ab[:0:-1], ab[-2::-1])

    def step(x, level):
        t_from, ab_from, ab_to = level
        return ddim_step(x, eps_at(x, t_from, ab_from), ab_from, ab_to), None

    x, _ = lax.scan(step, x, levels, unroll=unroll)
    return x


def _unguided(eps_fn: EpsFn):
    """The plain, unconditioned noise estimate as a walk's ``eps_at``."""
    return lambda x, t_from, _: eps_fn(x, *(jnp.full((x.shape[0],), v, jnp.int32)
                                            for v in (t_from, NULL_LABEL)))


def ddim_encode(eps_fn: EpsFn, x0: jax.Array, alpha_bar, grid, *,
                unroll: int | bool = 1) -> jax.Array:
    """Deterministic DDIM from ``grid[0]`` up to ``L = grid[-1]`` without guidance:
    x0 [B, H, W, C] float32 in [-1, 1] -> x_L [B, H, W, C]."""
    chex.assert_rank(x0, 4)
    return _walk(_unguided(eps_fn), x0, alpha_bar, grid, True, unroll)


def ddim_decode(eps_fn: EpsFn, x_L: jax.Array, alpha_bar, grid, *,
                unroll: int | bool = 1) -> jax.Array:
    """Deterministic DDIM from ``L = grid[-1]`` down to ``grid[0]`` without guidance: after
    `ddim_encode`, the film's reconstruction.  x_L: [B, H, W, C] -> [B, H, W, C].  Equal to
    `guided_ddim_decode` at scale 0, without computing a classifier gradient."""
    chex.assert_rank(x_L, 4)
    return _walk(_unguided(eps_fn), x_L, alpha_bar, grid, False, unroll)


def guided_ddim_decode(eps_fn: EpsFn, logit_fn: LogitFn, x_L: jax.Array, alpha_bar, grid,
                       guidance: Guidance, *, form: str = "sigmoid",
                       unroll: int | bool = 1) -> jax.Array:
    """Deterministic DDIM from ``L = grid[-1]`` down to ``grid[0]`` with classifier guidance
    (of ``form``, `guided_eps`): x_L [B, H, W, C] -> the translated image [B, H, W, C].
    guidance: see `Guidance` (may be traced, so the decode can be vmapped over targets)."""
    chex.assert_rank(x_L, 4)
    eps_at = functools.partial(guided_eps, eps_fn, logit_fn, guidance=guidance, form=form)
    return _walk(eps_at, x_L, alpha_bar, grid, False, unroll)
