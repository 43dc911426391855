"""Guided DDIM translation against closed forms: a Gaussian data model gives the exact eps and the
exact probability-flow trajectory; a linear classifier gives the exact guidance gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daug_jax.diffusion import alphas_cumprod, sampling
from daug_jax.heatmaps import make_heatmap_fn, raw_heatmap, translate_python_loop

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

    def eps_fn(x, t):
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
    mu, x0, eps_fn = gaussian_model()
    w, b, logit_fn = linear_classifier()
    grid = sampling.ddim_grid(1000, 400, 8)
    run = jax.jit(lambda x, i, d: sampling.translate(eps_fn, logit_fn, x, ALPHA_BAR, grid, i, d,
                                                     2.0))
    for index, direction in ((1, 1.0), (2, -1.0)):
        got = run(x0, index, direction)
        want = numpy_translate(mu.astype(np.float64), w, b, x0, grid, index, direction, 2.0)
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
    _, x0, eps_fn = gaussian_model()
    _, _, logit_fn = linear_classifier()
    grid = sampling.ddim_grid(1000, 500, 100)
    back = jax.jit(lambda x: sampling.translate(eps_fn, logit_fn, x, ALPHA_BAR, grid, 1, 1.0,
                                                0.0))(x0)
    assert float(np.max(np.abs(np.asarray(back) - x0))) < 0.05


def test_plain_decode_is_the_guided_decode_at_scale_zero():
    """`ddim_decode` (no classifier gradient) against the guided decode at s = 0 (1e-6) and the
    float64 reference at s = 0 (1e-4, as `test_translate_matches_float64_numpy`)."""
    mu, x0, eps_fn = gaussian_model()
    w, b, logit_fn = linear_classifier()
    grid = sampling.ddim_grid(1000, 400, 8)
    x_L = jax.jit(lambda x: sampling.ddim_encode(eps_fn, x, ALPHA_BAR, grid))(x0)
    plain = jax.jit(lambda x: sampling.ddim_decode(eps_fn, x, ALPHA_BAR, grid))(x_L)
    guided = jax.jit(lambda x: sampling.guided_ddim_decode(eps_fn, logit_fn, x, ALPHA_BAR, grid,
                                                           1, 1.0, 0.0))(x_L)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(guided), atol=1e-6)
    want = numpy_translate(mu.astype(np.float64), w, b, x0, grid, 1, 1.0, 0.0)
    np.testing.assert_allclose(np.asarray(plain), want, rtol=1e-4, atol=1e-4)


def test_guided_eps_is_the_closed_form():
    _, x0, eps_fn = gaussian_model()
    w, b, logit_fn = linear_classifier()
    t, a = 300, float(ALPHA_BAR[300])
    run = jax.jit(lambda x, i, d: sampling.guided_eps(eps_fn, logit_fn, x, t, a, i, d, 5.0))
    for index, direction in ((1, 1.0), (2, -1.0), (0, 1.0)):
        got = run(x0, index, direction)
        z = np.einsum("bhwc,hwc->b", x0.astype(np.float64), w[index]) + b[index]
        grad = (direction / (1 + np.exp(direction * z)))[:, None, None, None] * w[index]
        eps = np.asarray(eps_fn(jnp.asarray(x0), jnp.full((4,), t, jnp.int32)))
        np.testing.assert_allclose(np.asarray(got), eps - 5.0 * np.sqrt(1 - a) * grad,
                                   rtol=1e-5, atol=1e-5)


def test_guidance_moves_the_target_logit_where_the_classifier_looks():
    _, x0, eps_fn = gaussian_model()
    _, _, logit_fn = linear_classifier()
    grid = sampling.ddim_grid(1000, 500, 10)
    run = jax.jit(lambda i, d, s: sampling.translate(eps_fn, logit_fn, x0, ALPHA_BAR, grid, i, d,
                                                     s))
    plain = np.asarray(run(1, 1.0, 0.0))
    towards = np.asarray(run(1, 1.0, 3.0))
    away = np.asarray(run(1, -1.0, 3.0))
    logit = lambda x: np.asarray(logit_fn(x, None))[:, 1]
    assert np.all(logit(towards) > logit(plain) + 0.5)
    assert np.all(logit(away) < logit(plain) - 0.5)
    # "Left" looks at the left half only: the guided change stays there.
    change = np.abs(towards - plain)
    assert change[:, :, W // 2:].max() < 1e-3 < change[:, :, : W // 2].max()


def test_per_example_directions_equal_separate_runs():
    _, x0, eps_fn = gaussian_model()
    _, _, logit_fn = linear_classifier()
    grid = sampling.ddim_grid(1000, 300, 6)
    run = jax.jit(lambda x, i, d: sampling.translate(eps_fn, logit_fn, x, ALPHA_BAR, grid, i, d,
                                                     3.0))
    mixed = run(x0, np.array([1, 2, 1, 2]), np.array([1.0, -1.0, -1.0, 1.0]))
    for row, (i, d) in enumerate(((1, 1.0), (2, -1.0), (1, -1.0), (2, 1.0))):
        alone = run(x0[row:row + 1], i, d)
        np.testing.assert_allclose(np.asarray(mixed[row:row + 1]), np.asarray(alone), atol=1e-5)


@pytest.fixture(scope="module")
def heatmap_setup():
    _, x0, eps_fn = gaussian_model()
    _, _, logit_fn = linear_classifier()
    fn = make_heatmap_fn(eps_fn, logit_fn, ALPHA_BAR, "Left,no:Right,No Finding", CLASSES,
                         level=400, num_steps=6, scale=3.0, smooth_sigma=1.0,
                         image_shape=(H, W, 1))
    x = np.clip(x0, -1, 1)
    return fn, x, eps_fn, logit_fn, fn(x)


def test_vmapped_targets_equal_a_per_class_loop(heatmap_setup):
    """Tolerance 1e-5 (float32, same operations batched differently)."""
    fn, x, eps_fn, logit_fn, (translated, raw) = heatmap_setup
    assert translated.shape == (3, 4, H, W, 1) and raw.shape == (4, H, W, 3)
    run = jax.jit(lambda x, i, d: sampling.translate(eps_fn, logit_fn, x, ALPHA_BAR, fn.grid,
                                                    i, d, 3.0))
    for k, target in enumerate(fn.targets):
        alone = run(x, target.index, target.direction)
        np.testing.assert_allclose(np.asarray(translated[k]), np.asarray(alone), atol=1e-5)
        np.testing.assert_allclose(np.asarray(raw[..., k]),
                                   np.asarray(raw_heatmap(x, alone, 1.0)), atol=1e-5)


def test_compiled_program_equals_python_dispatched_loop(heatmap_setup):
    """Tolerance 1e-5: the loop runs the same steps, one jitted network call at a time."""
    fn, x, _, _, (translated, raw) = heatmap_setup
    loop_translated, loop_raw = translate_python_loop(fn, x)
    np.testing.assert_allclose(np.asarray(loop_translated), np.asarray(translated), atol=1e-5)
    np.testing.assert_allclose(np.asarray(loop_raw), np.asarray(raw), atol=1e-5)


def test_reconstruction_reference_subtracts_the_unguided_decode(heatmap_setup):
    """heatmaps.reference = "reconstruction": |x_c - DDIM(x0) at scale 0| instead of |x_c - x0|;
    the compiled program and the Python loop agree (1e-5), and the map differs from the x0 one
    by exactly the inversion error's share."""
    fn, x, eps_fn, logit_fn, (translated, raw_x0) = heatmap_setup
    rec_fn = make_heatmap_fn(eps_fn, logit_fn, ALPHA_BAR, "Left,no:Right,No Finding", CLASSES,
                             level=400, num_steps=6, scale=3.0, smooth_sigma=1.0,
                             image_shape=(H, W, 1), reference="reconstruction")
    assert rec_fn.settings()["reference"] == "reconstruction"
    rec_translated, rec_raw = rec_fn(x)
    np.testing.assert_allclose(np.asarray(rec_translated), np.asarray(translated), atol=1e-5)
    unguided = jax.jit(lambda x: sampling.translate(eps_fn, logit_fn, x, ALPHA_BAR, fn.grid,
                                                    0, 0.0, 0.0))(x)
    for k in range(len(fn.targets)):
        np.testing.assert_allclose(np.asarray(rec_raw[..., k]),
                                   np.asarray(raw_heatmap(unguided, translated[k], 1.0)), atol=1e-5)
    assert float(np.abs(np.asarray(rec_raw) - np.asarray(raw_x0)).max()) > 1e-3
    _, loop_raw = translate_python_loop(rec_fn, x)
    np.testing.assert_allclose(np.asarray(loop_raw), np.asarray(rec_raw), atol=1e-5)
    with pytest.raises(ValueError, match="unknown heatmaps.reference 'x1'"):
        make_heatmap_fn(eps_fn, logit_fn, ALPHA_BAR, "Left", CLASSES, level=400, num_steps=6,
                        scale=3.0, reference="x1")


def test_translation_pieces_with_per_row_targets_equal_the_heatmap_program(heatmap_setup):
    """The localization check's use of the one path: encode once, one decode with a different
    target per row, against the compiled program's per-target outputs (1e-5); the
    reconstruction piece is the reference of ``reference="reconstruction"``."""
    fn, x, eps_fn, logit_fn, (translated, raw) = heatmap_setup
    t, eps, logit = fn.translation, fn.eps_fn, fn.logit_fn      # model closures as pytrees
    x_L = jax.jit(t.encode)(eps, x)
    k = np.arange(len(x)) % len(fn.targets)                       # row r -> target k[r]
    index = np.array([fn.targets[j].index for j in k], np.int32)
    direction = np.array([fn.targets[j].direction for j in k], np.float32)
    x_c, heat = jax.jit(t.decode)(eps, logit, x_L, x, index, direction, fn.scale)
    rows = np.arange(len(x))
    np.testing.assert_allclose(np.asarray(x_c), np.asarray(translated)[k, rows], atol=1e-5)
    np.testing.assert_allclose(np.asarray(heat), np.asarray(raw)[rows, ..., k], atol=1e-5)
    recon = jax.jit(t.reconstruct)(eps, x_L)
    rec_fn = make_heatmap_fn(eps_fn, logit_fn, ALPHA_BAR, "Left,no:Right,No Finding", CLASSES,
                             level=400, num_steps=6, scale=3.0, smooth_sigma=1.0,
                             image_shape=(H, W, 1), reference="reconstruction")
    _, rec_raw = rec_fn(x)
    _, rec_heat = jax.jit(t.decode)(eps, logit, x_L, recon, index, direction, fn.scale)
    np.testing.assert_allclose(np.asarray(rec_heat), np.asarray(rec_raw)[rows, ..., k], atol=1e-5)
