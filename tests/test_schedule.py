"""Noise schedules, forward noising, the DDIM step and the respaced grid against closed forms."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from daug_jax.diffusion.schedule import (alphas_cumprod, betas, ddim_step, eps_loss, q_sample,
                                         to_model_space)


def _cosine_reference(num_steps, s=0.008):
    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    b = [min(1 - f((i + 1) / num_steps) / f(i / num_steps), 0.999) for i in range(num_steps)]
    return np.array(b, np.float64)


@pytest.mark.parametrize("num_steps", [1000, 250])
def test_linear_schedule_closed_form(num_steps):
    scale = 1000 / num_steps
    expected_b = np.array([scale * (1e-4 + (0.02 - 1e-4) * i / (num_steps - 1))
                           for i in range(num_steps)])
    np.testing.assert_allclose(betas("linear", num_steps), expected_b, rtol=1e-12, atol=0)
    ab = alphas_cumprod("linear", num_steps)
    assert ab.dtype == np.float64 and ab.shape == (num_steps,)
    np.testing.assert_allclose(ab, np.cumprod(1 - expected_b), rtol=1e-12)
    if num_steps == 1000:
        assert betas("linear", 1000)[0] == pytest.approx(1e-4, abs=1e-15)
        assert betas("linear", 1000)[-1] == pytest.approx(0.02, abs=1e-15)
        # Ho et al.: alpha_bar_T ~ 4e-5 for this schedule.
        assert 3e-5 < ab[-1] < 5e-5


@pytest.mark.parametrize("num_steps", [1000, 100])
def test_cosine_schedule_closed_form(num_steps):
    b = betas("cosine", num_steps)
    np.testing.assert_allclose(b, _cosine_reference(num_steps), rtol=1e-10, atol=1e-15)
    assert b.max() <= 0.999 and b[-1] == 0.999   # the last step is clipped
    ab = alphas_cumprod("cosine", num_steps)
    np.testing.assert_allclose(ab, np.cumprod(1 - _cosine_reference(num_steps)), rtol=1e-10)
    # Away from the clipped end, alpha_bar follows the squared cosine itself.
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    mid = num_steps // 2
    assert ab[mid - 1] == pytest.approx(f(mid / num_steps) / f(0), rel=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_bar_strictly_decreasing_in_unit_interval(schedule):
    ab = alphas_cumprod(schedule, 1000)
    assert np.all(np.diff(ab) < 0)
    assert 0 <= ab[-1] < ab[0] < 1 and ab[0] > 0.999


def test_unknown_schedule_names_both():
    with pytest.raises(ValueError, match="linear.*cosine"):
        alphas_cumprod("quadratic", 1000)


def test_q_sample_moments():
    ab = jnp.asarray(alphas_cumprod("cosine", 1000), jnp.float32)
    n = 200_000
    levels = jnp.array([10, 500, 900])
    x0 = jnp.array([0.8, -0.3, 0.5])
    t = jnp.repeat(levels, n)
    x0_rows = jnp.repeat(x0, n).reshape(-1, 1, 1, 1)
    noise = jnp.asarray(np.random.default_rng(0).standard_normal(x0_rows.shape), jnp.float32)
    xt = np.asarray(q_sample(x0_rows, t, noise, ab)).reshape(3, n)
    a = np.asarray(ab)[np.asarray(levels)].astype(np.float64)
    np.testing.assert_allclose(xt.mean(1), np.sqrt(a) * np.asarray(x0), atol=0.01)
    np.testing.assert_allclose(xt.var(1), 1 - a, rtol=0.02, atol=1e-4)


def test_q_sample_endpoints_and_shape_check():
    ab = jnp.array([1.0, 0.0])
    x0, noise = jnp.full((2, 2, 2, 1), 0.7), jnp.full((2, 2, 2, 1), -2.0)
    out = q_sample(x0, jnp.array([0, 1]), noise, ab)
    np.testing.assert_allclose(out[0], 0.7)
    np.testing.assert_allclose(out[1], -2.0)
    with pytest.raises(AssertionError):
        q_sample(x0, jnp.array([0, 1]), noise[:1], ab)


def test_eps_loss_is_mse():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 4, 4, 1)), rng.normal(size=(2, 4, 4, 1))
    assert float(eps_loss(jnp.asarray(a), jnp.asarray(b))) == pytest.approx(np.mean((a - b) ** 2), rel=1e-5)


def _ddim_reference(x, eps, a_t, a_next):
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    return np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps


def test_ddim_step_matches_float64_and_round_trips():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(3, 8, 8, 1))
    eps = rng.normal(size=x.shape)
    ab = alphas_cumprod("linear", 1000)
    a_t = ab[[100, 300, 40]].reshape(3, 1, 1, 1)
    a_next = ab[[140, 500, 80]].reshape(3, 1, 1, 1)
    up = ddim_step(jnp.asarray(x, jnp.float32), jnp.asarray(eps, jnp.float32),
                   jnp.asarray(a_t, jnp.float32), jnp.asarray(a_next, jnp.float32))
    np.testing.assert_allclose(up, _ddim_reference(x, eps, a_t, a_next), rtol=1e-4, atol=1e-5)
    back = ddim_step(up, jnp.asarray(eps, jnp.float32), jnp.asarray(a_next, jnp.float32),
                     jnp.asarray(a_t, jnp.float32))
    np.testing.assert_allclose(back, x, atol=1e-4)
    # Scalar levels broadcast too, and a move to the same level is the identity.
    same = ddim_step(jnp.asarray(x), jnp.asarray(eps), 0.3, 0.3)
    np.testing.assert_allclose(same, x, atol=1e-5)


def test_to_model_space_maps_stored_pixels_to_minus_one_one():
    u8 = np.array([0, 127, 255], np.uint8)
    np.testing.assert_allclose(to_model_space(u8), [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-7)
    np.testing.assert_allclose(to_model_space(np.array([0.0, 0.25, 1.0])), [-1.0, -0.5, 1.0])
    assert to_model_space(u8).dtype == np.float32
    on_device = to_model_space(jnp.array([0.0, 1.0]))  # JAX in, JAX out (also under jit)
    assert isinstance(on_device, jnp.ndarray) and on_device.tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("num_steps", [20, 10, 1])
def test_linear_schedule_rejects_betas_of_one_or_more(num_steps):
    # 20 / T >= 1: the last beta would wipe the signal out (alpha_bar <= 0).
    with pytest.raises(ValueError, match=f"num_steps = {num_steps}.*>= 1.*num_steps >= 21"):
        betas("linear", num_steps)


def test_linear_schedule_just_above_the_limit_stays_positive():
    ab = alphas_cumprod("linear", 21)
    assert betas("linear", 21).max() == pytest.approx(20 / 21) and np.all(ab > 0)
