"""PNG figures of the demo: training curves of the ablation and a retrieval example."""

from __future__ import annotations

from typing import Any

import textwrap

import numpy as np

from daug_jax.files import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(path: str, history: dict[str, list[list[dict]]]) -> None:
    """Both loss parts vs step, one line per variant (first seed).

    history: variant (e.g. "retrieval/daug") -> per seed -> logged rows {"step", "image_text", "image_class", ...}.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, runs in history.items():
        rows = runs[0]
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes, ("image_text", "image_class")):
            ax.plot(steps, [r[key] for r in rows], label=name)
    for ax, title in zip(axes, ("image-text (CLIP) loss", "image-class (sigmoid) loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].text(0.02, 0.02, "CLIP-only (w = 1) variants: logged, not optimised", fontsize=7,
                 transform=axes[1].transAxes)
    axes[0].text(0.02, 0.02, "class-only (w = 0) variants: logged, not optimised", fontsize=7,
                 transform=axes[0].transAxes)
    axes[1].legend(fontsize=6)
    save_figure(fig, path, bbox_inches="tight")


def retrieval_example(path: str, workdir: str, test: dict, num_queries: int = 3,
                      top_k: int = 4, *, heatmaps: Any = None, member: str | None = None) -> None:
    """For a few test films: the query, its top-k most similar films and the top report.

    test: the (small, in-memory) test films as arrays with "image", "labels", "report", "id";
    heatmaps: their heatmap dataset, for DAug towers; member: which towers of a population.
    """
    from daug_jax.data.pipeline import ArraySource
    from daug_jax.data.synthetic import CLASS_NAMES
    from daug_jax.evaluate import embed
    from daug_jax.train import load_towers

    model, variables, tokenizer, config = load_towers(workdir, member)
    source = ArraySource({k: test[k] for k in ("image", "labels", "report", "id")})
    emb = embed(model, variables, tokenizer, config, source, class_names=CLASS_NAMES,
                heatmaps=heatmaps)
    img, txt = emb["image_emb"], emb["text_emb"]
    names = list(config.model.class_names)
    labels = np.asarray(test["labels"])
    # Queries: films with at least one finding, so that there is something to retrieve.
    queries = [i for i in range(len(img)) if labels[i, 1:].max() == 1][:num_queries]

    def tag(i):
        found = [n for n, v in zip(names, labels[i]) if v == 1]
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
