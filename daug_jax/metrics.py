"""Evaluation metrics: cross-modal retrieval (Recall@k, the class-based AP@k of the authors'
evaluation), classification (zero-shot scores, per-class AUROC), the chance level of
every reported metric (its expectation under random embeddings), and the pointing game of
heatmap localisation.  NumPy in, Python floats (or small NumPy arrays) out, ready for JSON.

* A similarity matrix ``[Q, G]`` has queries as rows and gallery items as columns.
* Ties are broken so that results are deterministic and do not depend on sort internals:
  Recall@k counts only *strictly* greater scores against the true match (a tie with it is a
  hit); class-based AP@k ranks equal scores by gallery index, lower first.
* Labels follow CheXpert: 1 positive, 0 negative; anything else only where masked out.

Summaries with honest uncertainty (the ablation's seeds, a pointing game's films): mean ± sample
std, and paired differences with a 95 % interval, Student's t on the differences, mean ±
t(0.975, n − 1) · s / √n (with three seeds t = 4.30: only an effect consistent across seeds
excludes 0).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import hypergeom
from scipy.stats import t as student_t
from sklearn.metrics import roc_auc_score

from daug_jax.losses import class_logits

MAP_KS = (1, 3, 5, 10)  # the authors' K of class-based AP@K
RECALL_KS = (1, 5, 10)


# ----------------------------------------------------------------------------- input checks
def _array(x, name: str, ndim: int, dtype=np.float64) -> np.ndarray:
    x = np.asarray(x, dtype=dtype)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return x


def _same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} has shape {b.shape}, expected {a.shape} like {name_a}")


def _class_means(values: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """(mean, weighted mean) of per-class values [C] over the classes with a value and weight."""
    if not (ok := ~np.isnan(values) & (weights > 0)).any():
        return float("nan"), float("nan")
    return float(values[ok].mean()), float((weights[ok] * values[ok]).sum() / weights[ok].sum())


# ----------------------------------------------------------------------------- retrieval
def recall_at_k(similarity, k: int) -> float:
    """Fraction of queries whose true match ranks in the top k (fewer than k entries of row i
    strictly greater than similarity[i, i]).  similarity: [Q, G], G >= Q, match of query i in
    column i."""
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


# ---------------------------------------------------------------------------- class-based retrieval
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
        raise ValueError(f"similarity {sim.shape} has NaN at "
                         f"{tuple(np.argwhere(np.isnan(sim))[0])}")
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

    similarity [Q, G]; query_labels [Q, C]; gallery_labels [G, C] (1 = positive).  For a query
    q positive for c, with r_1 < ... < r_m the ranks (1 = top) within the first k of gallery
    items positive for c: AP@k(q, c) = (1/m) Σ_n n / r_n, 0 when m = 0.  Returns {"AP": [C]
    float64, the mean over queries positive for c (NaN when none), "mAP": mean of the defined
    AP_c, "wmAP": their mean weighted by the number of queries positive for c}."""
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


# ----------------------------------------------------------------------------- classification
def zero_shot_scores(image_emb, class_emb, scale: float = 1.0, bias: float = 0.0,
                     form: str = "single") -> np.ndarray:
    """Class logits [N, C] float64, the training-time logits of the class loss
    (`losses.class_logits`): the text tower as a ready-made linear classifier.
    image_emb: [N, D]; class_emb: [C, D] (form "single") or [2C, D] (form "paired")."""
    img, cls = _array(image_emb, "image_emb", 2), _array(class_emb, "class_emb", 2)
    if img.shape[1] != cls.shape[1]:
        raise ValueError(f"class_emb has width {cls.shape[1]}, expected {img.shape[1]} like "
                         f"image_emb")
    return class_logits(img, cls, float(scale), float(bias), form)


def auroc(scores, labels, mask=None) -> np.ndarray:
    """Per-class area under the ROC curve: [C] float64, NaN for a class that lacks positives or
    negatives among its counted entries.  scores: [N, C]; labels: [N, C] with 0/1 where
    counted; mask: optional [N, C], 1 = counted (default: every entry)."""
    scores, labels = _array(scores, "scores", 2), _array(labels, "labels", 2)
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
    return _class_means(per_class, np.ones_like(per_class))[0]


def weighted_auroc(scores, labels, mask=None) -> float:
    """Per-class AUROCs weighted by each class's positives among its counted entries
    (scikit-learn's ``average="weighted"``); classes without both outcomes are left out.
    scores, labels, mask: [N, C] as in `auroc`.  NaN when no class has both outcomes."""
    per_class, labels = auroc(scores, labels, mask), np.asarray(labels)
    counted = np.ones(labels.shape, bool) if mask is None else np.asarray(mask) > 0
    return _class_means(per_class, ((labels == 1) & counted).sum(axis=0))[1]


def classification_metrics(scores, labels, mask, class_names: Sequence[str]) -> dict:
    """{"macro_auroc": float | None, "per_class_auroc": {name: float | None}}, None where the
    AUROC is undefined (JSON has no NaN).  scores, labels, mask: [N, C] (mask may be None);
    class_names: C names in column order."""
    scores = _array(scores, "scores", 2)
    if len(class_names) != scores.shape[1]:
        raise ValueError(f"got {len(class_names)} class names for {scores.shape[1]} score columns")
    per_class = auroc(scores, labels, mask)
    as_json = lambda v: None if np.isnan(v) else float(v)  # noqa: E731
    return {"macro_auroc": as_json(_class_means(per_class, np.ones_like(per_class))[0]),
            "per_class_auroc": {name: as_json(v) for name, v in zip(class_names, per_class)}}


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
    heatmaps: [N, H, W] non-negative; regions: [N, H, W] bool.  An empty region, a non-finite or
    a negative map raises ValueError naming the index."""
    heat, regions = _array(heatmaps, "heatmaps", 3), np.asarray(regions)
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
    """How well heatmaps [N, H, W] (non-negative) point at regions [N, H, W] (bool, True inside
    the finding): {"pointing_game": the hit rate of `pointing_hits`, "chance": mean region area
    fraction (the hit rate of a uniformly random point), "energy_inside": mean fraction of
    heatmap mass inside the region (an all-zero map puts none inside), "n": N}."""
    hits = pointing_hits(heatmaps, regions)
    n = len(hits)
    flat_heat = np.asarray(heatmaps, np.float64).reshape(n, -1)
    flat_region = np.asarray(regions).reshape(n, -1)
    mass = flat_heat.sum(axis=1)
    inside = (flat_heat * flat_region).sum(axis=1)
    energy = np.divide(inside, mass, out=np.zeros(n), where=mass > 0)
    return {"pointing_game": float(hits.mean()), "chance": float(flat_region.mean(axis=1).mean()),
            "energy_inside": float(energy.mean()), "n": int(n)}


# ---------------------------------------------------------------------------- summaries over seeds
def _values(values: Sequence[float | None], name: str) -> np.ndarray:
    arr = np.asarray([np.nan if v is None else v for v in values], np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence, got shape {arr.shape}")
    return arr


def mean_std(values: Sequence[float | None]) -> dict:
    """{"mean", "std" (sample, ddof 1; None for a single value), "per_seed"}; None entries
    (an undefined metric in one run) are left out of mean and std but kept in per_seed."""
    arr = _values(values, "values")
    ok = arr[~np.isnan(arr)]
    per_seed = [None if np.isnan(v) else float(v) for v in arr]
    if not len(ok):
        return {"mean": None, "std": None, "per_seed": per_seed}
    return {"mean": float(ok.mean()), "std": float(ok.std(ddof=1)) if len(ok) > 1 else None,
            "per_seed": per_seed}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of a − b over pairs and its 95 % t-interval: {"mean", "ci95": [low, high], "n"}.
    a, b: [n] paired measurements (the same seed, or the same film, under two conditions); pairs
    where either is undefined (None / NaN) are dropped.  With fewer than 2 pairs the interval is
    None; with identical differences it has zero width."""
    a, b = _values(a, "a"), _values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same length, got {a.shape} and {b.shape}")
    diff = (a - b)[~(np.isnan(a) | np.isnan(b))]
    n = len(diff)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(diff.mean())
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    half = float(student_t.ppf(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def excludes_zero(effect: dict) -> bool:
    """Whether an effect's 95 % interval lies wholly on one side of 0 (resolved)."""
    ci = effect.get("ci95")
    return ci is not None and (ci[0] > 0 or ci[1] < 0)
