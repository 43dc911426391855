"""Figures of the pointing game (`daug_jax.localization`): example cases and the guidance sweep."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from daug_jax.files import save_figure

def plot_examples(path: str, images: np.ndarray, cases: dict, out: dict,
                  data_classes: Sequence[str], per_class: int) -> None:
    """PNG: for a few cases per class and mode, image / translated / heatmap / region outline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            titles = (f"{mode}: {name}", target,
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
    for mode, color in zip(sweep[scales[0]], ("tab:red", "tab:blue", "tab:green")):
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
