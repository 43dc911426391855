"""Seed summaries and paired 95 % intervals against hand-worked values."""

import math

import numpy as np
import pytest

from daug_jax import metrics


def test_mean_std_is_the_sample_std_and_keeps_undefined_runs():
    got = metrics.mean_std([0.5, 0.7, None, 0.9])
    assert got["mean"] == pytest.approx(0.7)
    assert got["std"] == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / 2)
    assert got["per_seed"] == [0.5, 0.7, None, 0.9]
    assert metrics.mean_std([0.3])["std"] is None
    assert metrics.mean_std([None])["mean"] is None


def test_paired_difference_t_interval_by_hand():
    # Differences 1, 2, 3: mean 2, s = 1, t(0.975, 2) = 4.302653 -> half width 4.302653 / sqrt 3.
    got = metrics.paired_difference([1.0, 2.5, 3.0], [0.0, 0.5, 0.0])
    half = 4.302652729749464 / math.sqrt(3)
    assert got["mean"] == pytest.approx(2.0) and got["n"] == 3
    np.testing.assert_allclose(got["ci95"], [2.0 - half, 2.0 + half], rtol=1e-9)
    assert not metrics.excludes_zero(got)  # [-0.48, 4.48]: three seeds need a consistent effect
    assert metrics.excludes_zero(metrics.paired_difference([1.0, 1.1, 0.9], [0.0, 0.0, 0.0]))
    # A pair with an undefined side is dropped; one pair left has no interval.
    one = metrics.paired_difference([1.0, None], [0.5, 0.2])
    assert one == {"mean": 0.5, "ci95": None, "n": 1}
    assert not metrics.excludes_zero(one)
    spread = metrics.paired_difference([1.0, -1.0, 0.5], [0.0, 0.0, 0.0])
    assert spread["ci95"][0] < 0 < spread["ci95"][1] and not metrics.excludes_zero(spread)
    with pytest.raises(ValueError, match=r"same length, got \(2,\) and \(3,\)"):
        metrics.paired_difference([1, 2], [1, 2, 3])


def test_paired_interval_covers_at_its_nominal_rate():
    """Coverage of the true mean over 4,000 normal samples of n = 3: 95 % +- 1 % (3 s.e.)."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(4000):
        d = rng.normal(0.3, 1.0, size=3)
        lo, hi = metrics.paired_difference(d, np.zeros(3))["ci95"]
        hits += lo <= 0.3 <= hi
    assert abs(hits / 4000 - 0.95) < 0.011
