"""``daug-jax experiment``: the DAug experiment on any registered dataset, one command.

    daug-jax experiment --config nih_small --data nih_cxr14 --data-dir runs/tfds --out runs/nih
    daug-jax demo [--quick]          # the same command with experiments/demo.py

    open the dataset -> train the epsilon-UNet -> train the noise-aware classifier (+ its AUROC
      per noise level on validation films) -> encode level, DDIM moves and guidance scale chosen
      on validation films -> heatmap channel of the train and evaluation splits -> localization
      with its controls -> both ablation settings x seeds as one population of towers -> the
      authors' protocol (queries from the evaluation split, the train split as gallery)
      -> results.json / results.md, figures

Every split is streamed from the registry's dataset (`daug_jax.data.registry`); only bounded
samples (the films scanned for localization cases and the classifier's AUROC) are held.  What
runs follows the dataset: the regions it carries (masks, sites, boxes) decide the localization
modes; a dataset without reports runs the settings that need no report text and lists the
others in ``results.json`` -> ``"skipped"``.  Every stage keeps its products under ``<out>/``
and its duration in ``<out>/timing.json``; a rerun skips finished stages and resumes an
interrupted one; ``--until STAGE`` stops after a stage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Any

import ml_collections

from daug_jax import ablation, figures, localization
from daug_jax.config import load_config, read_config, validate
from daug_jax.data import pipeline, registry
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
        print(f"experiment: stage {STAGES.index(name) + 1}/{len(STAGES)}: {name}", flush=True)
        start = time.perf_counter()
        yield
        if name not in self.seconds:
            self.seconds[name] = round(time.perf_counter() - start, 1)
            write_json(self.path, self.seconds)


def workdirs(config: Any) -> dict[str, str]:
    """Where each trained product lives: ``<out>/<stage>`` unless the config names an existing
    workdir to reuse (``diffusion_workdir``, ``classifier_workdir``, ``heatmaps_workdir``)."""
    return {kind: config[f"{kind}_workdir"] or os.path.join(config.out, kind)
            for kind in ("diffusion", "classifier", "heatmaps")}


def open_data(config: Any) -> registry.Dataset:
    """The config's dataset, prepared, with the splits the experiment reads: ``data.train_split``
    (models, towers, gallery), validation (selection, the classifier's AUROC) and
    ``eval_split``; an absent one is named with the splits the dataset has."""
    dataset = registry.open_dataset(config.data)
    for split in (config.data.train_split, "validation", config.eval_split):
        dataset.source(split)
    return dataset


def check_workdirs(config: Any, dataset: registry.Dataset) -> None:
    """Refuses, before anything trains, trained products that do not belong to ``dataset``: a
    diffusion model or classifier of other image shape or classes, heatmaps of another size."""
    dirs, shape = workdirs(config), list(dataset.image_shape)
    for kind in ("diffusion", "classifier"):
        meta = read_json(os.path.join(dirs[kind], "meta.json"))
        if meta is None:
            continue
        if list(meta["image_shape"]) != shape:
            raise ValueError(f"{kind} workdir {dirs[kind]} holds a model of {meta['image_shape']} "
                             f"images; {dataset.name} has {shape}")
        if kind == "classifier" and list(meta["class_names"]) != list(dataset.class_names):
            raise ValueError(f"classifier workdir {dirs[kind]} was trained on the classes "
                             f"{meta['class_names']}; {dataset.name} has "
                             f"{list(dataset.class_names)}")
    for split in (config.data.train_split, config.eval_split):
        meta = read_json(os.path.join(dirs["heatmaps"], split, "metadata.json"))
        stored = None if meta is None else meta.get("image_shape")
        if stored is not None and list(stored[:2]) != shape[:2]:
            raise ValueError(f"heatmaps workdir {dirs['heatmaps']} holds {split} heatmaps of "
                             f"{stored[:2]} px; {dataset.name} has {shape[:2]}")


def towers_plan(config: Any, dataset: registry.Dataset) -> tuple[dict, tuple[str, ...], dict]:
    """What of the ablation runs on ``dataset``: (settings, variants, skipped {what: why}).  A
    dataset without reports runs the class-only settings (clip weight 0) without their hybrid
    variants: the single-term towers with and without the DAug channel."""
    if dataset.has_reports:
        return dict(config.ablation), tuple(ablation.VARIANTS), {}
    why = f"{dataset.name} has no reports"
    settings = {s: w for s, w in config.ablation.items() if float(w["single"]) == 0.0}
    if not settings:
        raise ValueError(f"{why}, and every setting of the config's ablation "
                         f"({list(config.ablation)}) trains the image-report term; add a "
                         f"class-only one (single clip weight 0)")
    skipped = {f"{s} setting": f"{why}: its single-term loss is the image-report (CLIP) loss "
                               f"(clip weight {float(w['single']):g})"
               for s, w in config.ablation.items() if s not in settings}
    skipped.update({f"hybrid loss ({s} setting)": f"{why}: the hybrid's image-report term "
                                                  f"needs them" for s in settings})
    skipped["report retrieval (r2x, x2r, i2t, t2i)"] = f"{why} to query with or to retrieve"
    return settings, ("baseline", "daug"), skipped


def setting_name(level: int, moves: int, scale: float) -> str:
    """The key of one (encode level, DDIM moves, guidance scale) in the selection's results."""
    return f"L{int(level)}/m{int(moves)}/s{float(scale):g}"


def localize(config: Any, dataset: registry.Dataset, split: str, *, levels: list[int],
             moves: list[int], scales: list[float], figure: str | None = None,
             swapped_modes: tuple[str, ...] | None = None) -> dict | None:
    """Pointing game of every mode the dataset's regions allow on ``split``'s films at each
    encode level x DDIM moves x guidance scale, with its unguided and class-swapped controls
    (`localization.score`; the swapped one for ``swapped_modes``, default every mode); returns
    {`setting_name`: {mode: result}}, or None when no film of the split has a region.  The
    cases (``heatmaps.localization.validation_cases_per_class`` per class and mode on the
    validation split, where the selection looks, else ``cases_per_class``) are drawn once;
    ``figure`` shows the first setting."""
    if not dataset.localized:
        return None
    dirs, loc = workdirs(config), config.heatmaps.localization
    models = load_models(dirs["diffusion"], dirs["classifier"])
    per_class = loc.validation_cases_per_class if split == "validation" else loc.cases_per_class
    data_classes, cases, images = localization.cases_of(dataset, split, models, loc,
                                                        int(config.data.seed), int(per_class))
    if not cases:
        return None
    results = {}
    for level in levels:
        for m in moves:
            translated = localization.translate_cases(
                models, make_translation(models, config.heatmaps, level, m), images, cases,
                scales=scales, batch_size=loc.batch_size, data_classes=data_classes,
                swapped_modes=swapped_modes)
            if figure and not results:
                figures.plot_examples(figure, images, cases, translated["scales"][scales[0]],
                                      data_classes, loc.examples_per_class)
            results.update({setting_name(level, m, s): localization.score(
                translated, s, cases, data_classes) for s in scales})
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


def strength(config: Any, dataset: registry.Dataset) -> dict:
    """The classifier's AUROC per noise level (clean, the sweep's levels, the config's) on the
    first ``heatmaps.localization.pool_size`` validation films: where the guidance can act."""
    loc, dirs = config.heatmaps.localization, workdirs(config)
    source = dataset.source("validation")
    films = pipeline.read(source, range(min(int(loc.pool_size), len(source))))
    levels = sorted({0, int(config.heatmaps.level), *(int(v) for v in loc.sweep_levels)})
    return classifier_auroc(load_models(dirs["diffusion"], dirs["classifier"]),
                            to_model_space(pipeline.to_unit_float(films["image"])),
                            films["labels"], list(dataset.class_names), levels=levels)


def select_guidance(config: Any, dataset: registry.Dataset) -> dict:
    """The encode level, DDIM moves and guidance scale whose heatmaps beat their controls by the
    widest mean margin (`margin_over_controls`) on the validation films (the test films are not
    looked at); returns {"level", "moves", "scale", "criterion", "margin", "mean_pointing_game",
    "sweep": {`setting_name`: {mode: result}}}.  A sweep of one point has nothing to choose, and
    validation films without regions cannot choose: the config's values are returned, the
    criterion saying why."""
    loc, h = config.heatmaps.localization, config.heatmaps
    levels = sorted({int(v) for v in loc.sweep_levels})
    moves = sorted({int(v) for v in loc.sweep_moves})
    scales = sorted({float(s) for s in loc.sweep_scales})
    if len(levels) == len(moves) == len(scales) == 1:
        return {"level": levels[0], "moves": moves[0], "scale": scales[0],
                "criterion": "the config's only encode level, DDIM moves and guidance scale"}
    sweep = localize(config, dataset, "validation", levels=levels, moves=moves, scales=scales,
                     swapped_modes=tuple(m for m, c in CONTROLS.items() if "swapped" in c))
    if sweep is None:
        return {"level": int(h.level), "moves": int(h.num_steps), "scale": float(h.scale),
                "criterion": f"fixed by the config (heatmaps.level, num_steps, scale): the "
                             f"validation films of {dataset.name} carry no region to choose by"}
    margin = {k: margin_over_controls(r) for k, r in sweep.items()}
    mean = {k: sum(m["pointing_game"] for m in r.values()) / len(r) for k, r in sweep.items()}
    # Ties: the weaker guidance, then fewer moves, then the lower level (less to undo).
    grid = [(level, m, s) for level in levels for m in moves for s in scales]
    level, m, scale = max(grid, key=lambda g: (margin[setting_name(*g)], -g[2], -g[1], -g[0]))
    return {"level": level, "moves": m, "scale": scale,
            "criterion": "mean over modes of the pointing game minus its strongest control "
                         "(unguided; site mode also class-swapped; conditioned, for a "
                         "class-conditional UNet), validation split",
            "margin": margin, "mean_pointing_game": mean, "sweep": sweep}


def make_heatmaps(config: Any, dataset: registry.Dataset) -> dict[str, HeatmapSource]:
    """Writes (or reuses) the heatmap datasets of ``data.train_split`` and ``eval_split`` at the
    chosen ``heatmaps.level`` / ``num_steps`` / ``scale``; returns {split: HeatmapSource}."""
    h, dirs = config.heatmaps, workdirs(config)
    models = load_models(dirs["diffusion"], dirs["classifier"])
    heatmap_fn = make_heatmap_fn(models, h.targets, make_translation(models, h), float(h.scale))
    train = config.data.train_split
    splits = {split: dataset.source(split) for split in (train, config.eval_split)}
    calibration = calibrate(heatmap_fn, splits[train], dirs["heatmaps"],
                            num_images=h.calibration.num_images,
                            percentile=h.calibration.percentile, batch_size=h.batch_size)
    for split, source in splits.items():
        write_heatmap_dataset(source, os.path.join(dirs["heatmaps"], split), heatmap_fn,
                              calibration["scale_constant"], batch_size=h.batch_size,
                              shard_size=h.shard_size, dtype=h.dtype)
    return {split: HeatmapSource(os.path.join(dirs["heatmaps"], split)) for split in splits}


def towers_config(config: Any, dataset: registry.Dataset) -> ml_collections.ConfigDict:
    """The ablation's towers config: the experiment's, with the dataset's image size, label
    columns and channel count."""
    towers = ml_collections.ConfigDict(config.towers.to_dict())
    towers.data.update(name=dataset.name, image_size=int(dataset.image_shape[0]),
                       label_policy=config.data.label_policy)
    towers.model.vision.in_channels = 1 + len(config.heatmaps.targets.split(","))
    validate(towers)
    return towers


def run_towers(config: Any, dataset: registry.Dataset, heatmaps: dict[str, Any],
               settings: dict, variants: tuple[str, ...]) -> tuple[dict, dict]:
    """The ablation's ``settings`` x ``variants`` x seeds as one population, queries from
    ``eval_split``, ``data.train_split`` as gallery; returns (summary, histories)."""
    split = config.data.train_split
    train, query = dataset.source(split), dataset.source(config.eval_split)
    results, histories = ablation.run_ablation(
        towers_config(config, dataset), ablation.members(settings, config.seeds, variants),
        {"train": train, "query": query, "gallery": train}, os.path.join(config.out, "towers"),
        class_names=dataset.class_names, reports=dataset.has_reports,
        heatmaps={"train": heatmaps[split], "query": heatmaps[config.eval_split],
                  "gallery": heatmaps[split]})
    return ablation.summarize(results, config.seeds), histories


TABLE_KEYS = ("macro_auroc", "weighted_auroc", "x2x_mAP@5", "r2x_mAP@5", "x2r_mAP@5",
              "i2t_R@5", "t2i_R@5")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _localization_lines(result: dict) -> list[str]:
    def control(r):
        if not r:
            return "n/a"
        d = r["difference"]
        ci = "" if d["ci95"] is None else f" [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
        return f"{r['pointing_game']:.3f} ({d['mean']:+.3f}{ci})"

    return _table(["mode", "pointing game", "chance", "unguided (guided − it, 95 % CI)",
                   "swapped class (guided − it, 95 % CI)", "conditioned, scale 0 (guided − it)",
                   "n"], [[mode, f"{r['pointing_game']:.3f}", f"{r['chance']:.3f}",
                           *(control(r.get(c)) for c in ("unguided", "swapped", "conditioned")),
                           str(r["n"])] for mode, r in result.items() if r.get("pointing_game")
                          is not None])


def _per_class_lines(summary: dict) -> list[str]:
    """Per-class AUROC of each variant (mean over seeds), the first setting's."""
    setting, body = next(iter(summary["settings"].items()))
    auroc = {v: m["per_class_auroc"] for v, m in body["variants"].items()}
    return [f"## Per-class AUROC ({setting} setting, mean over seeds)", "", *_table(
        ["class", *auroc], [[c, *("n/a" if a[c] is None else f"{a[c]:.3f}" for a in
                                  auroc.values())] for c in next(iter(auroc.values()))]), ""]


def write_report(config: Any, dataset: registry.Dataset, summary: dict, loc: dict,
                 selection: dict, skipped: dict, timing: dict, histories: dict) -> dict:
    """results.json, results.md and the training-curves figure; returns the results dict."""
    out = config.out
    payload = {**summary, "dataset": dataset.name, "localization": loc,
               "selection": {k: v for k, v in selection.items() if k != "sweep"},
               "skipped": skipped, "timing_s": timing, "config": json.loads(config.to_json())}
    write_json(os.path.join(out, "results.json"), payload)
    curves = {}
    for name, history in histories.items():  # "<setting>/<variant>/seed<k>": seeds per variant
        curves.setdefault(name.rsplit("/", 1)[0], []).append(history)
    figures.training_curves(os.path.join(out, "training_curves.png"), curves)
    n = {split: len(dataset.source(split))
         for split in (config.data.train_split, "validation", config.eval_split)}
    chosen = ("chosen there" if "sweep" in selection
              else f"not chosen there: {selection['criterion']}")
    lines = [f"# DAug experiment: {dataset.name}", "",
             f"{dataset.name}, {dataset.image_shape[0]} px; {n[config.data.train_split]} "
             f"training films ({config.data.train_split}: the "
             f"diffusion models', the towers' training set and the retrieval gallery), "
             f"{n['validation']} validation films (encode level {selection['level']}, "
             f"{selection['moves']} DDIM moves each way, guidance scale {selection['scale']:g}: "
             f"{chosen}); every figure below on the {n[config.eval_split]} "
             f"{config.eval_split} films; seeds {list(summary['seeds'])}: mean ± sample std over "
             "seeds, effects as paired differences over seeds with a 95 % t-interval.", "",
             ablation.markdown_tables(summary, TABLE_KEYS),
             *_per_class_lines(summary)]
    if loc:
        lines += [f"## Localization (pointing game, {config.eval_split} films, level "
                  f"{selection['level']}, {selection['moves']} moves, guidance scale "
                  f"{selection['scale']:g})", "", *_localization_lines(loc), ""]
    if skipped:
        lines += ["## Not run", "", *(f"- {what}: {why}." for what, why in skipped.items()), ""]
    lines += ["## Time per stage (s)", "", *_table(list(timing), [[f"{v:.0f}" for v in
                                                               timing.values()]])]
    write_text(os.path.join(out, "results.md"), "\n".join(lines) + "\n")
    return payload


def run_experiment(config: Any, until: str = STAGES[-1]) -> dict | None:
    """Runs (or resumes) every stage up to ``until``; returns the results written to
    ``<out>/results.json`` (None when stopped before the report)."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    out, dirs = config.out, workdirs(config)
    os.makedirs(out, exist_ok=True)
    timer = _Timer(out)
    done = lambda stage: stage == until  # noqa: E731
    with timer.stage("data"):
        dataset = open_data(config)
        check_workdirs(config, dataset)
        settings, variants, skipped = towers_plan(config, dataset)
        # The class list is the registry's (results.json: config.towers.model.class_names).
        config.towers.model.class_names = list(dataset.class_names)
        towers_config(config, dataset)  # validated: a bad towers config fails before training
    if done("data"):
        return None
    dcfg, train = config.diffusion, dataset.source(config.data.train_split)
    dcfg.data.update(name=dataset.name, image_size=int(dataset.image_shape[0]),
                     num_train=len(train), seed=int(config.data.seed))
    with timer.stage("diffusion"):
        diffusion_train.train_diffusion(dcfg, train, dirs["diffusion"],
                                        class_names=dataset.class_names)
    if done("diffusion"):
        return None
    with timer.stage("classifier"):
        diffusion_train.train_classifier(dcfg, train, dirs["classifier"],
                                         class_names=dataset.class_names,
                                         label_policy=config.data.label_policy)
        auroc = _cached(os.path.join(out, "classifier_auroc.json"),
                        lambda: strength(config, dataset))
    if done("classifier"):
        return None
    with timer.stage("selection"):
        selection = _cached(os.path.join(out, "selection.json"),
                            lambda: select_guidance(config, dataset))
    selection["classifier_auroc"] = auroc
    # What the heatmaps and their check use (results.json: config).
    config.heatmaps.update(level=int(selection["level"]), num_steps=int(selection["moves"]),
                           scale=float(selection["scale"]))
    if done("selection"):
        return None
    with timer.stage("heatmaps"):
        heatmaps = make_heatmaps(config, dataset)
        figures.heatmap_channels(os.path.join(out, "channels.png"),
                                 dataset.source(config.eval_split), heatmaps[config.eval_split],
                                 dataset.class_names)
    if done("heatmaps"):
        return None
    with timer.stage("localization"):
        h = config.heatmaps
        loc = _cached(os.path.join(out, "localization.json"), lambda: (localize(
            config, dataset, config.eval_split, levels=[h.level], moves=[h.num_steps],
            scales=[h.scale], figure=os.path.join(out, "heatmaps.png")) or {}).get(
                setting_name(h.level, h.num_steps, h.scale), {}))
    if not loc:
        skipped["localization"] = (f"the {config.eval_split} films of {dataset.name} carry no "
                                   f"region (mask, site or box) of a class the classifier guides")
    if done("localization"):
        return None
    with timer.stage("towers"):
        summary, histories = run_towers(config, dataset, heatmaps, settings, variants)
    if done("towers"):
        return None
    with timer.stage("report"):
        figures.retrieval_example(os.path.join(out, "retrieval_example.png"),
                                  os.path.join(out, "towers"), dataset.source(config.eval_split),
                                  class_names=dataset.class_names,
                                  heatmaps=heatmaps[config.eval_split],
                                  member=f"{list(settings)[-1]}/{variants[-1]}/"
                                         f"seed{config.seeds[0]}")
        payload = write_report(config, dataset, summary, loc, selection, skipped, timer.seconds,
                               histories)
    payload["timing_s"] = timer.seconds
    write_json(os.path.join(out, "results.json"), payload)
    return payload


def _cached(path: str, compute) -> Any:
    """``path``'s JSON, computed and written first if absent (a rerun skips the stage)."""
    if not os.path.exists(path):
        write_json(path, compute())
    return read_json(path)


def _config_name(command: str, args: argparse.Namespace) -> str:
    name = args.config or ("demo" if command == "demo" else None)
    if name is None:
        raise ValueError("--config is required (experiments/<name>.py shaped as "
                         "experiments/demo.py, e.g. --config nih_small)")
    return name + (":quick" if args.quick else "")


def _configure(command: str, argv: list[str], load=load_config) -> tuple[argparse.Namespace,
                                                                           ml_collections.ConfigDict]:
    """The command's arguments and its config with ``--set``, ``--data``, ``--data-dir`` and
    ``--out`` applied (``load``: `read_config` before JAX starts, `load_config` to run)."""
    args = _parser(command).parse_args(argv)
    config = load(_config_name(command, args), args.set)
    registry.apply_data_args(config, args)
    config.out = args.out or config.out
    return args, config


def compilation_cache_dir(argv: list[str]) -> str:
    """Where the CLI keeps this command's compiled programs: ``<out>/xla_cache``, so that a
    resumed run compiles nothing it compiled before (much of the demo's time on 2 CPU cores)."""
    return os.path.join(_configure("demo", argv, read_config)[1].out, "xla_cache")


def cpu_devices(argv: list[str]) -> int:
    """How many devices the CLI splits a CPU into for this command: ``cpu_devices`` of the
    config (with ``--set`` applied; `cli._set_up_process`).  Both hooks read the line as
    ``demo`` does (``experiment`` without ``--config`` is refused by `main` right after)."""
    return int(_configure("demo", argv, read_config)[1].cpu_devices)


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="experiments/<name>.py shaped as experiments/demo.py "
                                          "(default for `daug-jax demo`: demo)")
    registry.add_data_args(parser)
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test")
    parser.add_argument("--out", help="output directory (default: the config's out)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the config, e.g. --set seeds=(0,1)")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1],
                        help="stop after this stage (default: run them all)")
    return parser


def main(command: str, argv: list[str]) -> int:
    args, config = _configure(command, argv)
    validate(config.diffusion)
    start = time.perf_counter()
    run_experiment(config, args.until)
    print(f"\n{command}: finished in {time.perf_counter() - start:.0f} s (this run); "
          f"products in {config.out}\n")
    if args.until == STAGES[-1]:
        with open(os.path.join(config.out, "results.md")) as f:
            print(f.read())
    return 0
