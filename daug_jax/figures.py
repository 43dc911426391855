"""PNG figures: the experiment's (training curves of the ablation, a retrieval example, the
heatmap channels) and the pointing game's (`daug_jax.localization`: example cases, the guidance
sweep)."""

from __future__ import annotations

import textwrap
from typing import Any, Sequence

import numpy as np

from daug_jax.data import pipeline
from daug_jax.data.registry import NO_FINDING
from daug_jax.evaluate import embed
from daug_jax.files import save_figure
from daug_jax.tower_inputs import uses_reports
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


def retrieval_example(path: str, workdir: str, source: Any, *, class_names: Sequence[str],
                      num_queries: int = 3, top_k: int = 4, heatmaps: Any = None,
                      member: str | None = None) -> None:
    """For a few films of ``source`` (the evaluation split, streamed once to embed it): the
    query, its top-k most similar films and, where the towers learnt reports, the top report.

    class_names: the label columns of ``source``; heatmaps: its heatmap dataset, for DAug
    towers; member: which towers of a population.
    """
    towers = load_towers(workdir, member)
    config = towers.config
    reports = uses_reports(config)
    emb = embed(towers, source, class_names=class_names, heatmaps=heatmaps, reports=reports)
    img, labels, names = emb["image_emb"], emb["labels"], list(config.model.class_names)
    findings = [c for c, n in enumerate(names) if n != NO_FINDING]
    # Queries: films with a finding, so that there is something to retrieve.
    queries = [i for i in range(len(img)) if labels[i, findings].max() == 1][:num_queries]
    ranked = {q: np.argsort(-np.where(np.arange(len(img)) == q, -np.inf, img @ img[q]),
                            kind="stable")[:top_k] for q in queries}
    best = {q: int(np.argmax(emb["text_emb"] @ img[q])) for q in queries} if reports else {}
    shown = sorted({int(i) for q in queries for i in (q, *ranked[q], *best.values())})
    films = pipeline.read(source, shown)
    film = {i: j for j, i in enumerate(shown)}

    def tag(i):
        return ", ".join(n for n, v in zip(names, labels[i]) if v == 1) or "no label"

    plt = _pyplot()
    cols = top_k + 1 + int(reports)
    fig, axes = plt.subplots(len(queries), cols, figsize=(2.1 * cols + 2.5 * reports,
                                                          2.5 * len(queries)), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * (top_k + 1) + [2.4] * reports})
    for row, q in enumerate(queries):
        for col, i in enumerate([q, *ranked[q]]):
            ax = axes[row, col]
            ax.imshow(pipeline.to_unit_float(films["image"][film[i]])[..., 0], cmap="gray",
                      vmin=0, vmax=1)
            ax.set_title(("query: " if col == 0 else f"#{col}: ") + tag(i), fontsize=6)
            ax.axis("off")
        if reports:
            b = best[q]
            verdict = "its own report" if b == q else f"report of film {b} ({tag(b)})"
            axes[row, -1].text(0, 1, f"top report ({verdict}):\n" + textwrap.fill(
                str(films["report"][film[b]]), 48), fontsize=6, va="top", family="monospace")
            axes[row, -1].axis("off")
    fig.suptitle(f"Retrieval with the {config.model.vision.fill} / clip_weight="
                 f"{config.train.clip_weight} towers", fontsize=9)
    save_figure(fig, path, bbox_inches="tight")


def heatmap_channels(path: str, source: Any, heatmaps: Any, class_names: Sequence[str],
                     num_films: int = 6) -> None:
    """PNG: the first films of ``source`` with a finding (else the first films) above their
    stored DAug channels (``heatmaps``: the split's heatmap dataset), as the towers read them."""
    names, targets = list(class_names), heatmaps.metadata["targets"]
    findings = [c for c, n in enumerate(names) if n != NO_FINDING]
    head = pipeline.read(source, range(min(len(source), 256)))
    with_finding = np.flatnonzero((head["labels"][:, findings] == 1).any(axis=1))
    # Each film once: those with a finding first, then the first films.
    rows = list(dict.fromkeys([*with_finding.tolist(), *range(len(head["labels"]))]))[:num_films]
    maps = pipeline.read(heatmaps, rows)["heatmaps"]
    plt = _pyplot()
    fig, axes = plt.subplots(1 + len(targets), len(rows), figsize=(1.6 * len(rows),
                                                                   1.7 * (1 + len(targets))),
                             squeeze=False)
    for col, i in enumerate(rows):
        found = ", ".join(n for c, n in enumerate(names) if head["labels"][i, c] == 1)
        axes[0, col].imshow(pipeline.to_unit_float(head["image"][i])[..., 0], cmap="gray",
                            vmin=0, vmax=1)
        axes[0, col].set_title(textwrap.fill(found or "no label", 24), fontsize=6)
        for k, target in enumerate(targets):
            axes[1 + k, col].imshow(maps[col, ..., k], cmap="magma", vmin=0, vmax=1)
            axes[1 + k, col].set_title(f"h: {target}", fontsize=6)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


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
