"""The hybrid contrastive loss against an independent float64 NumPy reference, plus its invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daug_jax import losses
from daug_jax.tower_inputs import class_prompts

B, C, D = 6, 4, 8


# --------------------------------------------------------------------- float64 NumPy reference


def _logsumexp(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def ref_clip(u, v, tau):
    s = tau * u.astype(np.float64) @ v.astype(np.float64).T
    diag = np.diag(s)
    rows = np.mean(_logsumexp(s, 1) - diag)  # image -> text: softmax over reports
    cols = np.mean(_logsumexp(s, 0) - diag)  # text -> image: softmax over images
    return 0.5 * (rows + cols)


def ref_class(u, w, y, m, a, b):
    z = a * u.astype(np.float64) @ w.astype(np.float64).T + b
    softplus = np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))
    bce = softplus - y * z
    return np.sum(m * bce) / max(m.sum(), 1.0)


# --------------------------------------------------------------------- helpers


def unit(rng, n, d=D):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    u, v, w = unit(rng, B), unit(rng, B), unit(rng, C)
    y = (rng.random((B, C)) < 0.4).astype(np.float32)
    m = (rng.random((B, C)) < 0.7).astype(np.float32)
    return u, v, w, y, m


KW = dict(logit_scale=14.3, class_scale=10.0, class_bias=-2.0, clip_weight=0.7)


def hybrid(u, v, w, y, m, *, logit_scale, class_scale, class_bias, clip_weight,
           prompts="single"):
    """`losses.hybrid_contrastive_loss` on the towers' output dict made of these arrays."""
    towers = {"image_emb": u, "text_emb": v, "class_emb": w, "logit_scale": logit_scale,
              "class_scale": class_scale, "class_bias": class_bias}
    return losses.hybrid_contrastive_loss(towers, y, m, clip_weight=clip_weight, prompts=prompts)


# --------------------------------------------------------------------- agreement with the reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_three_match_float64_reference(seed):
    u, v, w, y, m = batch(seed)
    np.testing.assert_allclose(losses.clip_loss(u, v, 14.3), ref_clip(u, v, 14.3), rtol=1e-5)
    np.testing.assert_allclose(losses.class_sigmoid_loss(u, w, y, m, 10.0, -2.0),
                               ref_class(u, w, y, m, 10.0, -2.0), rtol=1e-5)
    loss, aux = hybrid(u, v, w, y, m, **KW)
    expected_it, expected_ic = ref_clip(u, v, 14.3), ref_class(u, w, y, m, 10.0, -2.0)
    np.testing.assert_allclose(aux["image_text"], expected_it, rtol=1e-5)
    np.testing.assert_allclose(aux["image_class"], expected_ic, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.7 * expected_it + 0.3 * expected_ic, rtol=1e-5)
    assert loss.dtype == jnp.float32


@pytest.mark.parametrize("w", [0.0, 1.0])
def test_clip_weight_endpoints_are_single_terms(w):
    u, v, c, y, m = batch(3)
    loss, aux = hybrid(u, v, c, y, m, **{**KW, "clip_weight": w})
    np.testing.assert_allclose(loss, aux["image_text"] if w else aux["image_class"], rtol=1e-6)
    # w = 0: the reports have no influence (class-only towers train without them).
    grad_v = jax.grad(lambda t: hybrid(u, t, c, y, m, **{**KW, "clip_weight": w})[0])(v)
    assert (np.abs(np.asarray(grad_v)).max() == 0.0) == (w == 0.0)


def test_labels_and_mask_numpy_in_numpy_out():
    raw = np.array([[1, 0, -1], [0, 1, 1]], np.int8)
    missing = np.array([[False, True, False], [False, False, False]])
    labels, mask = losses.labels_and_mask(raw, "ignore", missing=missing)
    assert isinstance(labels, np.ndarray) and isinstance(mask, np.ndarray)
    want = [np.asarray(a) for a in losses.labels_and_mask(jnp.asarray(raw), "ignore",
                                                           missing=jnp.asarray(missing))]
    np.testing.assert_array_equal(labels, want[0])
    np.testing.assert_array_equal(mask, want[1])
    np.testing.assert_array_equal(mask, [[1, 0, 0], [1, 1, 1]])


def test_empty_mask_gives_zero_class_loss():
    u, v, w, y, _ = batch()
    assert float(losses.class_sigmoid_loss(u, w, y, np.zeros_like(y), 10.0, -2.0)) == 0.0


def test_joint_batch_permutation_invariance():
    u, v, w, y, m = batch(3)
    perm = np.random.default_rng(0).permutation(B)
    loss, aux = hybrid(u, v, w, y, m, **KW)
    loss_p, aux_p = hybrid(u[perm], v[perm], w, y[perm], m[perm], **KW)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
    np.testing.assert_allclose(aux_p["image_text"], aux["image_text"], rtol=1e-6)
    # A permutation of reports alone breaks the pairing, so the loss must change.
    assert abs(float(losses.clip_loss(u, v[perm], 14.3)) - float(aux["image_text"])) > 1e-3


# --------------------------------------------------------------------- limits


def test_aligned_pairs_at_high_scale_give_near_zero_loss():
    basis = np.eye(D, dtype=np.float32)
    u = basis[:B]  # orthonormal: matching logit 100, every other logit 0
    assert float(losses.clip_loss(u, u, 100.0)) < 1e-6
    # One finding per image, its embedding the class prompt's: z = +50 for it, -50 for the others.
    w = basis[:C]
    labels = np.arange(B) % C
    y = np.eye(C, dtype=np.float32)[labels]
    assert float(losses.class_sigmoid_loss(w[labels], w, y, np.ones_like(y), 100.0, -50.0)) < 1e-6
    # The same embeddings with the labels flipped are maximally wrong.
    assert float(losses.class_sigmoid_loss(w[labels], w, 1 - y, np.ones_like(y), 100.0, -50.0)) > 10


@pytest.mark.parametrize("kind", ["orthogonal", "identical"])
def test_finite_value_and_gradient_at_scale_100(kind):
    if kind == "orthogonal":
        u = v = np.eye(D, dtype=np.float32)[:B]
        w = np.eye(D, dtype=np.float32)[B - C:B]
    else:
        u = v = np.tile(np.eye(D, dtype=np.float32)[:1], (B, 1))
        w = np.tile(u[:1], (C, 1))
    y = np.eye(C, dtype=np.float32)[np.arange(B) % C]

    def f(u, v, w):
        return hybrid(u, v, w, y, np.ones_like(y), logit_scale=100.0,
                                              class_scale=100.0, class_bias=-10.0,
                                              clip_weight=0.5)[0]

    value, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(u, v, w)
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in grads)
    if kind == "identical":  # every logit equal: the softmax is uniform over the batch
        np.testing.assert_allclose(losses.clip_loss(u, v, 100.0), np.log(B), rtol=1e-5)


# --------------------------------------------------------------------- masking


def test_masked_entries_change_neither_value_nor_gradient():
    u, v, w, y, m = batch(4)
    m[:, 2] = 0.0  # class 2 masked for every image, so its logits may change freely
    y2 = np.where(m > 0, y, 1.0 - y).astype(np.float32)  # flip every masked label
    y2[0, 2] = np.nan  # a missing label left in place must not leak either
    w2 = w.copy()
    w2[2] = unit(np.random.default_rng(9), 1)[0]  # a different class-2 prompt -> other logits

    def f(u, w, y):
        return hybrid(u, v, w, y, m, **KW)[0]

    value, grad = jax.value_and_grad(f)(u, w, y)
    value2, grad2 = jax.value_and_grad(f)(u, w2, y2)
    np.testing.assert_allclose(value2, value, rtol=1e-6)
    np.testing.assert_allclose(grad2, grad, rtol=1e-6, atol=1e-7)
    # The control: the same change with class 2 counted does move the loss.
    m_all = np.ones_like(m)
    changed = losses.class_sigmoid_loss(u, w2, np.nan_to_num(y2), m_all, 10.0, -2.0)
    assert abs(float(changed) - float(losses.class_sigmoid_loss(u, w, y, m_all, 10.0, -2.0))) > 1e-3


# --------------------------------------------------------------------- dtypes, jit, shapes


def test_bfloat16_inputs_give_finite_float32_loss_close_to_float32():
    u, v, w, y, m = batch(5)
    loss32, _ = hybrid(u, v, w, y, m, **KW)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    loss16, aux16 = hybrid(bf(u), bf(v), bf(w), bf(y), bf(m), **KW)
    assert loss16.dtype == jnp.float32 and aux16["image_text"].dtype == jnp.float32
    assert np.isfinite(loss16)
    # bfloat16 keeps 8 mantissa bits: inputs move by <= 2^-9 relative, logits (scale 14) by ~0.05.
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    # Beyond the input rounding nothing is lost: the arithmetic itself runs in float32.
    rounded = [np.asarray(bf(x), np.float32) for x in (u, v, w, y, m)]
    np.testing.assert_allclose(loss16, hybrid(*rounded, **KW)[0], rtol=1e-6)


def test_works_under_jit():
    u, v, w, y, m = batch(6)
    jitted = jax.jit(lambda *a: hybrid(*a, **KW))
    loss, aux = jitted(u, v, w, y, m)
    eager, aux_eager = hybrid(u, v, w, y, m, **KW)
    np.testing.assert_allclose(loss, eager, rtol=1e-6)
    np.testing.assert_allclose(aux["image_class"], aux_eager["image_class"], rtol=1e-6)
    # Learnable scales arrive as traced scalars during training.
    scaled = jax.jit(losses.clip_loss)(u, v, jnp.float32(14.3))
    np.testing.assert_allclose(scaled, ref_clip(u, v, 14.3), rtol=1e-5)


def test_shape_mismatches_raise():
    u, v, w, y, m = batch()
    with pytest.raises(AssertionError, match="text_emb"):
        losses.clip_loss(u, v[:-1], 1.0)
    with pytest.raises(AssertionError, match="class_emb"):
        losses.class_sigmoid_loss(u, w[:, :-1], y, m, 1.0, 0.0)
    with pytest.raises(AssertionError, match=r"labels must be \[B, C\]"):
        losses.class_sigmoid_loss(u, w, y[:, :-1], m[:, :-1], 1.0, 0.0)
    with pytest.raises(AssertionError, match="mask"):
        losses.class_sigmoid_loss(u, w, y, m[:-1], 1.0, 0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        losses.clip_loss(u, v, np.ones(2))


# --------------------------------------------------------------------- prompt forms


def ref_paired(u, w_pair, y, m, a):
    """float64 BCE on the softmax over each class's (absent, present) prompt pair."""
    cos = u.astype(np.float64) @ w_pair.astype(np.float64).T  # [B, 2C]
    c = w_pair.shape[0] // 2
    pair = np.stack([a * cos[:, :c], a * cos[:, c:]], axis=-1)  # [B, C, 2]
    p = np.exp(pair[..., 1] - _logsumexp(pair, -1))  # softmax(...)[1]
    bce = -(y * np.log(p) + (1 - y) * np.log1p(-p))
    return np.sum(m * bce) / max(m.sum(), 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_paired_loss_matches_float64_pair_softmax_bce(seed):
    u, v, _, y, m = batch(seed)
    w_pair = unit(np.random.default_rng(seed + 10), 2 * C)  # rows: C absent, then C present
    want = ref_paired(u, w_pair, y, m, 10.0)
    for bias in (0.0, -2.0):  # the bias is not used in the paired form
        got = losses.class_sigmoid_loss(u, w_pair, y, m, 10.0, bias, form="paired")
        np.testing.assert_allclose(got, want, rtol=1e-5)
    loss, aux = jax.jit(lambda *a: hybrid(*a, **KW, prompts="paired"))(
        u, v, w_pair, y, m)
    np.testing.assert_allclose(aux["image_class"], want, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.7 * ref_clip(u, v, 14.3) + 0.3 * want, rtol=1e-5)
    # Swapping the halves (absent <-> present) is a different model: the loss must change.
    swapped = np.concatenate([w_pair[C:], w_pair[:C]])
    assert abs(float(losses.class_sigmoid_loss(u, swapped, y, m, 10.0, 0.0, form="paired"))
               - want) > 1e-3
    grad = jax.grad(lambda w: losses.class_sigmoid_loss(u, w, y, m, 10.0, 0.0, form="paired"))(
        jnp.asarray(w_pair))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0


def test_class_logits_numpy_and_jax_agree():
    u, _, w, _, _ = batch(4)
    for form, cls in (("single", w), ("paired", np.concatenate([w, w[::-1]]))):
        host = losses.class_logits(u.astype(np.float64), cls.astype(np.float64), 10.0, -2.0, form)
        device = losses.class_logits(jnp.asarray(u), jnp.asarray(cls), 10.0, -2.0, form)
        assert isinstance(host, np.ndarray) and host.dtype == np.float64
        assert isinstance(device, jax.Array) and device.dtype == jnp.float32
        assert host.shape == (B, C)
        np.testing.assert_allclose(device, host, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses.class_logits(u, w, 10.0, -2.0),
                               10.0 * u.astype(np.float64) @ w.T - 2.0, rtol=1e-6)


def test_prompt_form_errors_and_prompt_layout():
    u, _, w, y, m = batch()
    with pytest.raises(ValueError, match="unknown prompt form 'pair'"):
        losses.class_sigmoid_loss(u, w, y, m, 1.0, 0.0, form="pair")
    with pytest.raises(ValueError, match=r"paired prompts need class_emb \[2C, D\]"):
        losses.class_logits(u, w[:3], 1.0, 0.0, "paired")
    # Paired prompts [2C, D] with labels [B, 2C]: the labels must be [B, C].
    with pytest.raises(AssertionError, match=r"labels must be \[B, C\] = \(6, 2\)"):
        losses.class_sigmoid_loss(u, w, y, m, 1.0, 0.0, form="paired")
    names = ["No Finding", "Pleural Effusion", "Edema"]
    single = class_prompts(names)
    assert single == class_prompts(names, "single")
    assert class_prompts(names, "paired") == [
        "a chest X-ray with abnormal findings", "a chest X-ray with no pleural effusion",
        "a chest X-ray with no edema", *single]
    with pytest.raises(ValueError, match="unknown prompt form"):
        class_prompts(names, "pairs")


# --------------------------------------------------------------------- label policies

# One row per case: positive, negative, uncertain, missing (NaN).
RAW = np.array([[1.0, 0.0, -1.0, np.nan],
                [-1.0, -1.0, 1.0, 0.0]], np.float32)


@pytest.mark.parametrize("policy, labels, mask", [
    ("ignore", [[1, 0, 0, 0], [0, 0, 1, 0]], [[1, 1, 0, 0], [0, 0, 1, 1]]),
    ("ones", [[1, 0, 1, 0], [1, 1, 1, 0]], [[1, 1, 1, 0], [1, 1, 1, 1]]),
    ("zeros", [[1, 0, 0, 0], [0, 0, 1, 0]], [[1, 1, 1, 0], [1, 1, 1, 1]]),
])
def test_label_policies_by_hand(policy, labels, mask):
    got_labels, got_mask = losses.labels_and_mask(RAW, policy)
    np.testing.assert_array_equal(got_labels, np.array(labels, np.float32))
    np.testing.assert_array_equal(got_mask, np.array(mask, np.float32))
    assert got_labels.dtype == jnp.float32 and got_mask.dtype == jnp.float32


def test_label_policy_default_and_missing_argument_with_int_labels():
    raw = np.array([[1, -1, 0], [1, 0, -1]], np.int8)
    missing = np.array([[False, False, True], [True, False, False]])
    labels, mask = losses.labels_and_mask(raw, missing=missing)  # default "ignore"
    np.testing.assert_array_equal(labels, [[1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 0, 0], [0, 1, 0]])
    labels, mask = losses.labels_and_mask(raw, "ones", missing=missing)
    np.testing.assert_array_equal(labels, [[1, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(mask, [[1, 1, 0], [0, 1, 1]])


def test_label_policy_under_jit():
    f = jax.jit(losses.labels_and_mask, static_argnames="policy")
    for policy in losses.LABEL_POLICIES:
        for got, want in zip(f(RAW, policy=policy), losses.labels_and_mask(RAW, policy)):
            np.testing.assert_array_equal(got, want)


def test_bad_policy_and_bad_values_raise():
    with pytest.raises(ValueError, match="'u-ones'.*ignore, ones, zeros"):
        losses.labels_and_mask(RAW, "u-ones")
    with pytest.raises(ValueError, match=r"\[1, 2\] is 2.0"):
        losses.labels_and_mask(np.array([[0, 1, 0], [1, 0, 2]], np.int8))
    with pytest.raises(AssertionError, match="missing"):
        losses.labels_and_mask(RAW, missing=np.zeros((2, 3), bool))
