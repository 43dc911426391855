"""``daug-jax experiment`` end to end by CLI on prepared datasets of each kind, at toy sizes.

The synthetic benchmark (reports, masks and sites: every setting and localization mode) and an
NIH ChestX-ray14 tree (real metadata and boxes, generated films, no reports: the class-only
towers, anomaly and channel modes, the rest named as skipped); bad input stops the command
before anything trains.
"""

import json
import os

import pytest

from _cli import ok, user_error
from daug_jax import experiment
from daug_jax.ablation import METRIC_KEYS
from daug_jax.config import load_config

FIGURES = ("results.md", "training_curves.png", "retrieval_example.png", "channels.png",
           "heatmaps.png")




def _results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def _check_population(results, settings, variants, effects, seeds):
    assert results["seeds"] == list(seeds) and set(results["settings"]) == set(settings)
    for setting, body in results["settings"].items():
        assert set(body["variants"]) == set(variants) and set(body["effects"]) == set(effects)
        for name, r in body["variants"].items():
            for key in METRIC_KEYS:
                assert len(r[key]["per_seed"]) == len(seeds)
                assert r[key]["mean"] is None or 0.0 <= r[key]["mean"] <= 1.0, (name, key)
            assert 0.0 <= r["macro_auroc"]["mean"] <= 1.0 and r["per_class_auroc"]
        e = body["effects"]["daug"]["macro_auroc"]
        assert e["ci95"][0] <= e["mean"] <= e["ci95"][1]


def test_experiment_on_the_synthetic_benchmark_by_cli(tmp_path):
    """Every setting and all three localization modes; ``--until`` stops after a stage and a
    rerun resumes from there, keeping the finished stages' timing."""
    out = tmp_path / "out"
    args = ["experiment", "--config", "demo", "--quick", "--data", "synthetic_cxr",
            "--data-dir", tmp_path / "tfds", "--out", out]
    ok(*args, "--until", "heatmaps")
    assert not (out / "results.json").exists() and not (out / "towers").exists()
    with open(out / "timing.json") as f:
        first = json.load(f)
    assert list(first) == list(experiment.STAGES[:experiment.STAGES.index("heatmaps") + 1])

    ok(*args)
    results, config = _results(out), load_config("demo:quick")
    for name in FIGURES:
        assert (out / name).stat().st_size > 0, name
    _check_population(results, ("classification", "retrieval"), ("baseline", "daug", "hybrid",
                      "daug_hybrid"), ("daug", "hybrid"), config.seeds)
    assert results["dataset"] == "synthetic_cxr" and results["skipped"] == {}
    assert results["settings"]["retrieval"]["variants"]["hybrid"]["i2t_R@5"]["mean"] is not None
    assert {k: results["timing_s"][k] for k in first} == first  # finished stages kept
    assert set(results["timing_s"]) == set(experiment.STAGES)
    for mode in ("anomaly", "site", "channel"):
        loc = results["localization"][mode]
        assert {"pointing_game", "chance", "per_class", "unguided", "swapped"} <= set(loc)
        assert 0.0 < loc["chance"] < 1.0 and loc["n"] > 0
    sel, loc_cfg = results["selection"], config.heatmaps.localization
    assert sel["level"] in loc_cfg.sweep_levels and sel["scale"] in loc_cfg.sweep_scales
    assert "validation split" in sel["criterion"] and len(sel["margin"]) == 4
    assert set(sel["classifier_auroc"]) == {"0", "300", "500"}
    assert results["config"]["heatmaps"]["level"] == sel["level"]
    assert results["config"]["towers"]["model"]["class_names"][0] == "No Finding"
    table = (out / "results.md").read_text()
    assert "| daug_hybrid |" in table and "| effect of daug |" in table


def test_experiment_on_nih_format_films_by_cli(tmp_path, capsys):
    """Boxes and no reports: the class-only towers with and without the DAug channel, the
    anomaly and channel modes on the boxed test films, and what was skipped, named; then trained
    workdirs of another dataset are refused before anything trains."""
    import fixtures_nih

    manual, tfds_dir, out = tmp_path / "manual", tmp_path / "tfds", tmp_path / "out"
    fixtures_nih.make_nih_tree(manual, fixtures_nih.txv_data(), every=502)
    ok("data", "prepare", "nih_cxr14", "--manual-dir", manual, "--data-dir", tfds_dir,
         "--size", 32)
    ok("experiment", "--config", "demo", "--quick", "--data", "nih_cxr14", "--data-dir",
         tfds_dir, "--out", out)
    results, config = _results(out), load_config("demo:quick")
    for name in FIGURES:
        assert (out / name).stat().st_size > 0, name
    _check_population(results, ("classification",), ("baseline", "daug"), ("daug",),
                      config.seeds)
    variant = results["settings"]["classification"]["variants"]["daug"]
    assert variant["r2x_mAP@5"]["mean"] is None and variant["x2x_mAP@5"]["mean"] is not None
    assert len(variant["per_class_auroc"]) == 15  # the registry's classes, not synthetic's
    assert results["config"]["towers"]["model"]["class_names"][0] == "Atelectasis"
    assert set(results["skipped"]) == {"retrieval setting", "hybrid loss (classification setting)",
                                       "report retrieval (r2x, x2r, i2t, t2i)"}
    assert all("no reports" in why for why in results["skipped"].values())
    boxed = {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
             "Pneumonia", "Pneumothorax"}
    assert set(results["localization"]) == {"anomaly", "channel"}
    for mode, loc in results["localization"].items():
        assert set(loc["per_class"]) <= boxed and loc["n"] > 0
        assert 0 < loc["chance"] < 1 and loc["swapped"] is not None
    assert "## Not run" in (out / "results.md").read_text()

    # Trained products of this NIH run offered to an experiment on another dataset.
    synthetic = ["experiment", "--config", "demo", "--quick", "--data-dir", tfds_dir]
    user_error(capsys, r"classifier workdir .* was trained on the classes \['Atelectasis'.*; "
                "synthetic_cxr has", *synthetic, "--out", tmp_path / "a",
                "--set", f"classifier_workdir={out / 'classifier'}")
    user_error(capsys, r"heatmaps workdir .* holds train heatmaps of \[32, 32\] px; "
                r"synthetic_cxr has \[64, 64\]", *synthetic, "--out", tmp_path / "b",
                "--set", "data.image_size=64", "--set", f"heatmaps_workdir={out / 'heatmaps'}")
    user_error(capsys, r"diffusion workdir .* holds a model of \[32, 32, 1\] images; "
                r"synthetic_cxr has \[64, 64, 1\]", *synthetic, "--out", tmp_path / "c",
                "--set", "data.image_size=64", "--set", f"diffusion_workdir={out / 'diffusion'}")
    for name in "abc":  # nothing trained
        assert not (tmp_path / name / "diffusion").exists()


def test_a_dataset_without_a_needed_split_is_refused_before_training(tmp_path, capsys):
    from fixtures_real import make_chexpert_synthetic_tree

    manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
    make_chexpert_synthetic_tree(manual, num_train=12, num_validation=4, image_size=32)
    ok("data", "prepare", "chexpert_cxr", "--manual-dir", manual, "--data-dir", tfds_dir,
         "--size", 32)
    user_error(capsys, r"split 'test' is not in chexpert_cxr under .*; its splits: train, "
                "validation",
                "experiment", "--config", "demo", "--quick", "--data", "chexpert_cxr",
                "--data-dir", tfds_dir, "--out", tmp_path / "out")
    assert not (tmp_path / "out" / "diffusion").exists()
    user_error(capsys, "--config is required", "experiment", "--data-dir", tfds_dir)


def test_margin_over_controls_subtracts_each_modes_strongest_control():
    game = lambda v: {"pointing_game": v}  # noqa: E731
    result = {"anomaly": {**game(0.8), "unguided": game(0.5), "swapped": game(0.9)},
              "channel": {**game(0.9), "unguided": game(0.85), "swapped": None},
              "site": {**game(0.7), "unguided": game(0.4), "swapped": game(0.6)}}
    # anomaly and channel against their unguided maps only; site against the stronger of both.
    assert experiment.margin_over_controls(result) == pytest.approx((0.3 + 0.05 + 0.1) / 3)


def test_a_dataset_without_reports_runs_the_class_only_cells():
    class Data:  # what `towers_plan` reads of a registry dataset
        name, has_reports = "nih_cxr14", False

    config = load_config("demo")
    settings, variants, skipped = experiment.towers_plan(config, Data())
    assert {k: dict(v) for k, v in settings.items()} == {"classification": {"single": 0.0,
                                                                             "hybrid": 0.7}}
    assert variants == ("baseline", "daug") and "retrieval setting" in skipped
    config.ablation = {"retrieval": {"single": 1.0, "hybrid": 0.8}}
    with pytest.raises(ValueError, match="add a class-only one"):
        experiment.towers_plan(config, Data())
