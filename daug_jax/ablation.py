"""Runs towers variants x seeds on the same data and tabulates mean +- std of every metric.

    results = run_ablation({"baseline": cfg_a, "daug": cfg_b}, seeds=(0, 1), train=..., test=...,
                           out_dir="runs/ablation")
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from daug_jax.evaluate import evaluate_towers
from daug_jax.files import write_json
from daug_jax.train import train_towers

METRIC_KEYS = ("macro_auroc", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5",
               "t2i_R@10", "i2i_P@10")


def _mean_std(values: list) -> dict:
    vals = np.array([np.nan if v is None else v for v in values], np.float64)
    ok = vals[~np.isnan(vals)]
    if not len(ok):
        return {"mean": None, "std": None}
    # One value has no spread to report (None), rather than a misleading 0.
    return {"mean": float(ok.mean()), "std": float(ok.std(ddof=1)) if len(ok) > 1 else None}


def aggregate(runs: list[dict]) -> dict:
    """Per-seed metric dicts -> the same keys as mean over seeds, plus ``"std"`` and ``"seeds"``."""
    out = {"per_seed": runs, "std": {}}
    for key in METRIC_KEYS:
        stats = _mean_std([r[key] for r in runs])
        out[key], out["std"][key] = stats["mean"], stats["std"]
    classes = runs[0]["per_class_auroc"]
    out["per_class_auroc"] = {c: _mean_std([r["per_class_auroc"][c] for r in runs])["mean"]
                              for c in classes}
    return out


def run_ablation(configs: dict[str, Any], seeds: Sequence[int], train: Any, test: Any,
                 out_dir: str, *, class_names: Sequence[str], heatmaps: dict | None = None,
                 history: dict | None = None) -> dict:
    """Trains (or resumes) each variant for each seed, evaluates on ``test``, aggregates.

    configs: variant name -> towers config; train/test: random-access splits with their label
    columns ``class_names``; heatmaps: {"train": ..., "test": ...} heatmap datasets, read by the
    variants that fill their channels with them.  Each run lives in ``out_dir/<variant>/seed<k>``, and
    its metrics in ``metrics.json`` there, so a rerun skips finished runs.  ``history``, when
    given, receives each run's training log.  Returns {variant: aggregate(...)}.
    """
    results = {}
    for name, config in configs.items():
        runs = []
        for seed in seeds:
            workdir = os.path.join(out_dir, name, f"seed{seed}")
            done = os.path.join(workdir, "eval.json")
            if not os.path.exists(done):
                run_config = config.copy_and_resolve_references()
                run_config.train.seed = int(seed)
                print(f"ablation: {name}, seed {seed}")
                maps = heatmaps or {}
                train_towers(run_config, train, workdir, class_names=class_names,
                             heatmaps=maps.get("train"))
                write_json(done, evaluate_towers(workdir, test, class_names=class_names,
                                                 heatmaps=maps.get("test")))
            with open(done) as f:
                runs.append(json.load(f))
            if history is not None:
                with open(os.path.join(workdir, "metrics.jsonl")) as f:
                    history.setdefault(name, []).append([json.loads(line) for line in f])
        results[name] = aggregate(runs)
    return results


def markdown_table(results: dict) -> str:
    """Variants x metrics as a Markdown table of ``mean ± std`` (the mean alone for one seed)."""
    head = "| variant | " + " | ".join(METRIC_KEYS) + " |"
    rows = [head, "|" + " --- |" * (len(METRIC_KEYS) + 1)]
    for name, r in results.items():
        cells = []
        for key in METRIC_KEYS:
            mean, std = r[key], r["std"][key]
            cells.append("n/a" if mean is None else f"{mean:.3f}" if std is None
                         else f"{mean:.3f} ± {std:.3f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
