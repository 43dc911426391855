"""The epsilon-UNet, the noise-aware classifier and their training loop (tiny widths, CPU)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from daug_jax.data.pipeline import ArraySource
from daug_jax.diffusion.schedule import eps_loss, q_sample
from daug_jax.diffusion.sampling import Guidance
from daug_jax.diffusion.unet import DISEASED, HEALTHY, NULL_LABEL, NoiseAwareClassifier, UNet
from daug_jax.losses import labels_and_mask, masked_bce
from daug_jax.diffusion import train as dtrain
from daug_jax.heatmaps import Translation, module_fn
from experiments.diffusion import get_config

TINY = dict(ch=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)


@pytest.mark.parametrize("attention", [(), (16,)])
def test_unet_output_shape(attention):
    model = UNet(attention_resolutions=attention, num_heads=2, **TINY)
    x, t = jnp.zeros((2, 32, 32, 1)), jnp.array([3, 3], jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    assert any("AttentionBlock" in k for k in params) == bool(attention)
    eps = jax.eval_shape(model.apply, {"params": params}, x, t)
    assert eps.shape == x.shape and eps.dtype == jnp.float32
    bf16 = UNet(attention_resolutions=attention, dtype=jnp.bfloat16, **TINY)
    variables = jax.eval_shape(bf16.init, jax.random.key(0), x, t)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    assert jax.eval_shape(bf16.apply, variables, x, t).dtype == jnp.float32


def test_unet_rejects_indivisible_size():
    model = UNet(**{**TINY, "channel_mult": (1, 2, 2)})
    with pytest.raises(ValueError, match="divisible by 4"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 30, 30, 1)), jnp.zeros((1,), jnp.int32))


def test_classifier_logits_shape():
    model = NoiseAwareClassifier(num_classes=7, attention_resolutions=(8,), **TINY)
    x, t = jnp.zeros((3, 16, 16, 1)), jnp.array([0, 100, 999], jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
    logits = jax.eval_shape(model.apply, variables, x, t)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32


def test_masked_bce_value_and_gradient_ignore_uncertain():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5)) * 3
    labels = rng.choice([-1, 0, 1], size=(4, 5)).astype(np.int8)
    labels[0, 0] = -1
    known = labels >= 0
    # The towers' convention makes the targets and the mask (uncertain -> masked).
    targets, mask = labels_and_mask(labels, "ignore")
    np.testing.assert_array_equal(mask, known)
    grad_fn = jax.jit(jax.value_and_grad(lambda z: masked_bce(z, targets, mask)))
    y = np.where(known, labels, 0).astype(np.float64)
    p = 1 / (1 + np.exp(-logits))
    reference = -(y * np.log(p) + (1 - y) * np.log(1 - p))[known].mean()
    loss, _ = grad_fn(jnp.asarray(logits, jnp.float32))
    assert float(loss) == pytest.approx(reference, rel=1e-5)
    # Extreme logits where the label is uncertain change nothing, not even through a nan.
    wild = np.where(known, logits, 1e4 * np.sign(rng.normal(size=logits.shape)))
    loss_w, grad = grad_fn(jnp.asarray(wild, jnp.float32))
    assert float(loss_w) == pytest.approx(float(loss), rel=1e-6)
    assert np.all(np.asarray(grad)[~known] == 0) and np.all(np.isfinite(grad))
    # The known entries get d/dz = (sigmoid(z) - y) / n_known.
    np.testing.assert_allclose(np.asarray(grad)[known], ((p - y)[known]) / known.sum(), rtol=1e-4, atol=1e-7)
    nothing_known = jax.value_and_grad(lambda z: masked_bce(z, targets, 0 * mask))(jnp.ones((4, 5)))
    assert float(nothing_known[0]) == 0.0 and not np.any(nothing_known[1])


def _tiny_config(steps, save_every=4):
    # One resolution level: XLA:CPU compile time grows with the number of blocks, not widths.
    config = get_config()
    for name in ("unet", "classifier"):
        config[name].update(ch=8, channel_mult=(1,), num_res_blocks=1, norm_groups=4)
    config.classifier.max_level = 300
    for name in ("unet_train", "classifier_train"):
        config[name].update(steps=steps, batch_size=4, save_every=save_every, log_every=2,
                            warmup_steps=2)
    return config


def _images(n=12, size=8, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 1)).astype(np.float32)


def test_diffusion_steps_reduce_eps_loss_and_use_the_level():
    # The step train_diffusion runs, for the tiny config.
    config = _tiny_config(8)
    model, tx = dtrain.make_unet(config), dtrain.make_optimizer(config.unet_train)
    step = jax.jit(dtrain.diffusion_step_fn(model, tx, dtrain.alpha_bar_of(config),
                                            config.unet_train.ema_decay))
    # Four smooth, distinct patterns (a learnable distribution, unlike uniform noise).
    yy, xx = np.mgrid[:8, :8] / 7.0
    images = np.stack([(np.sin(3 * xx + k) * np.cos(2 * yy) + 1) / 2 for k in range(4)])[..., None]
    batch = {"image": jnp.asarray(images, jnp.float32)}
    key = jax.random.key(1)
    state = dtrain.init_state(model, tx, (8, 8, 1), jax.random.key(0), ema=True)

    # A fixed evaluation set of levels and noises, so the comparison is not noise in the loss.
    ab = jnp.asarray(dtrain.alpha_bar_of(config))
    x0 = jnp.tile(batch["image"] * 2 - 1, (2, 1, 1, 1))
    t_eval = jnp.array([50, 200, 400, 600, 700, 800, 900, 990], jnp.int32)
    n_eval = jnp.asarray(np.random.default_rng(9).standard_normal(x0.shape), jnp.float32)
    x_eval = q_sample(x0, t_eval, n_eval, ab)
    apply = jax.jit(lambda p, t: model.apply({"params": p}, x_eval, t))
    evaluate = lambda p: eps_loss(apply(p, t_eval), n_eval)

    before = float(evaluate(state["params"]))
    for _ in range(40):
        state, metrics = step(state, batch, key)
    after = float(evaluate(state["params"]))
    assert int(state["step"]) == 40 and np.isfinite(float(metrics["loss"]))
    assert after < 0.6 * before, (before, after)
    assert float(evaluate(state["ema"])) < before
    # The same inputs at other levels give other predictions: the time embedding is used.
    shifted = apply(state["params"], (t_eval + 500) % 1000)
    assert float(jnp.max(jnp.abs(shifted - apply(state["params"], t_eval)))) > 1e-2


def test_resume_equals_uninterrupted_and_load_round_trip(tmp_path):
    images = _images()
    full = dtrain.train_diffusion(_tiny_config(8), ArraySource({'image': images}), str(tmp_path / "full"))
    dtrain.train_diffusion(_tiny_config(4), ArraySource({'image': images}), str(tmp_path / "split"))
    resumed = dtrain.train_diffusion(_tiny_config(8), ArraySource({'image': images}), str(tmp_path / "split"))
    jax.tree.map(np.testing.assert_array_equal, full, resumed)

    rows = [json.loads(r) for r in open(tmp_path / "split" / "log.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 9))
    full_rows = [json.loads(r) for r in open(tmp_path / "full" / "log.jsonl")]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]

    model, params, config = dtrain.load_diffusion(str(tmp_path / "split"))
    jax.tree.map(np.testing.assert_array_equal, params, resumed)
    assert isinstance(model, UNet) and config.image_shape == (8, 8, 1)
    assert config.diffusion.schedule == "cosine" and config.unet.ch == 8
    eps = jax.eval_shape(model.apply, {"params": params}, jnp.zeros((2, 8, 8, 1)), jnp.array([1, 2]))
    assert eps.shape == (2, 8, 8, 1)

    # A changed architecture or image size refuses to resume instead of mis-restoring.
    wider = _tiny_config(10)
    wider.unet.ch = 16
    with pytest.raises(ValueError, match=r"unet\.ch: 8 -> 16"):
        dtrain.train_diffusion(wider, ArraySource({'image': images}), str(tmp_path / "split"))
    with pytest.raises(ValueError, match="image_shape"):
        dtrain.train_diffusion(_tiny_config(10), ArraySource({'image': _images(size=16)}), str(tmp_path / "split"))
    with pytest.raises(ValueError, match="not a classifier"):
        dtrain.load_classifier(str(tmp_path / "split"))


def test_train_classifier_and_load(tmp_path):
    images = _images()
    labels = np.random.default_rng(1).choice([-1, 0, 1], size=(12, 3)).astype(np.int8)
    names = ("No Finding", "Cardiomegaly", "Pleural Effusion")
    params = dtrain.train_classifier(_tiny_config(3), ArraySource({"image": images, "labels": labels}),
                                     str(tmp_path / "clf"), class_names=names)
    model, loaded, config = dtrain.load_classifier(str(tmp_path / "clf"))
    jax.tree.map(np.testing.assert_array_equal, params, loaded)
    assert config.class_names == names and config.classifier.max_level == 300
    logits = jax.eval_shape(model.apply, {"params": loaded}, jnp.zeros((2, 8, 8, 1)), jnp.array([0, 5]))
    assert logits.shape == (2, 3)
    rows = [json.loads(r) for r in open(tmp_path / "clf" / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0 <= r["accuracy"] <= 1 for r in rows)

    bad = labels.copy()
    bad[:, 2] = 2  # in every record: the first batch read names one
    with pytest.raises(ValueError, match=r"record \d+ .* label 2 in column 2"):
        dtrain.train_classifier(_tiny_config(3), ArraySource({"image": images, "labels": bad}),
                                str(tmp_path / "bad"), class_names=names)
    with pytest.raises(ValueError, match="2 class names"):
        dtrain.train_classifier(_tiny_config(3), ArraySource({"image": images, "labels": labels}),
                                str(tmp_path / "bad"), class_names=names[:2])
    with pytest.raises(ValueError, match=r"record \d+ .*\[0, 1\]"):
        dtrain.train_diffusion(_tiny_config(3), ArraySource({"image": images * 2 - 1}),
                               str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "meta.json")


# ----------------------------------------------------------------------------- class-conditional UNet
def test_null_label_is_the_model_without_a_label_embedding():
    """A class-conditional UNet (``unet.class_cond``) with the null label computes what the same
    weights compute with a zero label embedding, and what the unconditional UNet computes."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)
    t = jnp.array([5, 300, 900], jnp.int32)
    conditional = UNet(num_labels=2, **TINY)
    params = conditional.init(jax.random.key(0), x, t, t * 0)["params"]
    # Perturbed: a fresh UNet's zero-initialised output convolution would make every output 0.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape)
                                       for p, k in zip(leaves, keys)])
    assert params["label_embed"]["embedding"].shape == (3, 32)
    null = jnp.full((3,), NULL_LABEL, jnp.int32)
    zeroed = {**params, "label_embed": {"embedding": jnp.zeros((3, 32))}}
    with_null = conditional.apply({"params": params}, x, t, null)
    np.testing.assert_array_equal(
        with_null, conditional.apply({"params": zeroed}, x, t, jnp.array([1, 2, 1])))
    plain = {k: v for k, v in params.items() if k != "label_embed"}
    np.testing.assert_array_equal(with_null, UNet(**TINY).apply({"params": plain}, x, t))
    labelled = conditional.apply({"params": params}, x, t, jnp.array([1, 2, 1]))
    assert float(jnp.abs(labelled - with_null).max()) > 1e-4  # the label is used


def test_conditioned_decode_moves_a_film_towards_its_label(tmp_path):
    """Trained on two separable kinds of film (healthy: dark, "No Finding" = 1; diseased:
    bright), the encode is unconditioned and the decode conditioned on a side (no classifier
    guidance): the same films decoded on the diseased side come out brighter than decoded on
    the healthy side."""
    rng = np.random.default_rng(0)
    n = 64
    healthy = np.arange(n) % 2 == 0
    images = np.clip(np.where(healthy, 0.25, 0.75)[:, None, None, None]
                     + 0.05 * rng.normal(size=(n, 8, 8, 1)), 0, 1).astype(np.float32)
    labels = np.stack([healthy, ~healthy], axis=1).astype(np.int8)  # No Finding, Finding
    config = _tiny_config(300, save_every=300)
    config.unet.update(class_cond=True, label_dropout=0.2)
    config.unet_train.update(batch_size=16, learning_rate=3e-3, warmup_steps=10)
    ema = dtrain.train_diffusion(config, ArraySource({"image": images, "labels": labels}),
                                 str(tmp_path), class_names=("No Finding", "Finding"))
    eps_fn = module_fn(dtrain.make_unet(config), ema)
    grid = np.round(np.linspace(0, 950, 20)).astype(np.int32)  # near T: the label decides
    translation = Translation(np.asarray(dtrain.alpha_bar_of(config), np.float64), grid, 0.0,
                              "x0", 1, "sigmoid")
    films = jnp.asarray(images[healthy][:8] * 2 - 1)
    x_L = jax.jit(translation.encode)(eps_fn, films)
    zero_logits = Partial(lambda x, t: jnp.zeros((x.shape[0], 1)))  # no classifier guidance
    decoded = {label: jax.jit(translation.decode)(eps_fn, zero_logits, x_L, films,
                                                 Guidance(0, 1.0, 0.0, label))[0]
               for label in (HEALTHY, DISEASED)}
    brighter = jnp.mean(decoded[DISEASED], axis=(1, 2, 3)) - jnp.mean(decoded[HEALTHY],
                                                                      axis=(1, 2, 3))
    assert float(jnp.min(brighter)) > 0.25, brighter  # the two kinds differ by 1.0
