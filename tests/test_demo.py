"""The whole pipeline end to end at toy sizes (``daug-jax demo --quick``)."""

import json
import os

import pytest

from daug_jax import demo
from daug_jax.ablation import METRIC_KEYS
from daug_jax.config import load_config

# Compiling every stage's programs takes minutes on a 2-core CPU, more than the suite's budget:
# run with DAUG_E2E=1 (e.g. `DAUG_E2E=1 .venv/bin/pytest tests/test_demo.py`).
@pytest.mark.skipif(os.environ.get("DAUG_E2E") != "1",
                    reason="end-to-end demo (minutes of XLA compilation); set DAUG_E2E=1")
def test_quick_demo_writes_every_result(tmp_path):
    config = load_config("demo:quick")
    config.out = str(tmp_path / "quick")
    demo.run_demo(config)
    out = config.out
    for name in ("results.json", "results.md", "heatmaps.png", "training_curves.png",
                 "retrieval_example.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["seeds"] == list(config.seeds)
    assert set(results["settings"]) == {"classification", "retrieval"}
    for setting, body in results["settings"].items():
        assert set(body["variants"]) == {"baseline", "daug", "hybrid", "daug_hybrid"}
        for name, r in body["variants"].items():
            assert set(METRIC_KEYS) <= set(r), (setting, name)
            for key in METRIC_KEYS:
                assert len(r[key]["per_seed"]) == len(config.seeds)
                assert r[key]["mean"] is None or 0.0 <= r[key]["mean"] <= 1.0, (name, key)
        for effect in ("daug", "hybrid"):
            e = body["effects"][effect]["macro_auroc"]
            assert e["ci95"][0] <= e["mean"] <= e["ci95"][1]
    assert results["chance"]["macro_auroc"] == 0.5 and 0 < results["chance"]["x2x_mAP@5"] < 1
    for mode in ("anomaly", "site", "channel"):
        loc = results["localization"][mode]
        assert {"pointing_game", "chance", "per_class", "unguided", "swapped"} <= set(loc)
        assert 0.0 < loc["chance"] < 1.0
        assert set(loc["unguided"]) >= {"pointing_game", "chance", "per_class", "difference"}
    assert set(results["timing_s"]) == set(demo.STAGES)
    assert results["selection"]["scale"] in config.heatmaps.localization.sweep_scales
    assert results["selection"]["level"] in config.heatmaps.localization.sweep_levels
    assert results["config"]["heatmaps"]["level"] == results["selection"]["level"]
    assert results["config"]["data"]["num_train"] == config.data.num_train
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert "| daug_hybrid |" in table and "| effect of daug |" in table

    # A rerun finds every stage done: nothing is retrained, the timing is kept.
    demo.run_demo(config)
    with open(os.path.join(out, "results.json")) as f:
        again = json.load(f)
    assert again["timing_s"] == results["timing_s"]
    assert again["settings"] == results["settings"]


def test_margin_over_controls_subtracts_each_modes_strongest_control():
    game = lambda v: {"pointing_game": v}  # noqa: E731
    result = {"anomaly": {**game(0.8), "unguided": game(0.5), "swapped": game(0.9)},
              "channel": {**game(0.9), "unguided": game(0.85), "swapped": None},
              "site": {**game(0.7), "unguided": game(0.4), "swapped": game(0.6)}}
    # anomaly and channel against their unguided maps only; site against the stronger of both.
    assert demo.margin_over_controls(result) == pytest.approx((0.3 + 0.05 + 0.1) / 3)
