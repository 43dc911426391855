"""Guided DDIM translation against closed forms: a Gaussian data model gives the exact eps and the
exact probability-flow trajectory; a linear classifier gives the exact guidance gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from daug_jax.diffusion import sampling
from daug_jax.diffusion.sampling import Guidance
from daug_jax.diffusion.schedule import alphas_cumprod
from daug_jax.heatmaps import (TranslationModels, make_heatmap_fn, make_translation,
                               raw_heatmap)

H = W = 8
SIGMA = 0.3
ALPHA_BAR = alphas_cumprod("linear", 1000)
CLASSES = ("No Finding", "Left", "Right")


def gaussian_model(seed=0):
    """x0 ~ N(mu, SIGMA^2 I) per pixel: mu [H, W, 1], a batch of samples [4, H, W, 1] and the
    exact eps*(x_t, t) = sqrt(1 - ab)(x_t - sqrt(ab) mu) / (ab SIGMA^2 + 1 - ab)."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-0.5, 0.5, (H, W, 1)).astype(np.float32)
    x0 = (mu + SIGMA * rng.standard_normal((4, H, W, 1))).astype(np.float32)
    ab = jnp.asarray(ALPHA_BAR, jnp.float32)

    def eps_fn(x, t, y=None):  # unconditional: the label is ignored
        a = ab[t][:, None, None, None]
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * SIGMA**2 + 1 - a)

    return mu, x0, eps_fn


def linear_classifier():
    """logit_c(x) = <w_c, x> + b_c with w_1 on the left half, w_2 on the right half of the image."""
    w = np.zeros((3, H, W, 1), np.float32)
    w[0] = -0.2
    w[1, :, : W // 2] = 1.0
    w[2, :, W // 2:] = 1.0
    b = np.array([0.5, 0.0, 0.0], np.float32)

    def logit_fn(x, t):
        del t
        return jnp.einsum("bhwc,khwc->bk", x, w) + b

    return w, b, logit_fn


def closed_form_models(seed=0):
    """The Gaussian eps and the linear classifier as `TranslationModels` (+ mu, x0, w, b)."""
    mu, x0, eps_fn = gaussian_model(seed)
    w, b, logit_fn = linear_classifier()
    models = TranslationModels(Partial(eps_fn), Partial(logit_fn), ALPHA_BAR, (H, W, 1),
                               CLASSES, config=None)
    return models, mu, x0, w, b


def translation(models, level, num_steps, reference="x0", smooth_sigma=1.0):
    return make_translation(models, dict(level=level, num_steps=num_steps, reference=reference,
                                         smooth_sigma=smooth_sigma, unroll=1,
                                         guidance="sigmoid"))


def translate(models, t, x, index, direction, scale):
    """x0 -> encode -> guided decode along `Translation` ``t`` (jitted): the translated films."""
    @jax.jit
    def run(x, guidance):
        return t.decode(models.eps_fn, models.logit_fn, t.encode(models.eps_fn, x), x, guidance)[0]

    return run(x, Guidance(np.asarray(index, np.int32), np.asarray(direction, np.float32),
                           np.float32(scale)))


def numpy_translate(mu, logit_w, logit_b, x0, grid, index, direction, scale):
    """float64 NumPy reference of encode + guided decode with the Gaussian model's exact eps."""
    ab = ALPHA_BAR[grid]

    def eps(x, t):
        a = ALPHA_BAR[t]
        return np.sqrt(1 - a) * (x - np.sqrt(a) * mu) / (a * SIGMA**2 + 1 - a)

    def step(x, e, a, a_next):
        return np.sqrt(a_next) * (x - np.sqrt(1 - a) * e) / np.sqrt(a) + np.sqrt(1 - a_next) * e

    x = x0.astype(np.float64)
    for k in range(len(grid) - 1):
        x = step(x, eps(x, grid[k]), ab[k], ab[k + 1])
    for k in range(len(grid) - 1, 0, -1):
        z = np.einsum("bhwc,hwc->b", x, logit_w[index]) + logit_b[index]
        grad = direction / (1 + np.exp(direction * z))          # d/dz log sigmoid(d z)
        grad_x = grad[:, None, None, None] * logit_w[index]
        e = eps(x, grid[k]) - scale * np.sqrt(1 - ab[k]) * grad_x
        x = step(x, e, ab[k], ab[k - 1])
    return x


def test_ddim_grid_has_exact_moves_and_bad_grids_raise():
    np.testing.assert_array_equal(sampling.ddim_grid(1000, 500, 10), np.arange(0, 501, 50))
    assert len(sampling.ddim_grid(1000, 333, 7)) == 8
    with pytest.raises(ValueError, match="encode level"):
        sampling.ddim_grid(1000, 1000, 10)
    with pytest.raises(ValueError, match="increase strictly"):
        sampling.grid_levels(ALPHA_BAR, np.array([0, 50, 50]))
    with pytest.raises(ValueError, match="increase strictly"):
        sampling.grid_levels(ALPHA_BAR, np.array([0, 500, 1000]))


def test_translate_matches_float64_numpy():
    models, mu, x0, w, b = closed_form_models()
    t = translation(models, 400, 8)
    for index, direction in ((1, 1.0), (2, -1.0)):
        got = translate(models, t, x0, index, direction, 2.0)
        want = numpy_translate(mu.astype(np.float64), w, b, x0, t.grid, index, direction, 2.0)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_encode_follows_the_exact_probability_flow():
    """For Gaussian data the ODE keeps z = (x_t - sqrt(ab_t) mu) / sqrt(ab_t SIGMA^2 + 1 - ab_t)
    constant; DDIM is its first-order discretisation, so the error halves when the steps double."""
    mu, x0, eps_fn = gaussian_model()
    level = 500
    z = (x0 - np.sqrt(ALPHA_BAR[0]) * mu) / np.sqrt(ALPHA_BAR[0] * SIGMA**2 + 1 - ALPHA_BAR[0])
    exact = np.sqrt(ALPHA_BAR[level]) * mu + z * np.sqrt(ALPHA_BAR[level] * SIGMA**2
                                                        + 1 - ALPHA_BAR[level])
    errors = []
    for steps in (25, 50, 100):
        grid = sampling.ddim_grid(1000, level, steps)
        x_L = jax.jit(lambda x: sampling.ddim_encode(eps_fn, x, ALPHA_BAR, grid))(x0)
        errors.append(float(np.max(np.abs(np.asarray(x_L) - exact))))
    assert errors[2] < 0.1, errors                       # |x_L| is up to ~3.6 here
    assert errors[1] < 0.6 * errors[0] and errors[2] < 0.6 * errors[1], errors


def test_unguided_round_trip_returns_the_image():
    """Tolerance: max |x0 - decode(encode(x0))| < 0.05 with 100 moves each way (pixel std 0.3)."""
    models, _, x0, _, _ = closed_form_models()
    t = translation(models, 500, 100)
    back = jax.jit(lambda x: t.reconstruct(models.eps_fn, t.encode(models.eps_fn, x)))(x0)
    assert float(np.max(np.abs(np.asarray(back) - x0))) < 0.05


def test_plain_decode_is_the_guided_decode_at_scale_zero():
    """The reconstruction (no classifier gradient) against the guided decode at s = 0 (1e-6) and
    the float64 reference at s = 0 (1e-4, as `test_translate_matches_float64_numpy`)."""
    models, mu, x0, w, b = closed_form_models()
    t = translation(models, 400, 8)
    x_L = jax.jit(t.encode)(models.eps_fn, x0)
    plain = jax.jit(t.reconstruct)(models.eps_fn, x_L)
    guided = translate(models, t, x0, 1, 1.0, 0.0)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(guided), atol=1e-6)
    want = numpy_translate(mu.astype(np.float64), w, b, x0, t.grid, 1, 1.0, 0.0)
    np.testing.assert_allclose(np.asarray(plain), want, rtol=1e-4, atol=1e-4)


def test_guided_eps_is_the_closed_form():
    _, x0, eps_fn = gaussian_model()
    w, b, logit_fn = linear_classifier()
    t, a = 300, float(ALPHA_BAR[300])
    run = jax.jit(lambda x, g: sampling.guided_eps(eps_fn, logit_fn, x, t, a, g))
    for index, direction in ((1, 1.0), (2, -1.0), (0, 1.0)):
        got = run(x0, Guidance(index, direction, 5.0))
        z = np.einsum("bhwc,hwc->b", x0.astype(np.float64), w[index]) + b[index]
        grad = (direction / (1 + np.exp(direction * z)))[:, None, None, None] * w[index]
        eps = np.asarray(eps_fn(jnp.asarray(x0), jnp.full((4,), t, jnp.int32)))
        np.testing.assert_allclose(np.asarray(got), eps - 5.0 * np.sqrt(1 - a) * grad,
                                   rtol=1e-5, atol=1e-5)


def test_guidance_moves_the_target_logit_where_the_classifier_looks():
    models, _, x0, _, _ = closed_form_models()
    t = translation(models, 500, 10)
    plain = np.asarray(translate(models, t, x0, 1, 1.0, 0.0))
    towards = np.asarray(translate(models, t, x0, 1, 1.0, 3.0))
    away = np.asarray(translate(models, t, x0, 1, -1.0, 3.0))
    logit = lambda x: np.asarray(models.logit_fn(x, None))[:, 1]
    assert np.all(logit(towards) > logit(plain) + 0.5)
    assert np.all(logit(away) < logit(plain) - 0.5)
    # "Left" looks at the left half only: the guided change stays there.
    change = np.abs(towards - plain)
    assert change[:, :, W // 2:].max() < 1e-3 < change[:, :, : W // 2].max()


def test_per_example_directions_equal_separate_runs():
    models, _, x0, _, _ = closed_form_models()
    t = translation(models, 300, 6)
    mixed = translate(models, t, x0, [1, 2, 1, 2], [1.0, -1.0, -1.0, 1.0], 3.0)
    for row, (i, d) in enumerate(((1, 1.0), (2, -1.0), (1, -1.0), (2, 1.0))):
        alone = translate(models, t, x0[row:row + 1], i, d, 3.0)
        np.testing.assert_allclose(np.asarray(mixed[row:row + 1]), np.asarray(alone), atol=1e-5)


@pytest.fixture(scope="module")
def heatmap_setup():
    models, _, x0, _, _ = closed_form_models()
    fn = make_heatmap_fn(models, "Left,no:Right,No Finding", translation(models, 400, 6), 3.0)
    x = np.clip(x0, -1, 1)
    return fn, x, models, fn(x)


def test_vmapped_targets_equal_a_per_class_loop(heatmap_setup):
    """Tolerance 1e-5 (float32, same operations batched differently)."""
    fn, x, models, (translated, raw) = heatmap_setup
    assert translated.shape == (3, 4, H, W, 1) and raw.shape == (4, H, W, 3)
    for k, target in enumerate(fn.targets):
        alone = translate(models, fn.translation, x, target.index, target.direction, 3.0)
        np.testing.assert_allclose(np.asarray(translated[k]), np.asarray(alone), atol=1e-5)
        np.testing.assert_allclose(np.asarray(raw[..., k]),
                                   np.asarray(raw_heatmap(x, alone, 1.0)), atol=1e-5)


def test_reconstruction_reference_subtracts_the_unguided_decode(heatmap_setup):
    """heatmaps.reference = "reconstruction": |x_c - DDIM(x0) at scale 0| instead of |x_c - x0|,
    and the map differs from the x0 one by exactly the inversion error's share."""
    fn, x, models, (translated, raw_x0) = heatmap_setup
    rec_fn = make_heatmap_fn(models, "Left,no:Right,No Finding",
                             translation(models, 400, 6, reference="reconstruction"), 3.0)
    assert rec_fn.settings()["reference"] == "reconstruction"
    rec_translated, rec_raw = rec_fn(x)
    np.testing.assert_allclose(np.asarray(rec_translated), np.asarray(translated), atol=1e-5)
    unguided = translate(models, fn.translation, x, 0, 0.0, 0.0)
    for k in range(len(fn.targets)):
        np.testing.assert_allclose(np.asarray(rec_raw[..., k]),
                                   np.asarray(raw_heatmap(unguided, translated[k], 1.0)), atol=1e-5)
    assert float(np.abs(np.asarray(rec_raw) - np.asarray(raw_x0)).max()) > 1e-3


def test_translation_pieces_with_per_row_targets_equal_the_heatmap_program(heatmap_setup):
    """The localization check's use of the one path: encode once, one decode with a different
    target per row, against the compiled program's per-target outputs (1e-5)."""
    fn, x, models, (translated, raw) = heatmap_setup
    t, eps, logit = fn.translation, models.eps_fn, models.logit_fn  # model closures as pytrees
    x_L = jax.jit(t.encode)(eps, x)
    k = np.arange(len(x)) % len(fn.targets)                       # row r -> target k[r]
    guidance = Guidance(np.array([fn.targets[j].index for j in k], np.int32),
                        np.array([fn.targets[j].direction for j in k], np.float32),
                        np.float32(fn.scale))
    x_c, heat = jax.jit(t.decode)(eps, logit, x_L, x, guidance)
    rows = np.arange(len(x))
    np.testing.assert_allclose(np.asarray(x_c), np.asarray(translated)[k, rows], atol=1e-5)
    np.testing.assert_allclose(np.asarray(heat), np.asarray(raw)[rows, ..., k], atol=1e-5)


def test_softmax_guidance_is_the_closed_form_and_the_finite_difference():
    """``heatmaps.guidance = "softmax"`` (the authors' form): eps - s sqrt(1 - a) d grad log
    softmax(logits)_c.  Linear classifier: grad = w_c - sum_k p_k w_k in float64 NumPy (1e-5);
    a small non-linear classifier: central finite differences of its float64 log-softmax."""
    _, x0, eps_fn = gaussian_model()
    w, b, logit_fn = linear_classifier()
    t, a = 300, float(ALPHA_BAR[300])
    eps = np.asarray(eps_fn(jnp.asarray(x0), jnp.full((4,), t, jnp.int32)), np.float64)
    run = jax.jit(lambda x, g, logits: sampling.guided_eps(eps_fn, logits, x, t, a, g, "softmax"),
                  static_argnums=2)
    z = np.einsum("bhwc,khwc->bk", x0.astype(np.float64), w) + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    for index, direction in ((0, 1.0), (2, -1.0)):
        got = run(x0, Guidance(index, direction, 5.0), logit_fn)
        grad = w[index][None] - np.einsum("bk,khwc->bhwc", p, w)
        np.testing.assert_allclose(np.asarray(got), eps - 5.0 * np.sqrt(1 - a) * direction * grad,
                                   rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(3)
    first, second = rng.normal(size=(H * W, 6)) / 4, rng.normal(size=(6, 3))

    def mlp(x):  # [B, H, W, 1] -> [B, 3]; NumPy and JAX alike
        return jnp.tanh(x.reshape(x.shape[0], -1) @ first) @ second

    def log_softmax_np(x, c):
        z = np.tanh(x.reshape(-1) @ first) @ second
        return z[c] - np.log(np.sum(np.exp(z)))

    got = np.asarray(run(x0, Guidance(1, 1.0, 5.0), lambda x, t: mlp(x)))
    x = x0[0].astype(np.float64)
    step, grad = 1e-5, np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += step
        down[i] -= step
        grad[i] = (log_softmax_np(up, 1) - log_softmax_np(down, 1)) / (2 * step)
    np.testing.assert_allclose(got[0], eps[0] - 5.0 * np.sqrt(1 - a) * grad, rtol=1e-4, atol=1e-4)
