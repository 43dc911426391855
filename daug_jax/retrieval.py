"""Retrieval metrics: Recall@k, Precision@k, the class-based AP@k of the authors' evaluation and
their chance levels, plus the input checks every metric in `daug_jax.metrics` shares.

NumPy in, Python floats (or small NumPy arrays) out, so results drop straight into JSON.
`daug_jax.metrics` re-exports every public name; callers use ``metrics.<name>``.

* A similarity matrix ``[Q, G]`` has queries as rows and gallery items as columns.
* Ties are broken so that results are deterministic and do not depend on sort internals:
  Recall@k counts only *strictly* greater scores against the true match (a tie with it is a
  hit); Precision@k ranks equal scores by gallery index, lower first.
* Labels follow CheXpert: 1 positive, 0 negative; anything else only where masked out.
* Class-based AP@k (the authors' retrieval score, `class_map_at_k`; `ClassMapAccumulator` for
  query blocks) ranks equal scores by gallery index, lower first, like Precision@k.
* Chance levels are each metric's expectation under random embeddings.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import hypergeom

MAP_KS = (1, 3, 5, 10)  # the authors' K of class-based AP@K
RECALL_KS = (1, 5, 10)


# ----------------------------------------------------------------------------- input checks
# Shared with `daug_jax.metrics`, which imports from this module (never the other way round).


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


def _class_means(values: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """(mean, weights-weighted mean) of per-class values [C] over classes with a value and weight."""
    if not (ok := ~np.isnan(values) & (weights > 0)).any():
        return float("nan"), float("nan")
    return float(values[ok].mean()), float((weights[ok] * values[ok]).sum() / weights[ok].sum())


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


# ----------------------------------------------------------------------------- class-based retrieval


def _top_k(sim: np.ndarray, k: int, block: int = 64) -> np.ndarray:
    """[q, G] -> [q, k] gallery indices: the first k of a stable sort of -sim, without one.  The
    top k lie in the k ``block``-column blocks of highest maxima (or the tail); rows whose k-th
    score recurs outside their top k (ties, rare for real scores) get the full stable sort."""
    q, g = sim.shape
    if k * block >= g:
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]
    nb = g // block
    maxima = np.maximum.reduceat(sim[:, :nb * block], np.arange(0, nb * block, block), axis=1)
    best = np.argpartition(-maxima, k - 1, axis=1)[:, :k]  # [q, k] blocks
    cand = np.concatenate([(best[:, :, None] * block + np.arange(block)).reshape(q, -1),
                           np.broadcast_to(np.arange(nb * block, g), (q, g - nb * block))], axis=1)
    vals = np.take_along_axis(sim, cand, axis=1)
    order = np.lexsort((cand, -vals), axis=1)[:, :k]
    top = np.take_along_axis(cand, order, axis=1)
    tied = np.count_nonzero(sim >= np.take_along_axis(vals, order[:, -1:], axis=1), axis=1) > k
    if tied.any():
        top[tied] = np.argsort(-sim[tied], axis=1, kind="stable")[:, :k]
    return top


def _block(similarity, query_labels, gallery_shape: tuple[int, int]):
    """Validated (similarity [q, G] float, query positives [q, C] bool) of one query block."""
    sim, ql, (g, c) = np.asarray(similarity), np.asarray(query_labels), gallery_shape
    if sim.ndim != 2 or ql.ndim != 2 or sim.shape != (ql.shape[0], g) or ql.shape[1] != c:
        raise ValueError(f"similarity {sim.shape} and query_labels {ql.shape} must be [q, {g}] and "
                         f"[q, {c}] for gallery_labels [{g}, {c}]")
    if sim.size and np.isnan(sim.max()):  # max propagates NaN: one fast pass
        raise ValueError(f"similarity {sim.shape} has NaN at {tuple(np.argwhere(np.isnan(sim))[0])}")
    return (sim if sim.dtype.kind == "f" else sim.astype(np.float64)), ql == 1


def class_map_sums(similarity, query_labels, gallery_labels, ks: Sequence[int] = MAP_KS):
    """Per-class sums of AP@k (`class_map_at_k`) over one query block, every k from one top-k.

    similarity [q, G]; query_labels [q, C]; gallery_labels [G, C] (1 = positive).  Returns (sums
    [len(ks), C] float64: Σ of AP@k(q, c) over queries positive for c; counts [C] int64: those
    queries).  Both add over blocks; `class_map_finalize` turns them into AP / mAP / wmAP."""
    gl = _array(gallery_labels, "gallery_labels", 2, dtype=None)
    sim, qpos = _block(similarity, query_labels, gl.shape)
    if not (ks := [int(k) for k in ks]) or min(ks) < 1 or max(ks) > gl.shape[0]:
        raise ValueError(f"every k must be in [1, {gl.shape[0]}] (the gallery size), got {ks}")
    top = _top_k(sim, max(ks))  # [q, K]
    rel = (gl == 1)[top]  # [q, K, C]: is the item at rank r positive for c
    hits = rel.cumsum(axis=1)  # [q, K, C]: n, the number of positives so far
    precision = np.where(rel, hits / np.arange(1, top.shape[1] + 1)[None, :, None], 0.0)
    sums = np.empty((len(ks), gl.shape[1]))
    for i, k in enumerate(ks):
        ap = precision[:, :k].sum(axis=1) / np.maximum(hits[:, k - 1], 1)  # [q, C]; 0 if m = 0
        sums[i] = (ap * qpos).sum(axis=0)
    return sums, qpos.sum(axis=0).astype(np.int64)


def class_map_finalize(sums, counts) -> dict:
    """`class_map_at_k`'s dict from one row of `class_map_sums` (sums [C]) and its counts [C]."""
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    ap = np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)
    mean, weighted = _class_means(ap, counts)
    return {"AP": ap, "mAP": mean, "wmAP": weighted}


def class_map_at_k(similarity, query_labels, gallery_labels, k: int) -> dict:
    """Class-based AP@k of the authors' retrieval evaluation.

    similarity [Q, G]; query_labels [Q, C]; gallery_labels [G, C] (1 = positive).  The gallery
    is ranked by similarity, descending, ties to the lower index.  For a query q positive for c,
    with r_1 < ... < r_m the ranks (1 = top) within the first k of gallery items positive for c:
    AP@k(q, c) = (1/m) Σ_n n / r_n, 0 when m = 0.  Returns {"AP": [C] float64, the mean over
    queries positive for c (NaN when none), "mAP": mean of the defined AP_c, "wmAP": their mean
    weighted by the number of queries positive for c}."""
    sums, counts = class_map_sums(similarity, query_labels, gallery_labels, (k,))
    return class_map_finalize(sums[0], counts)


class ClassMapAccumulator:
    """`class_map_at_k` for every k in ``ks`` from query blocks, never holding [Q, G]:
    ``acc = ClassMapAccumulator(gallery_labels [G, C])``; ``acc.update(sim [q, G], labels [q, C])``
    per block; ``acc.finalize()`` -> {k: {"AP", "mAP", "wmAP"}} as class_map_at_k on all rows."""

    def __init__(self, gallery_labels, ks: Sequence[int] = MAP_KS):
        self.gallery_labels = _array(gallery_labels, "gallery_labels", 2, dtype=None)
        self.ks, n_classes = tuple(int(k) for k in ks), self.gallery_labels.shape[1]
        self.sums, self.counts = np.zeros((len(self.ks), n_classes)), np.zeros(n_classes, np.int64)

    def update(self, similarity, query_labels) -> None:
        """Adds one block: similarity [q, G] against the whole gallery, query_labels [q, C]."""
        sums, counts = class_map_sums(similarity, query_labels, self.gallery_labels, self.ks)
        self.sums, self.counts = self.sums + sums, self.counts + counts

    def finalize(self) -> dict[int, dict]:
        return {k: class_map_finalize(self.sums[i], self.counts) for i, k in enumerate(self.ks)}


# ----------------------------------------------------------------------------- chance levels


def _expected_ap_given_m(k: int) -> np.ndarray:
    """[k + 1]: E[AP@k | m positives in the top k, uniformly placed], m = 0 .. k (0 at m = 0).
    E[(1/m) Σ_r rel_r · hits_r / r] = (1/k) Σ_r (1 + (m − 1)(r − 1)/(k − 1)) / r, since
    P(rel_r) = m/k and E[hits_r | rel_r] = 1 + (m − 1)(r − 1)/(k − 1);  Σ_r (r − 1)/r = k − H_k."""
    m, harmonic = np.arange(k + 1), np.sum(1.0 / np.arange(1, k + 1))
    e = (harmonic + (m - 1) * (k - harmonic) / max(k - 1, 1)) / k  # k = 1: H = 1, e = 1
    return np.where(m > 0, e, 0.0)


def class_map_chance(gallery_labels, query_labels, k: int) -> dict:
    """{"mAP", "wmAP"} of `class_map_at_k` expected under a uniformly random gallery ranking.

    gallery_labels: [G, C]; query_labels: [Q, C] (1 = positive).  For class c with P_c gallery
    positives, m ~ Hypergeometric(G, P_c, k) of them fall in the top k; E[AP_c] = Σ_m P(m) ·
    `_expected_ap_given_m`.  Classes without positive queries are left out, as in the metric."""
    gl, ql = _array(gallery_labels, "gallery_labels", 2), _array(query_labels, "query_labels", 2)
    if gl.shape[1] != ql.shape[1]:
        raise ValueError(f"gallery_labels {gl.shape} and query_labels {ql.shape} differ in C")
    if not 1 <= k <= gl.shape[0]:
        raise ValueError(f"k must be in [1, {gl.shape[0]}] (the gallery size), got {k}")
    positives = (gl == 1).sum(axis=0)  # [C]
    pmf = hypergeom.pmf(np.arange(k + 1)[:, None], gl.shape[0], positives[None, :], k)  # [k+1, C]
    mean, weighted = _class_means(_expected_ap_given_m(k) @ pmf, (ql == 1).sum(axis=0))
    return {"mAP": mean, "wmAP": weighted}


def recall_chance(n: int, k: int) -> float:
    """Expected `recall_at_k` over a gallery of n columns under random scores: min(k, n) / n."""
    if min(n, k) < 1:
        raise ValueError(f"need n >= 1 and k >= 1, got n={n}, k={k}")
    return min(k, n) / n
