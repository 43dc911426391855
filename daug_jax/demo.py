"""``daug-jax demo``: DAug end to end on the built-in benchmark, with the paper's 2x2 ablation.

    generate films -> train the epsilon-UNet -> train the noise-aware classifier
      -> heatmap channels of every film -> localization check -> four tower variants
      -> retrieval / classification on held-out films -> results.json, results.md, figures

Every stage keeps its products under ``<out>/`` (checkpoints, heatmap shards, per-run metrics)
and its duration in ``<out>/timing.json``; a rerun skips finished stages and resumes an
interrupted one.  ``--quick`` runs the same pipeline at toy sizes (a smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Any

from daug_jax import ablation, parallel
from daug_jax.files import read_json, write_json, write_text

STAGES = ("data", "diffusion", "classifier", "heatmaps", "localization", "towers", "report")


class _Timer:
    """Seconds per stage, kept across reruns: a finished stage keeps its first measurement."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "timing.json")
        self.seconds = read_json(self.path, {})

    @contextlib.contextmanager
    def stage(self, name: str):
        print(f"demo: stage {STAGES.index(name) + 1}/{len(STAGES)}: {name}", flush=True)
        start = time.perf_counter()
        yield
        if name not in self.seconds:
            self.seconds[name] = round(time.perf_counter() - start, 1)
            write_json(self.path, self.seconds)


def make_splits(data_config: Any) -> dict[str, dict]:
    """The train and test films: the `synthetic_cxr` splits of this seed (same ids, same records)."""
    from daug_jax.data import builders, synthetic

    seeds = builders.SyntheticCxrConfig(seed=int(data_config.seed))
    return {split: synthetic.generate(int(data_config[f"num_{split}"]),
                                      image_size=int(data_config.image_size),
                                      seed=seeds.split_seed(split))
            for split in ("train", "test")}


def make_heatmaps(config: Any, out: str, splits: dict[str, dict]) -> dict[str, Any]:
    """Writes (or reuses) the heatmap dataset of each split; returns {split: HeatmapSource}."""
    from daug_jax.data.pipeline import ArraySource
    from daug_jax.heatmap_job import HeatmapSource, calibrate, write_heatmap_dataset
    from daug_jax.heatmaps import load_models, make_heatmap_fn

    h = config.heatmaps
    directory = os.path.join(out, "heatmaps")
    models = load_models(os.path.join(out, "diffusion"), os.path.join(out, "classifier"))
    heatmap_fn = make_heatmap_fn(
        models.eps_fn, models.logit_fn, models.alpha_bar, h.targets, models.class_names,
        level=h.level, num_steps=h.num_steps, scale=h.scale, smooth_sigma=h.smooth_sigma,
        image_shape=models.image_shape)
    train_source = ArraySource({k: splits["train"][k] for k in ("id", "image")})
    calibration = calibrate(heatmap_fn, train_source, directory,
                            num_images=h.calibration.num_images,
                            percentile=h.calibration.percentile, batch_size=h.batch_size)
    sources = {}
    for split, data in splits.items():
        split_dir = os.path.join(directory, split)
        write_heatmap_dataset(ArraySource({k: data[k] for k in ("id", "image")}), split_dir,
                              heatmap_fn, calibration["scale_constant"],
                              batch_size=h.batch_size, shard_size=h.shard_size, dtype=h.dtype)
        sources[split] = HeatmapSource(split_dir)
    return sources


def _source(data: dict):
    """A split of the in-memory benchmark as a source of what the towers read."""
    from daug_jax.data.pipeline import ArraySource

    return ArraySource({k: data[k] for k in ("image", "labels", "report", "id")})


def localize(config: Any, out: str, test: dict) -> dict:
    """Pointing game of the heatmaps on the held-out films; writes heatmaps.png."""
    from daug_jax import localization
    from daug_jax.data import synthetic
    from daug_jax.heatmaps import load_models

    h, loc = config.heatmaps, config.heatmaps.localization
    models = load_models(os.path.join(out, "diffusion"), os.path.join(out, "classifier"))
    classes = [c for c in synthetic.LOCALIZED_CLASSES if c in models.class_names]
    regions = {"masks": test["masks"], "sites": test["sites"]}
    cases = localization.select_cases(test["labels"], regions, synthetic.CLASS_NAMES, classes,
                                      loc.cases_per_class, int(config.data.seed))
    images = test["image"] * 2.0 - 1.0
    translated = localization.translate_cases(
        models, images, cases, scales=[float(h.scale)], level=h.level, num_steps=h.num_steps,
        smooth_sigma=h.smooth_sigma, batch_size=loc.batch_size, data_classes=synthetic.CLASS_NAMES)
    result = localization.score(translated[float(h.scale)], cases, synthetic.CLASS_NAMES)
    localization.plot_examples(os.path.join(out, "heatmaps.png"), images, cases,
                               translated[float(h.scale)], synthetic.CLASS_NAMES,
                               loc.examples_per_class)
    return {mode: {"pointing_game": r.get("pointing_game"), "chance": r.get("chance"),
                   "energy_inside": r.get("energy_inside"), "n": r["n"],
                   "per_class": r.get("per_class", {})} for mode, r in result.items()}


def run_towers(config: Any, out: str, splits: dict[str, dict],
               heatmaps: dict[str, Any]) -> tuple[dict, dict]:
    """The four ablation variants x seeds; returns (results, training histories)."""
    from daug_jax.data import synthetic
    from experiments.ablation import VARIANTS, variant_config

    configs = {}
    for name in VARIANTS:
        cfg = variant_config(name, config.towers)
        cfg.data.image_size = int(config.data.image_size)
        cfg.model.vision.in_channels = 1 + len(config.heatmaps.targets.split(","))
        configs[name] = cfg
    history: dict = {}
    results = ablation.run_ablation(configs, config.seeds, _source(splits["train"]),
                                    _source(splits["test"]), os.path.join(out, "towers"),
                                    class_names=synthetic.CLASS_NAMES, heatmaps=heatmaps,
                                    history=history)
    return results, history


def winner_sentence(results: dict) -> str:
    """Which variant won on macro AUROC and on image->report R@5, against the baseline."""
    lines = []
    for key, label in (("macro_auroc", "macro AUROC"), ("i2t_R@5", "image->report R@5"),
                       ("i2i_P@10", "image->image P@10")):
        ranked = sorted(results, key=lambda v: -(results[v][key] or 0.0))
        best, base = ranked[0], results["baseline"][key] or 0.0
        lines.append(f"{label}: {best} wins with {results[best][key]:.3f} "
                     f"(baseline {base:.3f}, {results[best][key] - base:+.3f}; "
                     f"runner-up {ranked[1]} {results[ranked[1]][key]:.3f})")
    return "\n".join(lines)


def write_report(out: str, config: Any, results: dict, localization_result: dict,
                 timing: dict, history: dict) -> dict:
    """results.json, results.md and the figures; returns the results dict."""
    from daug_jax import figures

    variants = {name: {k: r[k] for k in ("macro_auroc", "per_class_auroc", *ablation.METRIC_KEYS[1:])}
                | {"std": r["std"], "per_seed": r["per_seed"]} for name, r in results.items()}
    payload = {"variants": variants, "localization": localization_result,
               "timing_s": timing, "config": json.loads(config.to_json())}
    write_json(os.path.join(out, "results.json"), payload)
    figures.training_curves(os.path.join(out, "training_curves.png"), history)
    lines = ["# DAug demo results", "",
             f"Synthetic benchmark, {config.data.image_size} px, {config.data.num_train} training "
             f"and {config.data.num_test} test films, seeds {list(config.seeds)}.", "",
             ablation.markdown_table(results), "", winner_sentence(results).replace("\n", "  \n"),
             "", "## Localization (pointing game on held-out films)", "",
             "| mode | pointing game | chance | ratio | energy inside | n |",
             "| --- | --- | --- | --- | --- | --- |"]
    for mode, r in localization_result.items():
        if r.get("pointing_game") is None:
            continue
        lines.append(f"| {mode} | {r['pointing_game']:.3f} | {r['chance']:.3f} | "
                     f"{r['pointing_game'] / r['chance']:.1f}x | {r['energy_inside']:.3f} | {r['n']} |")
    lines += ["", "## Time per stage (s)", "",
              "| " + " | ".join(timing) + " |", "|" + " --- |" * len(timing),
              "| " + " | ".join(f"{v:.0f}" for v in timing.values()) + " |"]
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(out, "results.md"), text)
    return payload


def run_demo(config: Any) -> dict:
    """Runs (or resumes) every stage; returns the results written to ``<out>/results.json``."""
    from daug_jax.data import synthetic
    from daug_jax.data.pipeline import ArraySource
    from daug_jax.diffusion import train as diffusion_train

    out = config.out
    os.makedirs(out, exist_ok=True)
    import jax

    # Compiled programs persist under <out>/xla_cache (unless JAX_COMPILATION_CACHE_DIR says
    # otherwise): the four tower variants run one program, and a resumed demo compiles nothing
    # it compiled before.  On a 2-core CPU compilation is a large part of the demo's time.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          os.path.abspath(os.path.join(out, "xla_cache")))
    timer = _Timer(out)
    with timer.stage("data"):
        splits = make_splits(config.data)
    train = splits["train"]
    dcfg = config.diffusion
    dcfg.data.update(image_size=int(config.data.image_size), num_train=int(config.data.num_train),
                     seed=int(config.data.seed))
    with timer.stage("diffusion"):
        diffusion_train.train_diffusion(dcfg, ArraySource({"image": train["image"]}),
                                        os.path.join(out, "diffusion"))
    with timer.stage("classifier"):
        diffusion_train.train_classifier(
            dcfg, ArraySource({"image": train["image"], "labels": train["labels"]}),
            os.path.join(out, "classifier"), class_names=synthetic.CLASS_NAMES)
    with timer.stage("heatmaps"):
        heatmaps = make_heatmaps(config, out, splits)
    loc_path = os.path.join(out, "localization.json")
    with timer.stage("localization"):
        if not os.path.exists(loc_path):
            write_json(loc_path, localize(config, out, splits["test"]))
    localization_result = read_json(loc_path)
    with timer.stage("towers"):
        results, history = run_towers(config, out, splits, heatmaps)
    with timer.stage("report"):
        from daug_jax import figures

        figures.retrieval_example(os.path.join(out, "retrieval_example.png"),
                                  os.path.join(out, "towers", "daug_hybrid", f"seed{config.seeds[0]}"),
                                  splits["test"], heatmaps=heatmaps["test"])
        payload = write_report(out, config, results, localization_result, timer.seconds, history)
    payload["timing_s"] = timer.seconds
    write_json(os.path.join(out, "results.json"), payload)
    return payload


def main(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test (< 60 s)")
    parser.add_argument("--out", help="output directory (default runs/demo, runs/quick with --quick)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of experiments/demo.py, e.g. --set seeds=(0,1)")
    args = parser.parse_args(argv)
    parallel.maybe_initialize_distributed()
    from daug_jax.config import apply_overrides, validate
    from experiments import demo as demo_config

    config = demo_config.get_config(quick=args.quick)
    apply_overrides(config, args.set)
    validate(config)
    validate(config.diffusion)
    if args.out:
        config.out = args.out
    start = time.perf_counter()
    run_demo(config)
    print(f"\ndemo: finished in {time.perf_counter() - start:.0f} s (this run); results in "
          f"{config.out}/results.md, results.json, heatmaps.png, training_curves.png, "
          f"retrieval_example.png\n")
    with open(os.path.join(config.out, "results.md")) as f:
        print(f.read())
    return 0
