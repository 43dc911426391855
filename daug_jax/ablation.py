"""The ablation as one population of towers: train together, evaluate each, summarise honestly.

    results, histories = run_ablation(config, members(settings, seeds), splits, workdir, ...)
    summary = summarize(results, seeds)

The two effects of each setting's 2x2 design are paired differences over seeds with a 95 %
t-interval (`metrics.paired_difference`): ``daug`` = DAug channels on minus off, ``hybrid`` =
hybrid loss minus the setting's single-term loss, each averaged over the other factor's levels.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from daug_jax import metrics
from daug_jax.evaluate import evaluate_towers
from daug_jax.files import read_json, write_json
from daug_jax.metrics import MAP_KS, RECALL_KS
from daug_jax.train import train_population

METRIC_KEYS = ("macro_auroc", "weighted_auroc",
               *(f"{d}_mAP@{k}" for d in ("x2x", "r2x", "x2r") for k in MAP_KS),
               *(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in RECALL_KS))
# The 2x2 design inside each setting: variant -> (model.vision.fill, which of the setting's
# losses: its single term or the hybrid).
VARIANTS = {"baseline": ("repeat", "single"), "daug": ("heatmaps", "single"),
            "hybrid": ("repeat", "hybrid"), "daug_hybrid": ("heatmaps", "hybrid")}
# effect -> (variants with the factor on, variants with it off); pairs by the other factor's level
EFFECTS = {"daug": (("daug", "daug_hybrid"), ("baseline", "hybrid")),
           "hybrid": (("hybrid", "daug_hybrid"), ("baseline", "daug"))}


def members(settings: dict, seeds: Sequence[int],
            variants: Sequence[str] = tuple(VARIANTS)) -> list[dict]:
    """Every run of the ablation as a member of one population (`daug_jax.population`):
    {"name": "<setting>/<variant>/seed<k>", "seed", "fill", "clip_weight"}.

    settings: {setting: {"single": w, "hybrid": w}}, the clip weight of the setting's
    single-term loss and of its hybrid (the paper's, ``experiments/ablation.py``); variants: the
    cells of the 2x2 design to run (without reports: the single-term ones of a class-only
    setting)."""
    out = []
    for setting, weights in settings.items():
        if set(weights) != {"single", "hybrid"}:
            raise ValueError(f"ablation setting {setting!r} needs the clip weights of its "
                             f"'single' and 'hybrid' losses, got {dict(weights)}")
        for variant in variants:
            fill, loss = VARIANTS[variant]
            for seed in seeds:
                out.append({"name": f"{setting}/{variant}/seed{int(seed)}", "seed": int(seed),
                            "fill": fill, "clip_weight": float(weights[loss])})
    return out


def run_ablation(config: Any, members: Sequence[dict], splits: dict, workdir: str, *,
                 class_names: Sequence[str], heatmaps: dict | None = None, reports: bool = True,
                 progress: bool = True) -> tuple[dict, dict]:
    """Trains (or resumes) every member as one population in ``workdir``, then evaluates each
    (queries from ``splits["query"]``, gallery ``splits["gallery"]``; cached in
    ``workdir/eval/``, so a rerun only does what is missing).  splits: {"train", "query",
    "gallery"} random-access sources; heatmaps: their heatmap datasets, same keys; reports:
    whether the splits carry reports to embed (report retrieval is scored only then).
    Returns ({member name: `evaluate_embeddings` result}, {member name: training history})."""
    maps = heatmaps or {}
    _, histories = train_population(config, members, splits["train"], workdir,
                                    class_names=class_names, heatmaps=maps.get("train"),
                                    progress=progress)
    paths = {m["name"]: os.path.join(workdir, "eval", m["name"].replace("/", "__") + ".json")
             for m in members}
    todo = [name for name, path in paths.items() if not os.path.exists(path)]
    if todo:  # one restore and one set of compiled encoders for every member
        done = evaluate_towers(workdir, splits["query"], splits["gallery"],
                               class_names=class_names, members=todo, heatmaps=maps,
                               reports=reports, progress=progress)
        for name, result in done.items():
            write_json(paths[name], result)
    return {name: read_json(path) for name, path in paths.items()}, histories


def _per_seed(results: dict, setting: str, variant: str, seeds: Sequence[int], key: str) -> list:
    return [results[f"{setting}/{variant}/seed{s}"].get(key) for s in seeds]


def _mean_of(values: list) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def summarize(results: dict, seeds: Sequence[int]) -> dict:
    """{"seeds", "settings": {setting: {"variants": {variant: {metric: {"mean", "std",
    "per_seed"}, "per_class_auroc": {class: mean}}}, "effects": {"daug" | "hybrid": {metric:
    {"mean", "ci95"}}}}}, "chance": {metric: value}} from per-member results named ``<setting>/<variant>/seed<k>``.  An effect
    is averaged over the other factor's levels that ran: without the hybrid variants the DAug
    effect is daug - baseline, and the hybrid effect is not there."""
    out = {"seeds": [int(s) for s in seeds], "settings": {}}
    for setting in sorted({name.split("/")[0] for name in results}):
        ran = [v for v in VARIANTS if f"{setting}/{v}/seed{seeds[0]}" in results]
        variants = {v: {key: metrics.mean_std(_per_seed(results, setting, v, seeds, key))
                        for key in METRIC_KEYS} for v in ran}
        for v in ran:  # per-class AUROC: the mean over seeds of each class
            per_class = _per_seed(results, setting, v, seeds, "per_class_auroc")
            variants[v]["per_class_auroc"] = {
                c: metrics.mean_std([p[c] for p in per_class])["mean"] for c in per_class[0] or {}}
        effects = {}
        for effect, (on, off) in EFFECTS.items():
            pairs = [(a, b) for a, b in zip(on, off) if a in ran and b in ran]
            if not pairs:
                continue
            effects[effect] = {}
            for key in METRIC_KEYS:
                a, b = ([_mean_of(seed) for seed in zip(*(_per_seed(results, setting, v, seeds, key)
                                                          for v in side))]
                        for side in zip(*pairs))
                d = metrics.paired_difference(a, b)
                effects[effect][key] = {"mean": d["mean"], "ci95": d["ci95"]}
        out["settings"][setting] = {"variants": variants, "effects": effects}
    first = next(iter(results.values()))
    out["chance"] = {k: v for k, v in first.get("chance", {}).items() if k in METRIC_KEYS}
    return out


def _cell(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if std is None else f"{value:.3f} ± {std:.3f}"


def _interval(effect: dict) -> str:
    if effect["mean"] is None:
        return "n/a"
    if effect["ci95"] is None:
        return f"{effect['mean']:+.3f}"
    resolved = "" if metrics.excludes_zero(effect) else " (unresolved)"
    return f"{effect['mean']:+.3f} [{effect['ci95'][0]:+.3f}, {effect['ci95'][1]:+.3f}]{resolved}"


def markdown_tables(summary: dict, keys: Sequence[str]) -> str:
    """Per setting: variants x ``keys`` as ``mean ± std``, then the two paired effects with their
    95 % intervals ("unresolved" when the interval contains 0), then the chance level."""
    lines = []
    for setting, body in summary["settings"].items():
        lines += [f"### {setting.capitalize()} setting", "",
                  "| variant | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 1)]
        for variant, m in body["variants"].items():
            lines.append(f"| {variant} | " + " | ".join(_cell(m[k]["mean"], m[k]["std"])
                                                     for k in keys) + " |")
        for effect, m in body["effects"].items():
            lines.append(f"| effect of {effect} | " + " | ".join(_interval(m[k]) for k in keys)
                         + " |")
        lines += ["| chance | " + " | ".join(_cell(summary["chance"].get(k)) for k in keys)
                  + " |", ""]
    return "\n".join(lines)
