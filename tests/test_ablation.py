"""The ablation's design and summary: members of both settings, mean ± sample std over seeds,
paired effects with 95 % intervals, tables."""

import math

import numpy as np
import pytest

from daug_jax.ablation import METRIC_KEYS, markdown_tables, members, summarize
from experiments.ablation import SETTINGS, variant_config

SEEDS = (0, 1, 2)
HYBRID_GAIN = {0: 0.05, 1: 0.02, 2: -0.01}  # differs by seed: an interval with width


def _results():
    """Per-member metrics: DAug adds exactly 0.1 to every metric in every seed, the hybrid loss
    HYBRID_GAIN[seed]; the seed itself shifts everything by 0.01 * seed."""
    out = {}
    for m in members(SETTINGS, SEEDS):
        setting, variant, _ = m["name"].split("/")
        value = 0.5 + 0.01 * m["seed"] + 0.1 * ("daug" in variant) \
            + HYBRID_GAIN[m["seed"]] * ("hybrid" in variant)
        out[m["name"]] = {k: value for k in METRIC_KEYS} | {"chance": {"macro_auroc": 0.5}}
    out["retrieval/hybrid/seed1"]["x2r_mAP@1"] = None  # undefined in one run
    return out


def test_members_cover_both_settings_with_the_papers_weights():
    got = members(SETTINGS, SEEDS)
    assert len(got) == 2 * 4 * 3 and len({m["name"] for m in got}) == 24
    by_name = {m["name"]: m for m in got}
    assert by_name["classification/baseline/seed0"] == {
        "name": "classification/baseline/seed0", "seed": 0, "fill": "repeat", "clip_weight": 0.0}
    assert by_name["classification/daug_hybrid/seed2"]["clip_weight"] == 0.7
    assert by_name["retrieval/daug/seed1"]["clip_weight"] == 1.0
    assert by_name["retrieval/daug/seed1"]["fill"] == "heatmaps"
    assert by_name["retrieval/hybrid/seed1"]["clip_weight"] == 0.8
    assert SETTINGS["classification"] == {"single": 0.0, "hybrid": 0.7}
    assert variant_config("hybrid", setting="classification").train.clip_weight == 0.7
    with pytest.raises(ValueError, match="setting 'detection' needs .* 'hybrid' losses"):
        members({"detection": {"single": 0.0}}, SEEDS)


def test_summary_means_stds_and_paired_effects():
    summary = summarize(_results(), SEEDS)
    assert summary["seeds"] == [0, 1, 2] and summary["chance"] == {"macro_auroc": 0.5}
    cls = summary["settings"]["classification"]
    base = cls["variants"]["baseline"]["macro_auroc"]
    assert base["per_seed"] == pytest.approx([0.5, 0.51, 0.52])
    assert base["mean"] == pytest.approx(0.51) and base["std"] == pytest.approx(0.01)
    # DAug: +0.1 at both loss levels in every seed -> mean 0.1, zero-width interval.
    daug = cls["effects"]["daug"]["macro_auroc"]
    assert daug["mean"] == pytest.approx(0.1)
    np.testing.assert_allclose(daug["ci95"], [0.1, 0.1], atol=1e-12)
    # Hybrid: per-seed gains 0.05, 0.02, -0.01 -> mean 0.02, s = 0.03, t(0.975, 2) = 4.3027.
    hybrid = cls["effects"]["hybrid"]["macro_auroc"]
    half = 4.302652729749464 * 0.03 / math.sqrt(3)
    assert hybrid["mean"] == pytest.approx(0.02)
    np.testing.assert_allclose(hybrid["ci95"], [0.02 - half, 0.02 + half], rtol=1e-9)
    # An undefined value drops that seed's pair from the effect, not the whole effect.
    ret = summary["settings"]["retrieval"]
    assert ret["variants"]["hybrid"]["x2r_mAP@1"]["per_seed"][1] is None
    assert ret["effects"]["daug"]["x2r_mAP@1"]["mean"] == pytest.approx(0.1)
    table = markdown_tables(summary, ["macro_auroc"])
    assert "### Classification setting" in table and "### Retrieval setting" in table
    assert "| baseline | 0.510 ± 0.010 |" in table
    assert "| effect of daug | +0.100 [+0.100, +0.100] |" in table
    assert "| effect of hybrid | +0.020 [" in table and "(unresolved)" in table
    assert "| chance | 0.500 |" in table
