"""Image-to-image translation: deterministic DDIM encoding, then classifier-guided DDIM decoding.

The recipe of Wolleb et al. (2022) that DAug uses to make its heatmap channels.  An image sits at
level ``grid[0] = 0``; it is walked up the respaced grid ``0 = t_0 < t_1 < ... < t_S = L`` with the
eta = 0 DDIM step and no guidance.  The walk is a discretised ODE, so ``x_L`` still carries the
patient's anatomy.  Walking back down with classifier guidance towards a class changes what the
classifier needs changed and little else:

    eps_hat = eps(x_t, t) - s * sqrt(1 - alpha_bar_t) * grad_x log sigmoid(d * logit_c(x_t, t))

with ``d = +1`` towards the presence of class ``c`` and ``d = -1`` towards its absence
(``log sigmoid(-z) = log(1 - sigmoid(z))``).

Models enter as closures, not modules:

    eps_fn(x, t) -> eps      x: [B, H, W, C] float32 in [-1, 1], t: [B] int32 levels
    logit_fn(x, t) -> logits [B, num_classes]

so the same loops drive a Flax UNet (``lambda x, t: unet.apply({"params": p}, x, t)``) or the
closed-form eps of a Gaussian in the tests.  Loops are ``lax.scan``s: encode + decode trace into
one XLA program, 2 * S network evaluations (plus S classifier gradients) per image and target.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from daug_jax.diffusion.schedule import ddim_step

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
LogitFn = Callable[[jax.Array, jax.Array], jax.Array]


def ddim_grid(num_levels: int, level: int, num_steps: int) -> np.ndarray:
    """``num_steps`` evenly spaced DDIM moves from 0 up to ``level``: ``[num_steps + 1] int32``.

    T = 1000, level 500, 10 steps gives 0, 50, ..., 500, the grid `timestep_grid(1000, 20, 500)`
    makes; unlike a fixed stride it always has exactly ``num_steps`` moves, so the cost of a
    translation (2 * num_steps network calls) is what the config says.
    """
    if not 0 < level < num_levels:
        raise ValueError(f"encode level must be in [1, {num_levels - 1}], got {level}")
    if not 1 <= num_steps <= level:
        raise ValueError(f"num_steps must be in [1, level={level}], got {num_steps}")
    return np.round(np.linspace(0, level, num_steps + 1)).astype(np.int32)


def default_unroll() -> int | bool:
    """How far to unroll the step loops: fully on CPU, not at all elsewhere.

    XLA:CPU compiles the input-gradient convolutions of the guidance step inside a while loop
    with a transposed kernel layout that misses its fast convolution path (measured ~6x slower
    than the same step outside a loop); a fully unrolled loop has no while.  Other backends keep
    the rolled loop, whose compile time does not grow with the number of steps.
    """
    return True if jax.default_backend() == "cpu" else 1


def grid_levels(alpha_bar, grid) -> tuple[np.ndarray, jax.Array]:
    """Checks a DDIM grid and returns its levels and signal fractions.

    alpha_bar: [T] (float64 numpy from `alphas_cumprod`, or a float32 array); grid: [S + 1]
    increasing ints in [0, T) (`ddim_grid`, `timestep_grid`; concrete: it fixes the loop length).
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


def _levels_of(x: jax.Array, t) -> jax.Array:
    """A scalar level as the per-example ``t: [B] int32`` the networks take."""
    return jnp.full((x.shape[0],), t, jnp.int32)


def guided_eps(eps_fn: EpsFn, logit_fn: LogitFn, x: jax.Array, t, alpha_bar_t,
               target_index, direction, scale) -> jax.Array:
    """Classifier-guided noise estimate at one level.

    x: [B, H, W, C]; t: scalar int level; alpha_bar_t: scalar; target_index: int class index,
    scalar or [B]; direction: +1 (towards presence) / -1 (towards absence), scalar or [B];
    scale: guidance scale s >= 0.  Returns eps_hat: [B, H, W, C].

    The gradient of the batch sum of log-probabilities is the per-example gradient because each
    example's logit depends on that example only (no batch statistics in the classifier).
    """
    batch = x.shape[0]
    t_b = _levels_of(x, t)
    index = jnp.broadcast_to(jnp.asarray(target_index, jnp.int32), (batch,))
    sign = jnp.broadcast_to(jnp.asarray(direction, jnp.float32), (batch,))

    def log_prob(x):
        logits = logit_fn(x, t_b).astype(jnp.float32)                 # [B, num_classes]
        chosen = jnp.take_along_axis(logits, index[:, None], axis=1)[:, 0]
        return jnp.sum(jax.nn.log_sigmoid(sign * chosen))

    grad = jax.grad(log_prob)(x)
    eps = eps_fn(x, t_b).astype(x.dtype)
    return eps - scale * jnp.sqrt(1.0 - alpha_bar_t) * grad


def _walk(eps_at, x: jax.Array, levels, unroll: int | bool) -> jax.Array:
    """DDIM steps (eta = 0) over ``levels = (t_from [S], ab_from [S], ab_to [S])``, up or down the
    grid; ``eps_at(x, t, alpha_bar_t)`` is the noise estimate of each step (guided or not)."""
    def step(x, level):
        t_from, ab_from, ab_to = level
        return ddim_step(x, eps_at(x, t_from, ab_from), ab_from, ab_to), None

    x, _ = lax.scan(step, x, levels, unroll=unroll)
    return x


def _unguided(eps_fn: EpsFn):
    """The plain noise estimate as a walk's ``eps_at``."""
    return lambda x, t_from, _: eps_fn(x, _levels_of(x, t_from))


def _down(alpha_bar, grid) -> tuple:
    """The levels of a walk from ``grid[-1]`` down to ``grid[0]`` (see `_walk`)."""
    t, ab = grid_levels(alpha_bar, grid)
    return jnp.asarray(t[:0:-1]), ab[:0:-1], ab[-2::-1]


def ddim_encode(eps_fn: EpsFn, x0: jax.Array, alpha_bar, grid, *,
                unroll: int | bool = 1) -> jax.Array:
    """Deterministic DDIM from ``grid[0]`` up to ``L = grid[-1]`` without guidance.

    x0: [B, H, W, C] float32 in [-1, 1]; unroll: ``lax.scan`` unrolling (see `default_unroll`).
    Returns x_L: [B, H, W, C].
    """
    chex.assert_rank(x0, 4)
    t, ab = grid_levels(alpha_bar, grid)
    return _walk(_unguided(eps_fn), x0, (jnp.asarray(t[:-1]), ab[:-1], ab[1:]), unroll)


def ddim_decode(eps_fn: EpsFn, x_L: jax.Array, alpha_bar, grid, *,
                unroll: int | bool = 1) -> jax.Array:
    """Deterministic DDIM from ``L = grid[-1]`` down to ``grid[0]`` without guidance: after
    `ddim_encode`, the film's reconstruction.  x_L: [B, H, W, C] -> [B, H, W, C].

    Equal to `guided_ddim_decode` at ``scale = 0``, without computing a classifier gradient.
    """
    chex.assert_rank(x_L, 4)
    return _walk(_unguided(eps_fn), x_L, _down(alpha_bar, grid), unroll)


def guided_ddim_decode(eps_fn: EpsFn, logit_fn: LogitFn, x_L: jax.Array, alpha_bar, grid,
                       target_index, direction, scale, *, unroll: int | bool = 1) -> jax.Array:
    """Deterministic DDIM from ``L = grid[-1]`` down to ``grid[0]`` with classifier guidance.

    x_L: [B, H, W, C]; target_index, direction, scale as in `guided_eps` (may be traced, so
    the decode can be vmapped over targets).  ``scale = 0`` is `ddim_decode`, at the cost of a
    classifier gradient per step.  Returns the translated image: [B, H, W, C].
    """
    chex.assert_rank(x_L, 4)

    def eps_at(x, t_from, ab_from):
        return guided_eps(eps_fn, logit_fn, x, t_from, ab_from, target_index, direction, scale)

    return _walk(eps_at, x_L, _down(alpha_bar, grid), unroll)


def translate(eps_fn: EpsFn, logit_fn: LogitFn, x0: jax.Array, alpha_bar, grid,
              target_index, direction, scale, *, unroll: int | bool = 1) -> jax.Array:
    """Encode to ``grid[-1]``, decode with guidance: x0 [B, H, W, C] -> translated [B, H, W, C]."""
    x_L = ddim_encode(eps_fn, x0, alpha_bar, grid, unroll=unroll)
    return guided_ddim_decode(eps_fn, logit_fn, x_L, alpha_bar, grid, target_index, direction,
                              scale, unroll=unroll)
