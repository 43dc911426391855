"""``daug-jax demo``: DAug end to end on the built-in benchmark, both ablation settings.

    generate films -> train the epsilon-UNet -> train the noise-aware classifier
      -> encode level and guidance scale chosen on validation films -> heatmap channel of every film
      -> localization check with its controls -> both ablation settings x seeds as one
      population of towers -> the authors' protocol on test films -> results.json/md, figures

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

import ml_collections

from daug_jax import ablation, figures, localization, metrics
from daug_jax.config import load_config, read_config, validate
from daug_jax.data import builders, synthetic
from daug_jax.data.pipeline import ArraySource
from daug_jax.diffusion import train as diffusion_train
from daug_jax.diffusion.schedule import to_model_space
from daug_jax.diffusion.strength import classifier_auroc
from daug_jax.files import read_json, write_json, write_text
from daug_jax.heatmap_job import HeatmapSource, calibrate, write_heatmap_dataset
from daug_jax.heatmaps import load_models, make_heatmap_fn, make_translation

STAGES = ("data", "diffusion", "classifier", "selection", "heatmaps", "localization", "towers",
          "report")


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
    """The train, validation and test films: the `synthetic_cxr` splits of this seed."""
    seeds = builders.SyntheticCxrConfig(seed=int(data_config.seed))
    return {split: synthetic.generate(int(data_config[f"num_{split}"]),
                                      image_size=int(data_config.image_size),
                                      seed=seeds.split_seed(split))
            for split in ("train", "validation", "test")}


def setting_name(level: int, scale: float) -> str:
    """The key of one (encode level, guidance scale) pair in the selection's results."""
    return f"L{int(level)}/s{float(scale):g}"


def _models(out: str):
    return load_models(os.path.join(out, "diffusion"), os.path.join(out, "classifier"))


def make_heatmaps(config: Any, out: str, splits: dict[str, dict], level: int,
                  scale: float) -> dict[str, Any]:
    """Writes (or reuses) the heatmap dataset of the train split and of ``config.eval_split``
    at encode ``level`` and guidance ``scale`` (chosen on validation); returns {split:
    HeatmapSource}."""
    h = config.heatmaps
    directory = os.path.join(out, "heatmaps")
    models = _models(out)
    heatmap_fn = make_heatmap_fn(models, h.targets, make_translation(models, h, level), scale)
    films = {split: ArraySource({k: splits[split][k] for k in ("id", "image")})
             for split in ("train", config.eval_split)}
    calibration = calibrate(heatmap_fn, films["train"], directory,
                            num_images=h.calibration.num_images,
                            percentile=h.calibration.percentile, batch_size=h.batch_size)
    for split, source in films.items():
        write_heatmap_dataset(source, os.path.join(directory, split), heatmap_fn,
                              calibration["scale_constant"], batch_size=h.batch_size,
                              shard_size=h.shard_size, dtype=h.dtype)
    return {split: HeatmapSource(os.path.join(directory, split)) for split in films}


def localize(config: Any, out: str, films: dict, *, levels: list[int], scales: list[float],
             per_class: int, figure: str | None = None,
             swapped_modes: tuple[str, ...] | None = None) -> dict:
    """Pointing game of every mode on ``films`` at each encode level x guidance scale, with its
    unguided and class-swapped controls (`localization.score`; the swapped one for
    ``swapped_modes``, default every mode); returns {`setting_name`: {mode: result}}.  The
    models are loaded and the cases drawn once; ``figure`` shows the first setting."""
    loc = config.heatmaps.localization
    models = _models(out)
    classes = [c for c in synthetic.LOCALIZED_CLASSES if c in models.class_names]
    regions = {"masks": films["masks"], "sites": films["sites"]}
    cases = localization.select_cases(films["labels"], regions, synthetic.CLASS_NAMES, classes,
                                      per_class, int(config.data.seed))
    images = to_model_space(films["image"])
    results = {}
    for level in levels:
        translated = localization.translate_cases(
            models, make_translation(models, config.heatmaps, level), images, cases,
            scales=scales, batch_size=loc.batch_size, data_classes=synthetic.CLASS_NAMES,
            swapped_modes=swapped_modes)
        if figure and not results:
            figures.plot_examples(figure, images, cases, translated["scales"][scales[0]],
                                  synthetic.CLASS_NAMES, loc.examples_per_class)
        results.update({setting_name(level, s): localization.score(
            translated, s, cases, synthetic.CLASS_NAMES) for s in scales})
    return results


# The control each mode has to beat for its localization to be the guidance's: the unguided map
# (the DDIM inversion error alone) everywhere, for site mode also the guidance towards another
# class (large sites such as the lung fields are hit by any change inside them), and with a
# class-conditional UNet the decode conditioned on the mode's side without guidance.
CONTROLS = {"anomaly": ("unguided", "conditioned"), "channel": ("unguided", "conditioned"),
            "site": ("unguided", "swapped", "conditioned")}


def margin_over_controls(result: dict) -> float:
    """Mean over the modes of the guided map's pointing game minus its strongest control's
    (`CONTROLS`): how much of the localization the guidance itself makes."""
    margins = [r["pointing_game"] - max((r[c]["pointing_game"] for c in CONTROLS[mode] if r.get(c)),
                                        default=0.0) for mode, r in result.items()]
    return sum(margins) / len(margins)


def select_guidance(config: Any, out: str, validation: dict) -> dict:
    """The encode level and guidance scale whose heatmaps beat their controls by the widest
    mean margin (`margin_over_controls`) on the validation films (the test films are not looked
    at); returns {"level", "scale", "criterion", "margin", "mean_pointing_game",
    "classifier_auroc", "sweep": {"L<level>/s<scale>": {mode: result}}}.  A sweep of one level
    and one scale has nothing to choose: it is returned without its localization."""
    loc = config.heatmaps.localization
    levels = sorted({int(v) for v in loc.sweep_levels})
    scales = sorted({float(s) for s in loc.sweep_scales})
    # Where the guidance can act: the classifier's AUROC on noised validation films.
    strength = classifier_auroc(_models(out), to_model_space(validation["image"]),
                                validation["labels"], synthetic.CLASS_NAMES, levels=(0, *levels))
    if len(levels) == len(scales) == 1:
        return {"level": levels[0], "scale": scales[0], "classifier_auroc": strength,
                "criterion": "the config's only encode level and guidance scale"}
    sweep = localize(config, out, validation, levels=levels, scales=scales,
                     per_class=int(loc.validation_cases_per_class),
                     swapped_modes=tuple(m for m, c in CONTROLS.items() if "swapped" in c))
    margin = {k: margin_over_controls(r) for k, r in sweep.items()}
    mean = {k: sum(m["pointing_game"] for m in r.values()) / len(r) for k, r in sweep.items()}
    # Ties: the weaker guidance, then the lower level (less to undo).
    grid = [(level, s) for level in levels for s in scales]
    level, scale = max(grid, key=lambda g: (margin[setting_name(*g)], -g[1], -g[0]))
    return {"level": level, "scale": scale,
            "criterion": "mean over modes of the pointing game minus its strongest control "
                         "(unguided; site mode also class-swapped; conditioned, for a "
                         "class-conditional UNet), validation split",
            "margin": margin, "mean_pointing_game": mean, "classifier_auroc": strength,
            "sweep": sweep}


def run_towers(config: Any, out: str, splits: dict[str, dict],
               heatmaps: dict[str, Any]) -> tuple[dict, dict]:
    """The ablation's settings x seeds as one population, queries from ``config.eval_split``;
    returns (summary, histories)."""
    towers = ml_collections.ConfigDict(config.towers.to_dict())
    towers.data.image_size = int(config.data.image_size)
    towers.model.vision.in_channels = 1 + len(config.heatmaps.targets.split(","))
    validate(towers)
    train, query = (ArraySource({k: splits[s][k] for k in ("image", "labels", "report", "id")})
                    for s in ("train", config.eval_split))
    results, histories = ablation.run_ablation(
        towers, ablation.members(config.ablation, config.seeds),
        {"train": train, "query": query, "gallery": train}, os.path.join(out, "towers"),
        class_names=synthetic.CLASS_NAMES,
        heatmaps={"train": heatmaps["train"], "query": heatmaps[config.eval_split],
                  "gallery": heatmaps["train"]})
    return ablation.summarize(results, config.seeds), histories


TABLE_KEYS = ("macro_auroc", "weighted_auroc", "x2x_mAP@5", "r2x_mAP@5", "x2r_mAP@5",
              "i2t_R@5", "t2i_R@5")


def effect_sentences(summary: dict) -> list[str]:
    """One plain sentence per setting and effect, on that setting's headline metrics."""
    headline = {"classification": ("macro_auroc", "weighted_auroc"),
                "retrieval": ("x2x_mAP@5", "r2x_mAP@5", "x2r_mAP@5")}
    lines = []
    for setting, body in summary["settings"].items():
        for effect, label in (("daug", "The DAug channel"), ("hybrid", "The hybrid loss")):
            parts = []
            for key in headline[setting]:
                e = body["effects"][effect][key]
                if e["mean"] is None:
                    continue
                verdict = ("raised" if e["mean"] > 0 else "lowered") if metrics.excludes_zero(e) \
                    else "left unresolved"
                ci = "" if e["ci95"] is None else f" [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}]"
                parts.append(f"{verdict} {key} ({e['mean']:+.3f}{ci})")
            lines.append(f"{setting.capitalize()} setting: {label} " + "; ".join(parts) + ".")
    return lines


def _localization_lines(result: dict) -> list[str]:
    lines = ["| mode | pointing game | chance | unguided (guided − it, 95 % CI) | "
             "swapped class (guided − it, 95 % CI) | conditioned, scale 0 (guided − it) | n |",
             "|" + " --- |" * 7]

    def control(r):
        if not r:
            return "n/a"
        d = r["difference"]
        ci = "" if d["ci95"] is None else f" [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
        return f"{r['pointing_game']:.3f} ({d['mean']:+.3f}{ci})"

    for mode, r in result.items():
        if r.get("pointing_game") is None:
            continue
        lines.append(f"| {mode} | {r['pointing_game']:.3f} | {r['chance']:.3f} | "
                     f"{control(r.get('unguided'))} | {control(r.get('swapped'))} | "
                     f"{control(r.get('conditioned'))} | {r['n']} |")
    return lines


def write_report(out: str, config: Any, summary: dict, loc: dict, selection: dict,
                 timing: dict, histories: dict) -> dict:
    """results.json, results.md and the training-curves figure; returns the results dict."""
    payload = {**summary, "localization": loc,
               "selection": {k: v for k, v in selection.items() if k != "sweep"},
               "timing_s": timing, "config": json.loads(config.to_json())}
    write_json(os.path.join(out, "results.json"), payload)
    curves = {}
    for name, history in histories.items():  # "<setting>/<variant>/seed<k>": seeds per variant
        curves.setdefault(name.rsplit("/", 1)[0], []).append(history)
    figures.training_curves(os.path.join(out, "training_curves.png"), curves)
    d = config.data
    lines = ["# DAug demo results", "",
             f"Synthetic benchmark, {d.image_size} px; {d.num_train} training films (the towers' "
             f"training set and the retrieval gallery), {d.num_validation} validation films (the "
             f"encode level {selection['level']} and guidance scale {selection['scale']:g}, "
             f"{'chosen there' if 'sweep' in selection else 'fixed by the config'}), "
             f"{d.num_test} test films; every figure below on the "
             f"{config.eval_split} films; seeds {list(summary['seeds'])}: mean ± sample std over "
             "seeds, effects as paired differences over seeds with a 95 % t-interval.", "",
             ablation.markdown_tables(summary, TABLE_KEYS), *effect_sentences(summary), "",
             f"## Localization (pointing game, {config.eval_split} films, level "
             f"{selection['level']}, guidance scale {selection['scale']:g})",
             "", *_localization_lines(loc), "", "## Time per stage (s)", "",
             "| " + " | ".join(timing) + " |", "|" + " --- |" * len(timing),
             "| " + " | ".join(f"{v:.0f}" for v in timing.values()) + " |"]
    write_text(os.path.join(out, "results.md"), "\n".join(lines) + "\n")
    return payload


def run_demo(config: Any) -> dict:
    """Runs (or resumes) every stage; returns the results written to ``<out>/results.json``."""
    out = config.out
    os.makedirs(out, exist_ok=True)
    timer = _Timer(out)
    with timer.stage("data"):
        splits = make_splits(config.data)
    train = splits["train"]
    dcfg = config.diffusion
    dcfg.data.update(image_size=int(config.data.image_size), num_train=int(config.data.num_train),
                     seed=int(config.data.seed))
    with timer.stage("diffusion"):
        films = ArraySource({k: train[k] for k in ("image", "labels")})
        diffusion_train.train_diffusion(dcfg, films, os.path.join(out, "diffusion"),
                                        class_names=synthetic.CLASS_NAMES)
    with timer.stage("classifier"):
        diffusion_train.train_classifier(
            dcfg, ArraySource({"image": train["image"], "labels": train["labels"]}),
            os.path.join(out, "classifier"), class_names=synthetic.CLASS_NAMES)
    with timer.stage("selection"):
        selection = _cached(os.path.join(out, "selection.json"),
                            lambda: select_guidance(config, out, splits["validation"]))
    level, scale = int(selection["level"]), float(selection["scale"])
    config.heatmaps.level = level  # what the heatmaps and their check use (results.json: config)
    with timer.stage("heatmaps"):
        heatmaps = make_heatmaps(config, out, splits, level, scale)
    with timer.stage("localization"):
        loc = _cached(os.path.join(out, "localization.json"), lambda: localize(
            config, out, splits[config.eval_split], levels=[level], scales=[scale],
            per_class=int(config.heatmaps.localization.cases_per_class),
            figure=os.path.join(out, "heatmaps.png"))[setting_name(level, scale)])
    with timer.stage("towers"):
        summary, histories = run_towers(config, out, splits, heatmaps)
    with timer.stage("report"):
        figures.retrieval_example(os.path.join(out, "retrieval_example.png"),
                                  os.path.join(out, "towers"), splits[config.eval_split],
                                  heatmaps=heatmaps[config.eval_split],
                                  member=f"{list(config.ablation)[-1]}/daug_hybrid/"
                                         f"seed{config.seeds[0]}")
        payload = write_report(out, config, summary, loc, selection, timer.seconds, histories)
    payload["timing_s"] = timer.seconds
    write_json(os.path.join(out, "results.json"), payload)
    return payload


def _cached(path: str, compute) -> Any:
    """``path``'s JSON, computed and written first if absent (a rerun skips the stage)."""
    if not os.path.exists(path):
        write_json(path, compute())
    return read_json(path)


def _read(argv: list[str]) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """The command's arguments and its config, not validated (read before JAX starts)."""
    args, _ = _parser("demo").parse_known_args(argv)
    config = read_config(args.config + (":quick" if args.quick else ""), args.set)
    config.out = args.out or config.out
    return args, config


def compilation_cache_dir(argv: list[str]) -> str:
    """Where the CLI keeps this command's compiled programs: ``<out>/xla_cache``, so that a
    resumed demo compiles nothing it compiled before (much of the demo's time on 2 CPU cores)."""
    return os.path.join(_read(argv)[1].out, "xla_cache")


def cpu_devices(argv: list[str]) -> int:
    """How many devices the CLI splits a CPU into for this command: ``cpu_devices`` of the
    config (with ``--set`` applied; `cli._set_up_process`)."""
    return int(_read(argv)[1].cpu_devices)


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo",
                        help="experiments/<name>.py shaped as experiments/demo.py (default demo)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test (< 60 s)")
    parser.add_argument("--out",
                        help="output directory (default runs/demo, runs/quick with --quick)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of experiments/demo.py, e.g. --set seeds=(0,1)")
    return parser


def main(command: str, argv: list[str]) -> int:
    args = _parser(command).parse_args(argv)
    config = load_config(args.config + (":quick" if args.quick else ""), args.set)
    validate(config.diffusion)
    config.out = args.out or config.out
    start = time.perf_counter()
    run_demo(config)
    print(f"\ndemo: finished in {time.perf_counter() - start:.0f} s (this run); results in "
          f"{config.out}/results.md, results.json, heatmaps.png, training_curves.png, "
          f"retrieval_example.png\n")
    with open(os.path.join(config.out, "results.md")) as f:
        print(f.read())
    return 0
