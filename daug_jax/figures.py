"""PNG figures: the demo's (training curves of the ablation, a retrieval example) and the pointing
game's (`daug_jax.localization`: example cases, the guidance sweep)."""

from __future__ import annotations

import textwrap
from typing import Any, Sequence

import numpy as np

from daug_jax.data.pipeline import ArraySource
from daug_jax.data.synthetic import CLASS_NAMES
from daug_jax.evaluate import embed
from daug_jax.files import save_figure
from daug_jax.train import load_towers


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    # Not at module top: the backend is process-wide, chosen only by code that draws a figure.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    return plt


def training_curves(path: str, history: dict[str, list[list[dict]]]) -> None:
    """Both loss parts vs step, one line per variant (first seed).

    history: variant (e.g. "retrieval/daug") -> per seed -> logged rows {"step", "image_text",
    "image_class", ...}.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, runs in history.items():
        for ax, key in zip(axes, ("image_text", "image_class")):
            ax.plot([r["step"] for r in runs[0]], [r[key] for r in runs[0]], label=name)
    for ax, title, unused in zip(axes, ("image-text (CLIP) loss", "image-class (sigmoid) loss"),
                                 ("class-only (w = 0)", "CLIP-only (w = 1)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.text(0.02, 0.02, f"{unused} variants: logged, not optimised", fontsize=7,
                transform=ax.transAxes)
    axes[1].legend(fontsize=6)
    save_figure(fig, path, bbox_inches="tight")


def retrieval_example(path: str, workdir: str, test: dict, num_queries: int = 3,
                      top_k: int = 4, *, heatmaps: Any = None, member: str | None = None) -> None:
    """For a few test films: the query, its top-k most similar films and the top report.

    test: the (small, in-memory) test films as arrays with "image", "labels", "report", "id";
    heatmaps: their heatmap dataset, for DAug towers; member: which towers of a population.
    """
    towers = load_towers(workdir, member)
    config = towers.config
    source = ArraySource({k: test[k] for k in ("image", "labels", "report", "id")})
    emb = embed(towers, source, class_names=CLASS_NAMES, heatmaps=heatmaps)
    img, txt = emb["image_emb"], emb["text_emb"]
    labels = np.asarray(test["labels"])
    # Queries: films with at least one finding, so that there is something to retrieve.
    queries = [i for i in range(len(img)) if labels[i, 1:].max() == 1][:num_queries]

    def tag(i):
        found = [n for n, v in zip(config.model.class_names, labels[i]) if v == 1]
        return ", ".join(found) or "uncertain only"

    plt = _pyplot()
    fig, axes = plt.subplots(len(queries), top_k + 2, figsize=(2.1 * (top_k + 2) + 2.5,
                                                               2.5 * len(queries)),
                             gridspec_kw={"width_ratios": [1] * (top_k + 1) + [2.4]})
    for row, q in enumerate(queries):
        sims = img @ img[q]
        sims[q] = -np.inf
        ranked = np.argsort(-sims, kind="stable")[:top_k]
        for col, i in enumerate([q, *ranked]):
            ax = axes[row, col]
            ax.imshow(test["image"][i, ..., 0], cmap="gray", vmin=0, vmax=1)
            ax.set_title(("query: " if col == 0 else f"#{col}: ") + tag(i), fontsize=6)
            ax.axis("off")
        best = int(np.argmax(txt @ img[q]))
        verdict = "its own report" if best == q else f"report of film {best} ({tag(best)})"
        axes[row, -1].text(0, 1, f"top report ({verdict}):\n" + textwrap.fill(
            str(test["report"][best]), 48), fontsize=6, va="top", family="monospace")
        axes[row, -1].axis("off")
    fig.suptitle(f"Retrieval with the {config.model.vision.fill} / clip_weight="
                 f"{config.train.clip_weight} towers (test films)", fontsize=9)
    save_figure(fig, path, bbox_inches="tight")


def plot_examples(path: str, images: np.ndarray, cases: dict, out: dict,
                  data_classes: Sequence[str], per_class: int) -> None:
    """PNG: for a few cases per class and mode, image / translated / heatmap / region outline."""
    plt = _pyplot()
    picks = {m: [i for c in np.unique(cases[m]["class"])
                 for i in np.flatnonzero(cases[m]["class"] == c)[:per_class]] for m in cases}
    n_rows = max(1, max(len(p) for p in picks.values()))
    fig, axes = plt.subplots(n_rows, 4 * len(cases), figsize=(7 * len(cases), 1.9 * n_rows),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for block, mode in enumerate(cases):
        for row, i in enumerate(picks[mode]):
            img = images[cases[mode]["image"][i], ..., 0]
            heat = out[mode]["heatmap"][i]
            peak = np.unravel_index(np.argmax(heat), heat.shape)
            region = cases[mode]["region"][i]
            name = data_classes[cases[mode]["class"][i]]
            panels = (img, out[mode]["translated"][i, ..., 0], heat, img)
            target = {"anomaly": "no:" + name, "channel": "to No Finding"}.get(mode, "to " + name)
            titles = (f"{mode}: {name}", target, "|x_c - x0|", "region, max")
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
    plt = _pyplot()
    scales = sorted(sweep, key=float)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [float(s) for s in scales]
    for mode, color in zip(sweep[scales[0]], ("tab:red", "tab:blue", "tab:green")):
        hits = [sweep[s][mode].get("pointing_game", np.nan) for s in scales]
        chance = [sweep[s][mode].get("chance", np.nan) for s in scales]
        ax.plot(xs, hits, "o-", color=color, label=f"{mode} mode")
        ax.plot(xs, chance, "--", color=color, alpha=0.6, label=f"{mode} chance")
    ax.set_xscale("log")
    ax.set_xlabel("guidance scale s")
    ax.set_ylabel("pointing game hit rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
