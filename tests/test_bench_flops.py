"""`bench.matmul_flops` against closed forms, and `bench_peer.compare`'s pairing arithmetic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daug_jax import bench, bench_peer
from peers import PeerStep


def _conv(x, w, stride=1):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_dot_and_conv_flops_are_twice_the_multiply_adds():
    a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 2))
    assert bench.matmul_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 3 * 5 * 7 * 2
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    conv = 2 * 2 * 8 * 8 * 4 * (3 * 3 * 3)
    assert bench.matmul_flops(_conv, x, w) == conv
    # Elementwise work is not counted.
    assert bench.matmul_flops(lambda x: jnp.tanh(x) * 2 + 1, x) == 0


def test_gradients_count_each_transposed_product():
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    conv = 2 * 2 * 8 * 8 * 4 * (3 * 3 * 3)
    loss = lambda x, w: jnp.sum(_conv(x, w) ** 2)  # noqa: E731
    # forward + weight gradient + input gradient: three convolutions of the same size.
    assert bench.matmul_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 3 * conv
    assert bench.matmul_flops(jax.grad(loss, argnums=1), x, w) == 2 * conv
    # A stride-2 conv's input gradient convolves the stride-dilated cotangent: only 1 in 4 of
    # its taps meet non-zero values, and only those are counted (as a peer framework does).
    strided = 2 * 2 * 4 * 4 * 4 * (3 * 3 * 3)
    loss2 = lambda x, w: jnp.sum(_conv(x, w, 2) ** 2)  # noqa: E731
    assert bench.matmul_flops(jax.grad(loss2, argnums=0), x, w) == pytest.approx(2 * strided)


def test_loops_count_every_trip_and_nested_programs_are_entered():
    a = jnp.ones((4, 4))

    def body(c, _):
        return c @ a, None

    loop = lambda c: jax.lax.scan(body, c, None, length=5)[0]  # noqa: E731
    assert bench.matmul_flops(loop, a) == 5 * 2 * 4 ** 3
    assert bench.matmul_flops(jax.jit(lambda c: jax.checkpoint(loop)(c)), a) == 5 * 2 * 4 ** 3


def test_compare_pairs_calls_and_takes_the_median_ratio():
    calls = {"jax": 0, "peer": 0}

    def jax_call():
        calls["jax"] += 1
        return jnp.zeros(())

    def peer_call():
        calls["peer"] += 1
        return 0.0

    out = bench_peer.compare(jax_call, PeerStep(peer_call, 110.0, 7, "fake"), jax_flops=100.0,
                             jax_params=7, repeats=3)
    assert calls == {"jax": 4, "peer": 4}  # one warm-up each, then 3 pairs
    assert len(out["ratios"]) == 3
    np.testing.assert_allclose(out["ratios"], np.array(out["peer_times_s"]) / out["jax_times_s"])
    assert out["ratio"] == sorted(out["ratios"])[1]
    assert out["flop_ratio"] == pytest.approx(1.1)
    assert (out["jax_params"], out["peer_params"], out["name"]) == (7, 7, "fake")


def test_unknown_peer_is_named():
    with pytest.raises(ValueError, match="unknown --peer 'mxnet'; valid: torch"):
        bench_peer.load("mxnet")
