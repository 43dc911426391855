"""Evaluation metrics: cross-modal retrieval, per-class AUROC and heatmap localisation.

NumPy in, Python floats (or small NumPy arrays) out, so results drop straight into JSON.
Labels follow CheXpert: 1 positive, 0 negative; anything else only where masked out.

The retrieval metrics (Recall@k, Precision@k, class-based AP@k and their chance levels) are in
`daug_jax.retrieval`, with their conventions for similarity matrices and ties, and re-exported
here.  This module holds classification (zero-shot scores, AUROC), `chance_levels` of every
reported metric and the pointing game.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from daug_jax.losses import class_logits
from daug_jax.retrieval import (  # noqa: F401  (re-exported: callers use metrics.<name>)
    MAP_KS, RECALL_KS, ClassMapAccumulator, _array, _class_means, _same_shape, _top_k,
    class_map_at_k, class_map_chance, class_map_finalize, class_map_sums, precision_at_k,
    recall_at_k, recall_chance, retrieval_metrics)


# ----------------------------------------------------------------------------- classification


def zero_shot_scores(image_emb, class_emb, scale: float = 1.0, bias: float = 0.0,
                     form: str = "single") -> np.ndarray:
    """Class logits [N, C] float64 from class-prompt embeddings, the training-time logits of the
    class loss (`losses.class_logits`): the text tower as a ready-made linear classifier.

    image_emb: [N, D]; class_emb: [C, D] (form "single": ``scale · cos + bias``) or [2C, D]
    (form "paired", absent rows then present rows: ``scale · (cos_present − cos_absent)``)."""
    img, cls = _array(image_emb, "image_emb", 2), _array(class_emb, "class_emb", 2)
    if img.shape[1] != cls.shape[1]:
        raise ValueError(f"class_emb has width {cls.shape[1]}, expected {img.shape[1]} like image_emb")
    return class_logits(img, cls, float(scale), float(bias), form)


def class_probabilities(image_emb, class_emb, scale: float = 1.0, bias: float = 0.0,
                        form: str = "single") -> np.ndarray:
    """P(class present) [N, C] = sigmoid(`zero_shot_scores`); for "paired", the pair softmax."""
    return expit(zero_shot_scores(image_emb, class_emb, scale, bias, form))


def auroc(scores, labels, mask=None) -> np.ndarray:
    """Per-class area under the ROC curve.

    scores: [N, C]; labels: [N, C] with 0/1 where counted; mask: optional [N, C], 1 = counted
    (default: every entry).  Returns [C] float64, NaN for a class that lacks positives or
    negatives among its counted entries (AUROC is undefined there).
    """
    scores = _array(scores, "scores", 2)
    labels = _array(labels, "labels", 2)
    _same_shape(scores, labels, "scores", "labels")
    counted = np.ones(labels.shape, bool) if mask is None else _array(mask, "mask", 2) > 0
    _same_shape(scores, counted, "scores", "mask")
    bad = counted & (labels != 0) & (labels != 1)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"label at [{row}, {col}] is {labels[row, col]}; counted labels must be "
                         f"0 or 1 (mask the others out)")
    result = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        y = labels[counted[:, c], c]
        if 0 < y.sum() < len(y):
            result[c] = roc_auc_score(y, scores[counted[:, c], c])
    return result


def macro_auroc(scores, labels, mask=None) -> float:
    """Mean of the defined per-class AUROCs; NaN when no class has both outcomes."""
    per_class = auroc(scores, labels, mask)
    defined = per_class[~np.isnan(per_class)]
    return float(defined.mean()) if defined.size else float("nan")


def weighted_auroc(scores, labels, mask=None) -> float:
    """Per-class AUROCs weighted by each class's positives among its counted entries
    (scikit-learn's ``average="weighted"``); classes without both outcomes are left out.
    scores, labels, mask: [N, C] as in `auroc`.  NaN when no class has both outcomes."""
    per_class, labels = auroc(scores, labels, mask), np.asarray(labels)
    counted = np.ones(labels.shape, bool) if mask is None else np.asarray(mask) > 0
    return _class_means(per_class, ((labels == 1) & counted).sum(axis=0))[1]


def classification_metrics(scores, labels, mask, class_names: Sequence[str]) -> dict:
    """Per-class and macro AUROC, JSON-ready.

    scores, labels, mask: [N, C] (mask may be None); class_names: C names in column order.
    Returns {"macro_auroc": float | None, "per_class_auroc": {name: float | None}}, None where
    the AUROC is undefined (JSON has no NaN).
    """
    scores = _array(scores, "scores", 2)
    if len(class_names) != scores.shape[1]:
        raise ValueError(f"got {len(class_names)} class names for {scores.shape[1]} score columns")
    per_class = auroc(scores, labels, mask)
    defined = per_class[~np.isnan(per_class)]
    as_json = lambda v: None if np.isnan(v) else float(v)  # noqa: E731
    return {
        "macro_auroc": float(defined.mean()) if defined.size else None,
        "per_class_auroc": {name: as_json(v) for name, v in zip(class_names, per_class)},
    }


# ----------------------------------------------------------------------------- chance levels


def chance_levels(query_labels, gallery_labels, n_pairs: int | None = None) -> dict[str, float]:
    """Chance level of every reported metric, keyed by its name: {"{x2x,r2x,x2r}_{mAP,wmAP}@K"
    (K = 1, 3, 5, 10), "{i2t,t2i}_R@K" (K = 1, 5, 10), "macro_auroc": 0.5, "weighted_auroc": 0.5}.

    query_labels [Q, C], gallery_labels [G, C] (1 = positive); a gallery's reports carry its
    images' labels, so x2x, r2x and x2r share one chance.  n_pairs: the gallery size of
    exact-report Recall@K (default Q: the query split's image-report pairs)."""
    out = {"macro_auroc": 0.5, "weighted_auroc": 0.5}
    for k in MAP_KS:
        chance = class_map_chance(gallery_labels, query_labels, k)
        for direction in ("x2x", "r2x", "x2r"):
            out.update({f"{direction}_{name}@{k}": chance[name] for name in ("mAP", "wmAP")})
    n = np.asarray(query_labels).shape[0] if n_pairs is None else int(n_pairs)
    for k in RECALL_KS:
        out[f"i2t_R@{k}"] = out[f"t2i_R@{k}"] = recall_chance(n, k)
    return {key: out[key] for key in sorted(out)}


# ----------------------------------------------------------------------------- localisation


def pointing_hits(heatmaps, regions) -> np.ndarray:
    """[N] bool: whether each map's (first, row-major) maximum lies inside its region.

    heatmaps: [N, H, W] non-negative; regions: [N, H, W] bool.  An empty region makes the hit
    undefined: ValueError naming the index (as for a non-finite or negative map).
    """
    heat = _array(heatmaps, "heatmaps", 3)
    regions = np.asarray(regions)
    if regions.dtype != bool:
        raise ValueError(f"regions must be bool, got {regions.dtype}")
    _same_shape(heat, regions, "heatmaps", "regions")
    n = heat.shape[0]
    if n == 0:
        raise ValueError("pointing_game needs at least one heatmap")
    flat_heat, flat_region = heat.reshape(n, -1), regions.reshape(n, -1)
    for name, bad in (("empty region", ~flat_region.any(axis=1)),
                      ("non-finite heatmap", ~np.isfinite(flat_heat).all(axis=1)),
                      ("negative heatmap", (flat_heat < 0).any(axis=1))):
        if bad.any():
            raise ValueError(f"{name} at index {int(np.argmax(bad))}")
    return flat_region[np.arange(n), flat_heat.argmax(axis=1)]


def pointing_game(heatmaps, regions) -> dict:
    """How well heatmaps point at the annotated finding.

    heatmaps: [N, H, W] non-negative; regions: [N, H, W] bool, True inside the finding.
    Returns {"pointing_game": fraction of maps whose (first) maximum lies inside the region
    (`pointing_hits`), "chance": mean region area fraction (the hit rate of a uniformly random
    point), "energy_inside": mean fraction of heatmap mass inside the region (an all-zero map
    puts none inside), "n": N}.
    """
    hits = pointing_hits(heatmaps, regions)
    n = len(hits)
    flat_heat = np.asarray(heatmaps, np.float64).reshape(n, -1)
    flat_region = np.asarray(regions).reshape(n, -1)
    mass = flat_heat.sum(axis=1)
    inside = (flat_heat * flat_region).sum(axis=1)
    energy = np.divide(inside, mass, out=np.zeros(n), where=mass > 0)
    return {"pointing_game": float(hits.mean()), "chance": float(flat_region.mean(axis=1).mean()),
            "energy_inside": float(energy.mean()), "n": int(n)}
