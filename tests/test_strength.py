"""Classifier AUROC across noise levels, on a classifier whose answer is known."""

import numpy as np
import pytest
from jax.tree_util import Partial

from daug_jax.diffusion.strength import classifier_auroc
from daug_jax.heatmaps import TranslationModels
from tests.test_heatmaps import ALPHA_BAR, CLASSES, H, W, linear_logits, zero_eps


def test_auroc_is_perfect_on_clean_films_and_falls_to_chance_under_noise():
    rng = np.random.default_rng(0)
    n = 64
    labels = np.zeros((n, 3), np.int8)
    labels[:, 1] = rng.uniform(size=n) < 0.5          # "Left": a bright left half
    labels[:, 2] = rng.uniform(size=n) < 0.5          # "Right": a bright right half
    labels[:4, 2] = -1                                # uncertain: not counted
    images = np.full((n, H, W, 1), -0.5, np.float32)
    images[labels[:, 1] == 1, :, : W // 2] = 0.5
    images[labels[:, 2] == 1, :, W // 2:] = 0.5
    models = TranslationModels(Partial(zero_eps), Partial(linear_logits), ALPHA_BAR,
                               (H, W, 1), CLASSES, None)
    out = classifier_auroc(models, images, labels, CLASSES, levels=(0, 999), batch_size=24)
    assert set(out) == {"0", "999"}
    assert out["0"]["per_class"]["Left"] == 1.0 and out["0"]["per_class"]["Right"] == 1.0
    assert out["0"]["per_class"]["No Finding"] is None  # no positive: undefined, not 0.5
    # At t = 999 the film keeps sqrt(alpha_bar) ~ 0.006 of its signal: near chance.
    assert out["999"]["macro"] == pytest.approx(0.5, abs=0.2)
    assert out["999"]["macro"] < 0.9
