"""Do DAug heatmaps point at findings?  The pointing game on held-out synthetic films.

Two modes per localized class c (the benchmark has a ground-truth mask and site per class):

- anomaly: films positive for c, translated towards ``no:c``; a hit when the heatmap's maximum
  lies inside c's mask (the guidance removed the finding where it is);
- site: films negative for c, translated towards c; a hit when the maximum lies inside c's site
  mask (the guidance drew the finding where it develops in this patient's anatomy).

Each reports the hit rate, its chance level (mean area fraction of the region: the hit rate of a
uniformly random point) and the share of heatmap energy inside the region, per class and pooled.
Every film is encoded once; the guided decode (one target per case) is repeated per guidance
scale, which is how the sweep over scales stays affordable.

    daug-jax localize --diffusion runs/diffusion --classifier runs/classifier \\
        --out runs/localization
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from daug_jax import metrics
from daug_jax.diffusion import sampling
from daug_jax.files import save_figure, write_json
from daug_jax.heatmaps import TranslationModels, raw_heatmap

MODES = ("anomaly", "site")


def select_cases(labels: np.ndarray, masks: np.ndarray, sites: np.ndarray,
                 data_classes: Sequence[str], classes: Sequence[str], per_class: int,
                 seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Picks up to ``per_class`` films per class and mode.

    labels: [N, C] int in {-1, 0, 1}; masks, sites: [N, C, H, W] bool, C ordered as
    ``data_classes``.  Anomaly cases need label 1 and a non-empty mask, site cases label 0 and a
    non-empty site (uncertain films are left out of both).  Returns
    ``{mode: {"image": [M] int, "class": [M] int (index into data_classes), "region": [M, H, W]}}``.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    cases = {}
    for mode in MODES:
        rows, cols = [], []
        for name in classes:
            c = list(data_classes).index(name)
            region = masks[:, c] if mode == "anomaly" else sites[:, c]
            keep = (labels[:, c] == (1 if mode == "anomaly" else 0)) & region.any(axis=(1, 2))
            chosen = order[keep[order]][:per_class]
            rows += chosen.tolist()
            cols += [c] * len(chosen)
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        region = (masks if mode == "anomaly" else sites)[rows, cols]
        cases[mode] = {"image": rows, "class": cols, "region": region}
    return cases


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the leading axis to ``size`` by repeating the last row (one compiled batch shape)."""
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def translate_cases(models: TranslationModels, images: np.ndarray, cases: dict, *,
                    scales: Sequence[float], level: int, num_steps: int, smooth_sigma: float,
                    batch_size: int, data_classes: Sequence[str]) -> dict:
    """Guided translations and raw heatmaps of every case at every scale.

    images: [N, H, W, 1] float32 in [-1, 1].  Returns ``{scale: {mode: {"translated":
    [M, H, W, 1], "heatmap": [M, H, W]}}}`` (numpy).
    """
    grid = sampling.ddim_grid(len(models.alpha_bar), level, num_steps)
    unroll = sampling.default_unroll()
    encode = jax.jit(lambda eps_fn, x: sampling.ddim_encode(eps_fn, x, models.alpha_bar, grid,
                                                            unroll=unroll))

    @jax.jit
    def decode(eps_fn, logit_fn, x0, x_L, index, direction, scale):
        x_c = sampling.guided_ddim_decode(eps_fn, logit_fn, x_L, models.alpha_bar, grid, index,
                                          direction, scale, unroll=unroll)
        return x_c, raw_heatmap(x0, x_c, smooth_sigma)

    used = np.unique(np.concatenate([cases[m]["image"] for m in MODES]))
    encoded = {}
    for start in tqdm(range(0, len(used), batch_size), desc="encode", unit="batch"):
        rows = used[start:start + batch_size]
        x_L = jax.device_get(encode(models.eps_fn, _pad(images[rows], batch_size)))
        encoded.update(zip(rows.tolist(), x_L[:len(rows)]))

    # Class index in the classifier's logits; anomaly cases guide towards absence.
    logit_index = {c: models.class_names.index(name) for c, name in enumerate(data_classes)
                   if name in models.class_names}
    out = {}
    total = len(scales) * sum(-(-len(cases[m]["image"]) // batch_size) for m in MODES)
    bar = tqdm(total=total, desc="guided decode", unit="batch")
    for scale in scales:
        out[float(scale)] = {}
        for mode in MODES:
            img, cls = cases[mode]["image"], cases[mode]["class"]
            direction = np.float32(-1.0 if mode == "anomaly" else 1.0)
            parts = []
            for start in range(0, len(img), batch_size):
                rows, n = img[start:start + batch_size], len(img[start:start + batch_size])
                index = np.array([logit_index[c] for c in cls[start:start + batch_size]], np.int32)
                x_c, heat = decode(models.eps_fn, models.logit_fn,
                                   _pad(images[rows], batch_size),
                                   _pad(np.stack([encoded[r] for r in rows.tolist()]), batch_size),
                                   _pad(index, batch_size), direction, np.float32(scale))
                parts.append(jax.device_get((x_c[:n], heat[:n])))
                bar.update(1)
            out[float(scale)][mode] = {
                "translated": np.concatenate([p[0] for p in parts]),
                "heatmap": np.concatenate([p[1] for p in parts])}
    bar.close()
    return out


def score(heatmaps: dict, cases: dict, data_classes: Sequence[str]) -> dict:
    """Pointing game per mode: pooled over classes plus ``per_class``; JSON-ready."""
    result = {}
    for mode in MODES:
        heat, region, cls = heatmaps[mode]["heatmap"], cases[mode]["region"], cases[mode]["class"]
        if len(cls) == 0:
            result[mode] = {"n": 0, "per_class": {}}
            continue
        result[mode] = metrics.pointing_game(heat, region)
        result[mode]["per_class"] = {
            data_classes[c]: metrics.pointing_game(heat[cls == c], region[cls == c])
            for c in np.unique(cls)}
    return result


# ----------------------------------------------------------------------------- figures
def plot_examples(path: str, images: np.ndarray, cases: dict, out: dict,
                  data_classes: Sequence[str], per_class: int) -> None:
    """PNG: for a few cases per class and mode, image / translated / heatmap / region outline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = {m: [i for c in np.unique(cases[m]["class"])
                 for i in np.flatnonzero(cases[m]["class"] == c)[:per_class]] for m in MODES}
    n_rows = max(1, max(len(p) for p in picks.values()))
    fig, axes = plt.subplots(n_rows, 8, figsize=(14, 1.9 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for block, mode in enumerate(MODES):
        for row, i in enumerate(picks[mode]):
            img = images[cases[mode]["image"][i], ..., 0]
            heat = out[mode]["heatmap"][i]
            peak = np.unravel_index(np.argmax(heat), heat.shape)
            region = cases[mode]["region"][i]
            name = data_classes[cases[mode]["class"][i]]
            panels = (img, out[mode]["translated"][i, ..., 0], heat, img)
            titles = (f"{mode}: {name}", "no:" + name if mode == "anomaly" else "to " + name,
                      "|x_c - x0|", "region, max")
            for col, (panel, title) in enumerate(zip(panels, titles)):
                ax = axes[row, 4 * block + col]
                ax.imshow(panel, cmap="magma" if col == 2 else "gray",
                          **({} if col == 2 else {"vmin": -1, "vmax": 1}))
                ax.set_title(title, fontsize=7)
            ax.contour(region, levels=[0.5], colors="cyan", linewidths=0.8)
            hit = bool(region[peak])
            ax.plot(peak[1], peak[0], marker="x", color="lime" if hit else "red", markersize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_sweep(path: str, sweep: dict) -> None:
    """PNG: pooled pointing-game hit rate against guidance scale for both modes, with chance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(sweep, key=float)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode, color in zip(MODES, ("tab:red", "tab:blue")):
        hits = [sweep[s][mode].get("pointing_game", np.nan) for s in scales]
        chance = [sweep[s][mode].get("chance", np.nan) for s in scales]
        ax.plot([float(s) for s in scales], hits, "o-", color=color, label=f"{mode} mode")
        ax.plot([float(s) for s in scales], chance, "--", color=color, alpha=0.6,
                label=f"{mode} chance")
    ax.set_xscale("log")
    ax.set_xlabel("guidance scale s")
    ax.set_ylabel("pointing game hit rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- CLI
def main(command: str, argv: list[str]) -> int:
    from daug_jax.config import load_config
    from daug_jax.data import pipeline, registry, synthetic
    from daug_jax.heatmaps import load_models

    parser = argparse.ArgumentParser(prog=f"daug-jax {command}",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--diffusion", default="runs/diffusion")
    parser.add_argument("--classifier", default="runs/classifier")
    parser.add_argument("--out", default="runs/localization")
    parser.add_argument("--config", default="heatmaps", help="experiments/<name>.py or a .py path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--scale", type=float, help="guidance scale of the main result (config)")
    parser.add_argument("--sweep", help="comma-separated guidance scales (config)")
    parser.add_argument("--split", default="test", help="split whose films are scored")
    registry.add_data_args(parser)
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    registry.apply_data_args(config, args)
    h = config.heatmaps
    loc = h.localization
    models = load_models(args.diffusion, args.classifier)
    scale = h.scale if args.scale is None else args.scale
    sweep = ([float(s) for s in args.sweep.split(",")] if args.sweep
             else [float(s) for s in loc.sweep_scales])
    scales = sorted(set(sweep) | {float(scale)})
    dataset = registry.open_dataset(config.data, image_size=models.image_shape[0])
    if not dataset.localized:
        raise ValueError(f"{dataset.name} has no lesion masks or sites to score the pointing "
                         f"game against (datasets with them: "
                         f"{', '.join(n for n, e in registry.REGISTRY.items() if e.localized)})")
    source = dataset.source(args.split)
    seed = int(config.data.get("seed", 0))
    # A bounded pool of the split (not the whole split) is read to pick the cases from.
    data = pipeline.read(source, range(min(int(loc.pool_size), len(source))))
    data["image"] = pipeline.to_unit_float(data["image"])
    size = models.image_shape[0]
    classes = [c for c in synthetic.LOCALIZED_CLASSES if c in models.class_names]
    cases = select_cases(data["labels"], data["masks"], data["sites"], list(dataset.class_names),
                         classes, loc.cases_per_class, seed)
    images = data["image"] * 2.0 - 1.0
    out = translate_cases(models, images, cases, scales=scales, level=h.level,
                          num_steps=h.num_steps, smooth_sigma=h.smooth_sigma,
                          batch_size=loc.batch_size, data_classes=list(dataset.class_names))
    results = {s: score(out[s], cases, list(dataset.class_names)) for s in scales}
    settings = {"guidance_scale": float(scale), "level": h.level,
                "num_steps": h.num_steps, "smooth_sigma": h.smooth_sigma, "dataset": dataset.name,
                "split": args.split, "image_size": size, "seed": seed, "pool_size": loc.pool_size,
                "cases_per_class": loc.cases_per_class, "diffusion": args.diffusion,
                "classifier": args.classifier}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "localization.json"),
               {**results[float(scale)], "settings": settings})
    plot_examples(os.path.join(args.out, "localization.png"), images, cases, out[float(scale)],
                  list(dataset.class_names), loc.examples_per_class)
    write_json(os.path.join(args.out, "guidance_sweep.json"),
               {"settings": settings, "scales": {str(s): results[s] for s in sweep}})
    plot_sweep(os.path.join(args.out, "guidance_sweep.png"),
               {str(s): results[s] for s in sweep})
    for s in scales:
        line = ", ".join(f"{m} {results[s][m].get('pointing_game', float('nan')):.2f} "
                         f"(chance {results[s][m].get('chance', float('nan')):.2f}, "
                         f"n={results[s][m]['n']})" for m in MODES)
        print(f"localize: scale {s:g}: {line}")
    for mode in MODES:
        for name, r in results[float(scale)][mode]["per_class"].items():
            print(f"  {mode:>7} {name:<17} hit {r['pointing_game']:.2f}  chance {r['chance']:.2f}"
                  f"  energy {r['energy_inside']:.2f}  n={r['n']}")
    print(f"localize: results and figures in {args.out}")
    return 0
