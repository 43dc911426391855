"""The multi-channel ResNet image tower: shapes, stem adaptation, BatchNorm modes, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daug_jax.models import vision

# Small enough to compile in about a second on 2 cores.
SMALL = dict(stage_sizes=(1, 1), widths=(4, 8), stem_width=4, norm_groups=2)
# RBG keys: the initialiser compiles several times faster than with threefry keys on CPU.
KEY = jax.random.key(0, impl="rbg")


def _tower(in_channels, block="basic", norm="group", dtype=jnp.float32, embed_dim=6):
    cfg = vision.resnet_config("tiny", block=block, **SMALL)
    return vision.VisionTower(in_channels=in_channels, embed_dim=embed_dim, resnet=cfg,
                              norm=norm, dtype=dtype)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("in_channels", [1, 3, 5])
def test_output_and_param_shapes(block, in_channels):
    tower = _tower(in_channels, block)
    x = jax.ShapeDtypeStruct((2, 16, 16, in_channels), jnp.float32)
    params = jax.eval_shape(tower.init, KEY, x)["params"]
    out = jax.eval_shape(tower.apply, {"params": params}, x)
    assert out.shape == (2, 6) and out.dtype == jnp.float32
    backbone = params["backbone"]
    assert backbone["stem_conv"]["kernel"].shape == (3, 3, in_channels, 4)
    last = backbone["stage2_block1"]
    # Bottleneck blocks expand the last stage's width 4x; the projection sees that width.
    expanded = 8 * (4 if block == "bottleneck" else 1)
    assert params["proj"]["kernel"].shape == (expanded, 6)
    assert ("conv3" in last) == (block == "bottleneck")
    assert last["proj_conv"]["kernel"].shape[-1] == expanded


def test_presets_have_the_standard_sizes():
    # Parameter counts of torchvision's resnet18/50 without the 1000-way classifier.
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    for preset, expected in [("resnet18", 11_176_512), ("resnet50", 23_508_032)]:
        model = vision.ResNet(vision.resnet_config(preset), norm="batch")
        params = jax.eval_shape(model.init, KEY, x)["params"]
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        assert n == expected, preset


@pytest.fixture(scope="module")
def grey():
    """A batch of grey images: [2, 16, 16, 1] float32 in [0, 1]."""
    return jnp.asarray(np.random.default_rng(2).uniform(size=(2, 16, 16, 1)), jnp.float32)


@pytest.fixture(scope="module")
def params3(grey):
    return jax.jit(_tower(3).init)(KEY, jnp.repeat(grey, 3, -1))["params"]


def test_forward_is_finite_and_bfloat16_tracks_float32(grey, params3):
    x = jnp.concatenate([grey, grey ** 2, 1.0 - grey], axis=-1)
    tower = _tower(3)
    variables = {"params": params3}
    out32 = jax.jit(tower.apply)(variables, x)
    out16 = jax.jit(_tower(3, dtype=jnp.bfloat16).apply)(variables, x)
    assert np.isfinite(np.asarray(out32)).all()
    assert out16.dtype == jnp.float32  # bfloat16 compute, float32 embeddings
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    np.testing.assert_allclose(out16, out32, atol=0.05 * float(jnp.abs(out32).max()) + 1e-3)


def test_adapt_stem_kernel_rule_against_float64_reference():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(7, 7, 3, 5)).astype(np.float32)
    np.testing.assert_array_equal(vision.adapt_stem_kernel(kernel, 3), kernel)
    k64 = kernel.astype(np.float64)
    for n in (1, 2, 4, 5):
        adapted = vision.adapt_stem_kernel(kernel, n)
        assert adapted.shape == (7, 7, n, 5)
        expected = np.repeat(k64.mean(axis=2, keepdims=True), n, axis=2) * 3.0 / n
        np.testing.assert_allclose(adapted, expected, rtol=1e-6, atol=1e-7)
        # The scale rule: the summed filter over input channels is the RGB sum.
        np.testing.assert_allclose(adapted.sum(axis=2), k64.sum(axis=2), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[kh, kw, 3, F\].*\(7, 7, 4, 5\)"):
        vision.adapt_stem_kernel(np.zeros((7, 7, 4, 5)), 3)


def test_adapted_stem_keeps_activations_for_equal_channels(grey, params3):
    """A grey image repeated into every channel: an N-channel tower with the adapted stem and
    otherwise identical weights gives the 3-channel tower's stem activation and embedding."""

    def stem_and_embedding(tower, params, x):
        out, state = tower.apply(
            {"params": params}, x, capture_intermediates=lambda mdl, _: mdl.name == "stem_conv",
            mutable=["intermediates"])
        return state["intermediates"]["backbone"]["stem_conv"]["__call__"][0], out

    tower3 = _tower(3)
    stem3, emb3 = jax.jit(lambda p, x: stem_and_embedding(tower3, p, x))(
        params3, jnp.repeat(grey, 3, -1))
    assert float(jnp.abs(stem3).max()) > 0.1
    for n in (1, 5):
        tower_n = _tower(n)
        params_n = jax.tree.map(lambda a: a, params3)
        kernel = vision.adapt_stem_kernel(params3["backbone"]["stem_conv"]["kernel"], n)
        params_n["backbone"]["stem_conv"] = {"kernel": jnp.asarray(kernel)}
        stem_n, emb_n = jax.jit(lambda p, x: stem_and_embedding(tower_n, p, x))(
            params_n, jnp.repeat(grey, n, -1))
        np.testing.assert_allclose(stem_n, stem3, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(emb_n, emb3, rtol=1e-4, atol=1e-5)


def test_batchnorm_train_updates_stats_and_eval_uses_them():
    tower = _tower(3, norm="batch")
    x = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2.5, size=(4, 16, 16, 3)), jnp.float32)
    variables = jax.jit(tower.init)(KEY, x)
    stats0 = variables["batch_stats"]
    np.testing.assert_array_equal(stats0["backbone"]["stem_norm"]["mean"], 0.0)

    @jax.jit
    def train_apply(variables, x):
        return tower.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda mdl, _: mdl.name == "stem_conv")

    out_train, state = train_apply(variables, x)
    stem = np.asarray(state["intermediates"]["backbone"]["stem_conv"]["__call__"][0], np.float64)
    new = state["batch_stats"]["backbone"]["stem_norm"]
    # Running averages with momentum 0.9 from (mean 0, var 1), biased batch variance over B, H, W.
    np.testing.assert_allclose(new["mean"], 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-4)

    # Eval mode reads the running averages: new statistics change the output, and an example's
    # output does not depend on the rest of the batch (train mode normalises with batch stats).
    eval_apply = jax.jit(lambda v, x: tower.apply(v, x, train=False))
    updated = {"params": variables["params"], "batch_stats": state["batch_stats"]}
    out_old, out_new = eval_apply(variables, x), eval_apply(updated, x)
    assert float(jnp.abs(out_old - out_new).max()) > 1e-4
    others = x.at[1:].set(x[1:] * 3.0)
    np.testing.assert_allclose(eval_apply(updated, others)[0], out_new[0], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(train_apply(variables, others)[0][0] - out_train[0]).max()) > 1e-4


def test_wrong_channel_count_is_a_clear_error():
    tower = _tower(3)
    with pytest.raises(ValueError, match=r"expects 3 input channels.*got 1"):
        jax.eval_shape(tower.init, KEY, jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32))


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="resnet99"):
        vision.resnet_config("resnet99")
    with pytest.raises(ValueError, match="depth"):
        vision.resnet_config("tiny", depth=3)
    with pytest.raises(ValueError, match="'wide'"):
        vision.resnet_config("tiny", block="wide")
    with pytest.raises(ValueError, match="'layer'"):
        jax.eval_shape(_tower(3, norm="layer").init, KEY,
                       jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
