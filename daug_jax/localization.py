"""Do DAug heatmaps point at findings?  The pointing game on films with ground-truth regions.

Modes per localized class c, by the regions a dataset carries:

- anomaly (lesion ``masks`` of the synthetic benchmark, radiologist ``boxes`` of NIH
  ChestX-ray14): films positive for c, translated towards ``no:c``; a hit when the heatmap's
  maximum lies inside c's region (the guidance removed the finding where it is);
- channel (``masks``, ``boxes``): the same films translated towards "No Finding" — the DAug
  channel of the paper, one anomaly map for every finding, so a hit is a maximum inside any of
  the film's findings;
- site (``sites``, synthetic only): films negative for c, translated towards c; a hit when the
  maximum lies inside c's site mask (the guidance drew the finding where it develops).

Each reports the hit rate, its chance level (mean area fraction of the region: the hit rate of a
uniformly random point) and the share of heatmap energy inside the region, per class and pooled.
Every film is encoded once; the guided decode (one target per case) is repeated per guidance
scale, which is how the sweep over scales stays affordable (with the pieces of the one translation
path, `heatmaps.Translation`).  Figures: `daug_jax.figures`.

    daug-jax localize --diffusion runs/diffusion --classifier runs/classifier \\
        --out runs/localization [--data nih_cxr14 --data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from daug_jax import metrics
from daug_jax.config import load_config
from daug_jax.data import pipeline, registry
from daug_jax.data.registry import NO_FINDING
from daug_jax.diffusion.sampling import Guidance
from daug_jax.diffusion.schedule import to_model_space
from daug_jax.diffusion.unet import DISEASED, HEALTHY
from daug_jax.files import write_json
from daug_jax.heatmaps import (Translation, TranslationModels, add_model_args, load_models,
                               make_translation, raw_heatmap)
from daug_jax.figures import plot_examples, plot_sweep

# mode -> (region field, label the film must have, guidance target): "absent" = no:<class>,
# "present" = <class>, "healthy" = "No Finding".
MODE_SPECS = {
    "anomaly": {"masks": (1, "absent"), "boxes": (1, "absent")},
    "channel": {"masks": (1, "healthy"), "boxes": (1, "healthy")},
    "site": {"sites": (0, "present")},
}
MODES = ("anomaly", "site")  # the synthetic benchmark's (masks and sites)


def modes_for(fields: Sequence[str]) -> dict[str, tuple[str, int, str]]:
    """``{mode: (region field, wanted label, target)}`` for records with ``fields``."""
    out = {}
    for mode, by_field in MODE_SPECS.items():
        for field, (label, target) in by_field.items():
            if field in fields:
                out[mode] = (field, label, target)
                break
    if not out:
        raise ValueError(f"records have no region to score against (fields {sorted(fields)}); "
                         f"expected one of masks, sites, boxes")
    return out


def select_cases(labels: np.ndarray, regions: dict[str, np.ndarray],
                 data_classes: Sequence[str], classes: Sequence[str], per_class: int,
                 seed: int = 0, modes: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Picks up to ``per_class`` films per class and mode.

    labels: [N, C] int in {-1, 0, 1}; regions: {field: [N, C, H, W] bool} ("masks", "sites",
    "boxes"), C ordered as ``data_classes``; modes: `modes_for` output (default: from the
    fields).  A case needs the mode's label (uncertain films are left out) and a non-empty
    region.  Returns ``{mode: {"image": [M] int, "class": [M] int (index into data_classes),
    "region": [M, H, W], "target": the mode's guidance target}}``.  The region is class c's,
    except in the channel mode, whose one map serves every finding: the union of the regions of
    all ``classes`` the film is positive for (a peak on its other finding is a hit); its cases
    are still listed, and reported, by class.
    """
    modes = modes or modes_for(regions)
    order = np.random.default_rng(seed).permutation(len(labels))
    columns = [list(data_classes).index(name) for name in classes]
    cases = {}
    for mode, (field, wanted, target) in modes.items():
        rows, cols = [], []
        for c in columns:
            keep = (labels[:, c] == wanted) & regions[field][:, c].any(axis=(1, 2))
            chosen = order[keep[order]][:per_class]
            rows += chosen.tolist()
            cols += [c] * len(chosen)
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        region = regions[field][rows, cols]
        if target == "healthy":
            positive = labels[rows][:, columns] == 1                         # [M, C'']
            region = (regions[field][rows][:, columns] & positive[:, :, None, None]).any(axis=1)
        cases[mode] = {"image": rows, "class": cols, "region": region, "target": target}
    return cases


def swapped_classes(classes: np.ndarray) -> np.ndarray | None:
    """The control's class of each case: the next class (cyclic, by index) among the cases'
    classes, so every film is guided towards a finding other than its own; None with one class."""
    present = np.unique(classes)
    if len(present) < 2:
        return None
    return present[(np.searchsorted(present, classes) + 1) % len(present)]


def _guidance(models, mode_target: str, classes: np.ndarray, data_classes, swapped: bool):
    """(classifier index [M], direction [M], UNet label [M]) of a mode's guidance for cases of
    ``classes``; the swapped control guides another finding the same way ("No Finding": removes
    another one), on the same side (healthy, or diseased towards a class's presence)."""
    label = np.full(len(classes), DISEASED if mode_target == "present" else HEALTHY, np.int32)
    if mode_target == "healthy" and not swapped:
        if NO_FINDING not in models.class_names:
            raise ValueError(f"the channel mode guides towards {NO_FINDING!r}, which the "
                             f"classifier does not predict ({list(models.class_names)})")
        return (np.full(len(classes), models.class_names.index(NO_FINDING), np.int32),
                np.ones(len(classes), np.float32), label)
    return (np.array([models.class_names.index(data_classes[c]) for c in classes], np.int32),
            np.full(len(classes), 1.0 if mode_target == "present" else -1.0, np.float32), label)


def translate_cases(models: TranslationModels, translation: Translation, images: np.ndarray,
                    cases: dict, *, scales: Sequence[float], batch_size: int,
                    data_classes: Sequence[str],
                    swapped_modes: Sequence[str] | None = None) -> dict:
    """Guided translations and raw heatmaps of every case at every scale, with their controls.

    images: [N, H, W, 1] float32 in [-1, 1]; cases: `select_cases` output; translation:
    `heatmaps.make_translation`.  Controls: "unguided" — |DDIM(x0) − x0|, what a map holds
    without guidance (the inversion error); "swapped" — the same films guided the mode's way
    towards another finding (`swapped_classes`), at each scale, for the modes in ``swapped_modes``
    (default: every mode; the others get None); for a class-conditional UNet also
    "conditioned" — the decode conditioned on the mode's side at scale 0, what the label does
    without the classifier.  Returns ``{"scales": {scale: {mode: {"translated": [M, H, W, 1],
    "heatmap": [M, H, W], "swapped": [M, H, W] or None}}}, "unguided": {mode: [M, H, W]},
    "conditioned": {mode: [M, H, W]} (class-conditional UNet only)}`` (numpy).  Every film is
    encoded once.
    """
    used = np.unique(np.concatenate([cases[m]["image"] for m in cases]))
    encode, reconstruct = jax.jit(translation.encode), jax.jit(translation.reconstruct)
    x_L, recon = np.zeros_like(images), np.zeros_like(images)
    x_L[used] = _in_batches(lambda x: encode(models.eps_fn, x), batch_size, images[used],
                            desc="encode")
    recon[used] = _in_batches(lambda x: reconstruct(models.eps_fn, x), batch_size, x_L[used])
    base = images if translation.reference == "x0" else recon
    decode = jax.jit(translation.decode)

    def run(rows, guidance, scale):
        """Decodes of films ``rows``, one target each (``guidance``: index, direction, label
        [M]) -> (x_c [M, ...], heat [M, H, W])."""
        return _in_batches(lambda x, b, i, d, y: decode(models.eps_fn, models.logit_fn, x, b,
                                                        Guidance(i, d, np.float32(scale), y)),
                           batch_size, x_L[rows], base[rows], *guidance)

    out = {"scales": {}, "unguided": {
        m: np.asarray(raw_heatmap(images[cases[m]["image"]], recon[cases[m]["image"]],
                                  translation.smooth_sigma)) for m in cases}}
    guidance = {m: _guidance(models, c["target"], c["class"], data_classes, False)
                for m, c in cases.items()}
    if models.class_cond:
        out["conditioned"] = {m: run(cases[m]["image"], guidance[m], 0.0)[1] for m in cases}
    for scale in tqdm(scales, desc="guided decode", unit="scale"):
        by_mode = out["scales"][float(scale)] = {}
        for mode in cases:
            img, cls, target = cases[mode]["image"], cases[mode]["class"], cases[mode]["target"]
            x_c, heat = run(img, guidance[mode], scale)
            other = (swapped_classes(cls) if swapped_modes is None or mode in swapped_modes
                     else None)
            swapped = None if other is None else run(
                img, _guidance(models, target, other, data_classes, True), scale)[1]
            by_mode[mode] = {"translated": x_c, "heatmap": heat, "swapped": swapped}
    return out


def _in_batches(fn, batch_size: int, *arrays: np.ndarray, desc: str | None = None):
    """``fn(*batch)`` over the rows of ``arrays`` in batches padded to ``batch_size`` (one
    compiled shape; the padding is dropped) -> its outputs, concatenated, as numpy."""
    parts = []
    starts = range(0, len(arrays[0]), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch") if desc else starts:
        n = len(arrays[0][start:start + batch_size])
        outputs = jax.device_get(fn(*(pipeline.pad_rows(a[start:start + batch_size], batch_size)
                                      for a in arrays)))
        parts.append(jax.tree.map(lambda v: v[:n], outputs))
    return jax.tree.map(lambda *p: np.concatenate(p), *parts)


def _game(heat: np.ndarray, region: np.ndarray, cls: np.ndarray, data_classes) -> dict:
    result = metrics.pointing_game(heat, region)
    result["per_class"] = {data_classes[c]: metrics.pointing_game(heat[cls == c], region[cls == c])
                           for c in np.unique(cls)}
    return result


def score(out: dict, scale: float, cases: dict, data_classes: Sequence[str]) -> dict:
    """Pointing game per mode at ``scale`` (pooled over classes, and ``per_class``), with its
    controls: {"unguided", "swapped", and "conditioned" where the UNet is class-conditional} of
    the same keys, each also carrying "difference" = guided − control over the same films
    ({"mean", "ci95"}, `metrics.paired_difference`).  JSON-ready.  out: `translate_cases`."""
    result = {}
    for mode in cases:
        region, cls = cases[mode]["region"], cases[mode]["class"]
        if len(cls) == 0:
            result[mode] = {"n": 0, "per_class": {}}
            continue
        guided = out["scales"][float(scale)][mode]
        result[mode] = _game(guided["heatmap"], region, cls, data_classes)
        hits = metrics.pointing_hits(guided["heatmap"], region).astype(np.float64)
        controls = {"unguided": out["unguided"][mode], "swapped": guided["swapped"]}
        if "conditioned" in out:
            controls["conditioned"] = out["conditioned"][mode]
        for name, heat in controls.items():
            result[mode][name] = None if heat is None else _game(heat, region, cls, data_classes)
            if heat is not None:
                control = metrics.pointing_hits(heat, region).astype(np.float64)
                result[mode][name]["difference"] = metrics.paired_difference(hits, control)
    return result


# ----------------------------------------------------------------------------- films
def collect_films(source, modes: dict, classes: Sequence[str], data_classes: Sequence[str],
                  per_class: int, limit: int, chunk: int = 256) -> dict:
    """Streams the first ``limit`` records of ``source`` and keeps the candidate films only.

    A film is kept while it is a new candidate (the mode's label, a non-empty region) for some
    (mode, class) that has fewer than 2 x ``per_class`` candidates, so memory is bounded by the
    cases, not by the split: NIH's boxed films are 880 of 112,120.  Returns ``{"image" [M, H, W,
    1] float32 in [0, 1], "labels" [M, C], field: [M, C, H, W]}`` for `select_cases`; {} when
    no film is a candidate.
    """
    columns = [list(data_classes).index(c) for c in classes]
    counts = {(m, c): 0 for m in modes for c in columns}
    kept: dict[str, list] = {}
    for start in tqdm(range(0, min(int(limit), len(source)), chunk), desc="scan", unit="chunk"):
        batch = pipeline.read(source, range(start, min(start + chunk, int(limit), len(source))))
        for j in range(len(batch["labels"])):
            new = [(m, c) for m, (field, wanted, _) in modes.items() for c in columns
                   if counts[m, c] < 2 * per_class and batch["labels"][j, c] == wanted
                   and batch[field][j, c].any()]
            if not new:
                continue
            for key in new:
                counts[key] += 1
            for field in {"image", "labels", *(f for f, _, _ in modes.values())}:
                kept.setdefault(field, []).append(batch[field][j])
    if not kept:
        return {}
    films = {k: np.stack(v) for k, v in kept.items()}
    films["image"] = pipeline.to_unit_float(films["image"])
    return films


# ----------------------------------------------------------------------------- CLI
def _interval(effect: dict) -> str:
    """``+0.12 [+0.03, +0.21]`` (mean and 95 % interval), for the command's summary lines."""
    if effect.get("ci95") is None:
        return f"{effect['mean']:+.2f}"
    return f"{effect['mean']:+.2f} [{effect['ci95'][0]:+.2f}, {effect['ci95'][1]:+.2f}]"


def cases_of(dataset, split: str, models: TranslationModels, loc, seed: int,
             per_class: int | None = None):
    """The scored cases of ``split`` (up to ``per_class``, default ``loc.cases_per_class``, per
    class and mode, from its first ``loc.pool_size`` films): (data_classes, non-empty cases,
    films in [-1, 1]); cases are {} when no film of the split has a region to point at."""
    data_classes = list(dataset.class_names)
    per_class = int(loc.cases_per_class if per_class is None else per_class)
    modes = modes_for(dataset.builder.info.features.keys())
    # Every class the data has a region for and the classifier can guide ("No Finding": none).
    classes = [c for c in data_classes if c in models.class_names and c != NO_FINDING]
    data = collect_films(dataset.source(split), modes, classes, data_classes, per_class,
                         int(loc.pool_size))
    if not data:
        return data_classes, {}, None
    regions = {field: data[field] for field, _, _ in modes.values()}
    cases = select_cases(data["labels"], regions, data_classes, classes, per_class, seed, modes)
    cases = {m: c for m, c in cases.items() if len(c["class"])}
    return data_classes, cases, to_model_space(data["image"])


def _print_summary(results: dict, cases: dict, scales: list[float], scale: float) -> None:
    for s in scales:
        line = ", ".join(f"{m} {results[s][m].get('pointing_game', float('nan')):.2f} "
                         f"(chance {results[s][m].get('chance', float('nan')):.2f}, "
                         f"n={results[s][m]['n']})" for m in cases)
        print(f"localize: scale {s:g}: {line}")
    for mode in cases:
        r = results[float(scale)][mode]
        controls = [f"{c} {r[c]['pointing_game']:.2f} (guided - {c} "
                    f"{_interval(r[c]['difference'])})"
                    for c in ("unguided", "swapped", "conditioned") if r.get(c)]
        print(f"localize: {mode} at scale {scale:g}: guided {r['pointing_game']:.2f}; "
              + "; ".join(controls))
        for name, r in results[float(scale)][mode]["per_class"].items():
            print(f"  {mode:>7} {name:<17} hit {r['pointing_game']:.2f}  chance {r['chance']:.2f}"
                  f"  energy {r['energy_inside']:.2f}  n={r['n']}")


def main(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}",
                                     description=__doc__.splitlines()[0])
    add_model_args(parser, out="runs/localization")
    parser.add_argument("--scale", type=float, help="guidance scale of the main result (config)")
    parser.add_argument("--sweep", help="comma-separated guidance scales (config)")
    parser.add_argument("--split", default="test", help="split whose films are scored")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    registry.apply_data_args(config, args)
    h = config.heatmaps
    loc = h.localization
    models = load_models(args.diffusion, args.classifier)
    scale = h.scale if args.scale is None else args.scale
    sweep = [float(s) for s in (args.sweep.split(",") if args.sweep else loc.sweep_scales)]
    scales = sorted(set(sweep) | {float(scale)})
    dataset = registry.open_dataset(config.data, image_size=models.image_shape[0])
    if not dataset.localized:
        raise ValueError(f"{dataset.name} has no lesion masks, sites or boxes to score the "
                         f"pointing game against (datasets with them: "
                         f"{', '.join(n for n, e in registry.REGISTRY.items() if e.localized)})")
    seed, size = int(config.data.seed), models.image_shape[0]
    data_classes, cases, images = cases_of(dataset, args.split, models, loc, seed)
    if not cases:
        raise ValueError(f"no film among the first {loc.pool_size} of {dataset.name} "
                         f"{args.split} has a region for a class the classifier guides")
    out = translate_cases(models, make_translation(models, h), images, cases, scales=scales,
                          batch_size=loc.batch_size, data_classes=data_classes)
    results = {s: score(out, s, cases, data_classes) for s in scales}
    settings = {"guidance_scale": float(scale), "guidance": h.guidance, "level": h.level,
                "reference": h.reference,
                "num_steps": h.num_steps, "smooth_sigma": h.smooth_sigma, "dataset": dataset.name,
                "split": args.split, "image_size": size, "seed": seed, "pool_size": loc.pool_size,
                "cases_per_class": loc.cases_per_class, "diffusion": args.diffusion,
                "classifier": args.classifier}
    write_json(os.path.join(args.out, "localization.json"),
               {**results[float(scale)], "settings": settings})
    plot_examples(os.path.join(args.out, "localization.png"), images, cases,
                  out["scales"][float(scale)], data_classes, loc.examples_per_class)
    swept = {"settings": settings, "scales": {str(s): results[s] for s in sweep}}
    write_json(os.path.join(args.out, "guidance_sweep.json"), swept)
    plot_sweep(os.path.join(args.out, "guidance_sweep.png"), swept["scales"])
    _print_summary(results, cases, scales, scale)
    print(f"localize: results and figures in {args.out}")
    return 0
