"""Evaluation metrics: cross-modal retrieval, per-class AUROC and heatmap localisation.

NumPy in, Python floats (or small NumPy arrays) out, so results drop straight into JSON.
Conventions shared by every function:

* A similarity matrix ``[Q, G]`` has queries as rows and gallery items as columns.
* Ties are broken so that results are deterministic and do not depend on sort internals:
  Recall@k counts only *strictly* greater scores against the true match (a tie with it is a
  hit); Precision@k ranks equal scores by gallery index, lower first.
* Labels follow CheXpert: 1 positive, 0 negative; anything else only where masked out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def _array(x, name: str, ndim: int, dtype=np.float64) -> np.ndarray:
    x = np.asarray(x, dtype=dtype)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return x


def _same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} has shape {b.shape}, expected {a.shape} like {name_a}")


def _normalise(x: np.ndarray, name: str) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norm == 0):
        raise ValueError(f"{name} row {int(np.argmax(norm[:, 0] == 0))} is all zeros")
    return x / norm


# ----------------------------------------------------------------------------- retrieval


def recall_at_k(similarity, k: int) -> float:
    """Fraction of queries whose true match ranks in the top k.

    similarity: [Q, G] with G >= Q; the true match of query i is gallery column i.
    A hit when fewer than k entries of row i are strictly greater than similarity[i, i].
    """
    sim = _array(similarity, "similarity", 2)
    q, g = sim.shape
    if g < q:
        raise ValueError(f"similarity is {sim.shape}: need at least as many gallery columns as "
                         f"queries, since the match of query i is column i")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    diag = sim[np.arange(q), np.arange(q)]
    n_better = (sim > diag[:, None]).sum(axis=1)
    return float(np.mean(n_better < k))


def precision_at_k(similarity, query_labels, gallery_labels, k: int, *,
                   exclude_self: bool = False) -> float:
    """Mean over queries of (relevant items among the top k) / k.

    similarity: [Q, G]; query_labels: [Q, C]; gallery_labels: [G, C] (1 = positive).
    A gallery item is relevant when it shares at least one positive class with the query.
    Top k by similarity, ties broken by lower gallery index.  exclude_self (query set ==
    gallery set, Q == G): query i's own item (column i) is removed from its gallery first.
    """
    sim = _array(similarity, "similarity", 2)
    ql = _array(query_labels, "query_labels", 2)
    gl = _array(gallery_labels, "gallery_labels", 2)
    q, g = sim.shape
    if ql.shape[0] != q:
        raise ValueError(f"query_labels has {ql.shape[0]} rows, expected {q} (similarity rows)")
    if gl.shape[0] != g:
        raise ValueError(f"gallery_labels has {gl.shape[0]} rows, expected {g} (similarity columns)")
    if ql.shape[1] != gl.shape[1]:
        raise ValueError(f"query_labels has {ql.shape[1]} classes, gallery_labels {gl.shape[1]}")
    if exclude_self and q != g:
        raise ValueError(f"exclude_self needs the query set to be the gallery, got similarity {sim.shape}")
    available = g - 1 if exclude_self else g
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}] for a gallery of {available} items, got {k}")

    order = np.argsort(-sim, axis=1, kind="stable")  # [Q, G]; stable keeps lower index first on ties
    if exclude_self:
        keep = order != np.arange(q)[:, None]
        order = order[keep].reshape(q, g - 1)
    top = order[:, :k]  # [Q, k]
    relevant = ((ql == 1).astype(np.int64) @ (gl == 1).T.astype(np.int64)) > 0  # [Q, G]
    hits = np.take_along_axis(relevant, top, axis=1)
    return float(hits.mean())


def retrieval_metrics(image_emb, text_emb, labels) -> dict[str, float]:
    """Image<->report and image->image retrieval on paired embeddings (cosine similarity).

    image_emb, text_emb: [N, D] (row i of each is the same study); labels: [N, C] {-1, 0, 1}.
    Returns {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "i2i_P@10"};
    i2i_P@10 searches the other N - 1 images (the query is excluded), so N must be >= 11.
    """
    img = _normalise(_array(image_emb, "image_emb", 2), "image_emb")
    txt = _normalise(_array(text_emb, "text_emb", 2), "text_emb")
    _same_shape(img, txt, "image_emb", "text_emb")
    labels = _array(labels, "labels", 2)
    if labels.shape[0] != img.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} rows, expected {img.shape[0]} (embeddings)")
    sim = img @ txt.T  # [N, N]: images as rows, reports as columns
    out = {}
    for k in (1, 5, 10):
        out[f"i2t_R@{k}"] = recall_at_k(sim, k)
        out[f"t2i_R@{k}"] = recall_at_k(sim.T, k)
    out["i2i_P@10"] = precision_at_k(img @ img.T, labels, labels, 10, exclude_self=True)
    return {key: out[key] for key in sorted(out)}


# ----------------------------------------------------------------------------- classification


def zero_shot_scores(image_emb, class_emb, scale: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """Class logits from class-prompt embeddings: the text tower as a ready-made linear classifier.

    image_emb: [N, D], class_emb: [C, D] (L2-normalised).  Returns [N, C] float64
    ``scale · image_emb @ class_embᵀ + bias`` (the training-time logits of the class loss).
    """
    img = _array(image_emb, "image_emb", 2)
    cls = _array(class_emb, "class_emb", 2)
    if img.shape[1] != cls.shape[1]:
        raise ValueError(f"class_emb has width {cls.shape[1]}, expected {img.shape[1]} like image_emb")
    return scale * img @ cls.T + bias


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


# ----------------------------------------------------------------------------- localisation


def pointing_game(heatmaps, regions) -> dict:
    """How well heatmaps point at the annotated finding.

    heatmaps: [N, H, W] non-negative; regions: [N, H, W] bool, True inside the finding.
    Returns {"pointing_game": fraction of maps whose (first) maximum lies inside the region,
    "chance": mean region area fraction (the hit rate of a uniformly random point),
    "energy_inside": mean fraction of heatmap mass inside the region (an all-zero map puts none
    inside), "n": N}.  An empty region makes the hit undefined: ValueError naming the index.
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

    peak = flat_heat.argmax(axis=1)  # argmax returns the first maximum in row-major order
    hits = flat_region[np.arange(n), peak]
    mass = flat_heat.sum(axis=1)
    inside = (flat_heat * flat_region).sum(axis=1)
    energy = np.divide(inside, mass, out=np.zeros(n), where=mass > 0)
    return {"pointing_game": float(hits.mean()), "chance": float(flat_region.mean(axis=1).mean()),
            "energy_inside": float(energy.mean()), "n": int(n)}
