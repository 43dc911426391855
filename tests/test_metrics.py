"""Retrieval, AUROC and pointing-game metrics on hand-worked cases and against scikit-learn."""

import itertools
import json

import numpy as np
from scipy.special import expit
import pytest
from sklearn.metrics import roc_auc_score

from daug_jax import metrics

# --------------------------------------------------------------------- recall


def test_recall_hand_worked_with_ties():
    sim = np.array([[0.5, 0.5, 0.1],   # tie with the match: not "greater", rank 1
                    [0.9, 0.2, 0.2],   # one strictly greater: rank 2
                    [0.3, 0.3, 0.3]])  # all tied: rank 1
    assert metrics.recall_at_k(sim, 1) == pytest.approx(2 / 3)
    assert metrics.recall_at_k(sim, 2) == 1.0
    # Transposed (text -> image): rows 0 and 1 now have a strictly greater entry, row 2 none.
    assert metrics.recall_at_k(sim.T, 1) == pytest.approx(1 / 3)


def test_recall_with_extra_gallery_columns():
    sim = np.array([[0.1, 0.9, 0.8],   # match 0.1 beaten by two distractors
                    [0.0, 0.5, 0.6]])  # match 0.5 beaten by the extra column
    assert metrics.recall_at_k(sim, 1) == 0.0
    assert metrics.recall_at_k(sim, 2) == 0.5
    assert metrics.recall_at_k(sim, 3) == 1.0


# --------------------------------------------------------------------- recall against loops


def _rank_of_match(row, i):
    """0-based rank of item i when ties with it are resolved in its favour (explicit loop)."""
    return sum(1 for j, s in enumerate(row) if s > row[i])


def test_recall_both_ways_against_explicit_loops():
    """Image->report and report->image Recall@k of noisy pairs (as `evaluate` scores them)."""
    rng = np.random.default_rng(0)
    n, d = 16, 5
    img = rng.normal(size=(n, d))
    txt = img + 0.8 * rng.normal(size=(n, d))  # noisy pairs: recalls strictly between 0 and 1
    u = img / np.linalg.norm(img, axis=1, keepdims=True)
    v = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sim = u @ v.T
    for k in metrics.RECALL_KS:
        i2t = np.mean([_rank_of_match(sim[i], i) < k for i in range(n)])
        t2i = np.mean([_rank_of_match(sim[:, i], i) < k for i in range(n)])
        assert metrics.recall_at_k(sim, k) == pytest.approx(i2t)
        assert metrics.recall_at_k(sim.T, k) == pytest.approx(t2i)
    assert 0 < metrics.recall_at_k(sim, 1) < 1
    assert metrics.recall_at_k(sim, 1) != metrics.recall_at_k(sim.T, 1)


# --------------------------------------------------------------------- AUROC


def _auroc_by_pairs(scores, y):
    """Mann-Whitney: P(score of a positive > score of a negative), ties counted half."""
    pos, neg = scores[y == 1], scores[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def test_auroc_matches_sklearn_and_pair_counting_with_mask():
    rng = np.random.default_rng(1)
    n, c = 60, 4
    labels = (rng.random((n, c)) < 0.4).astype(float)
    scores = np.round(labels + rng.normal(size=(n, c)), 1)  # rounding makes ties
    mask = (rng.random((n, c)) < 0.75).astype(float)
    labels[mask == 0] = -1  # uncertain labels, only legal where masked
    got = metrics.auroc(scores, labels, mask)
    for j in range(c):
        keep = mask[:, j] > 0
        np.testing.assert_allclose(got[j], roc_auc_score(labels[keep, j], scores[keep, j]))
        np.testing.assert_allclose(got[j], _auroc_by_pairs(scores[keep, j], labels[keep, j]))
    # Without a mask the -1 entries would be counted: a clear error instead.
    with pytest.raises(ValueError, match="counted labels must be 0 or 1"):
        metrics.auroc(scores, labels)


def test_auroc_nan_class_and_macro():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.7, 0.3, 0.5], [0.1, 0.6, 0.6]])
    labels = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1]])
    mask = np.ones_like(labels)
    mask[2, 1] = 0  # class 1 left with positives only -> undefined
    per_class = metrics.auroc(scores, labels, mask)
    assert per_class[0] == 1.0 and np.isnan(per_class[1])
    assert per_class[2] == pytest.approx(_auroc_by_pairs(scores[:, 2], labels[:, 2]))
    assert metrics.macro_auroc(scores, labels, mask) == pytest.approx((1.0 + per_class[2]) / 2)
    result = metrics.classification_metrics(scores, labels, mask, ["a", "b", "c"])
    assert result["per_class_auroc"] == {"a": 1.0, "b": None, "c": pytest.approx(per_class[2])}
    assert result["macro_auroc"] == pytest.approx((1.0 + per_class[2]) / 2)
    json.dumps(result)  # JSON-safe: no NaN
    none = metrics.classification_metrics(scores, np.ones_like(labels), None, ["a", "b", "c"])
    assert none == {"macro_auroc": None, "per_class_auroc": {"a": None, "b": None, "c": None}}


def test_zero_shot_scores():
    img = np.array([[1.0, 0.0], [0.6, 0.8]])
    cls = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    np.testing.assert_allclose(metrics.zero_shot_scores(img, cls, scale=10.0, bias=-5.0),
                               [[-5.0, 5.0, 1.0], [3.0, 1.0, 5.0]])


# --------------------------------------------------------------------- pointing game


def test_pointing_game_hand_made_4x4():
    heat = np.zeros((2, 4, 4))
    regions = np.zeros((2, 4, 4), bool)
    heat[0, 1, 2], heat[0, 3, 3] = 1.0, 0.5  # peak inside; 1.0 of 1.5 mass inside
    regions[0, 1:3, 1:3] = True  # 4 of 16 pixels
    heat[1, 0, 0], heat[1, 2, 2], heat[1, 2, 1] = 2.0, 2.0, 1.0  # tied peaks: the first, (0, 0), misses
    regions[1, 2:4, :] = True  # 8 of 16 pixels; 3.0 of 5.0 mass inside
    out = metrics.pointing_game(heat, regions)
    assert out == {"pointing_game": 0.5, "chance": pytest.approx((0.25 + 0.5) / 2),
                   "energy_inside": pytest.approx((1 / 1.5 + 3 / 5) / 2), "n": 2}
    # With the tie order reversed the second map hits.
    heat[1, 0, 0] = 1.9
    assert metrics.pointing_game(heat, regions)["pointing_game"] == 1.0


def test_pointing_game_bad_inputs():
    heat, regions = np.ones((3, 4, 4)), np.ones((3, 4, 4), bool)
    regions[1] = False
    with pytest.raises(ValueError, match="empty region at index 1"):
        metrics.pointing_game(heat, regions)
    regions[1] = True
    heat[2, 0, 0] = -1.0
    with pytest.raises(ValueError, match="negative heatmap at index 2"):
        metrics.pointing_game(heat, regions)
    with pytest.raises(ValueError, match=r"regions has shape \(3, 4, 5\), expected \(3, 4, 4\)"):
        metrics.pointing_game(np.ones((3, 4, 4)), np.ones((3, 4, 5), bool))
    with pytest.raises(ValueError, match="regions must be bool"):
        metrics.pointing_game(np.ones((3, 4, 4)), np.ones((3, 4, 4)))


# --------------------------------------------------------------------- shape errors


def test_shape_mismatches_raise_clear_errors():
    with pytest.raises(ValueError, match="similarity must have 2 dimensions"):
        metrics.recall_at_k(np.ones(3), 1)
    with pytest.raises(ValueError, match="at least as many gallery columns"):
        metrics.recall_at_k(np.ones((3, 2)), 1)
    with pytest.raises(ValueError, match="mask has shape"):
        metrics.auroc(np.ones((4, 2)), np.ones((4, 2)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="got 2 class names for 3 score columns"):
        metrics.classification_metrics(np.ones((4, 3)), np.ones((4, 3)), None, ["a", "b"])
    with pytest.raises(ValueError, match="class_emb has width 3, expected 2"):
        metrics.zero_shot_scores(np.ones((4, 2)), np.ones((5, 3)))


# --------------------------------------------------------------------- class-based AP@k

# Hand-worked case: 5 gallery items, 3 classes; class 2 has gallery positives but no positive
# query (its AP is NaN and it is left out of mAP / wmAP).  Both queries' k-th scores are tied
# with items beyond the top k, so "lower index first" decides the answer.
MAP_GALLERY = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]])
MAP_QUERY = np.array([[1, 0, 0], [1, 1, -1]])  # -1 (uncertain) is not positive
MAP_SIM = np.array([[0.9, 0.5, 0.5, 0.1, 0.5],   # ranking 0, 1, 2, 4, 3
                    [0.2, 0.8, 0.2, 0.8, 0.2]])  # ranking 1, 3, 0, 2, 4


@pytest.mark.parametrize("k, ap0, ap1", [
    # k = 1: q0 c0 top {0}: 1;  q1 c0 top {1}: 0;  q1 c1: 1.
    (1, (1 + 0) / 2, 1.0),
    # k = 3: q0 c0 positives at ranks 1, 3: (1/1 + 2/3)/2 = 5/6;  q1 c0 rank 3: 1/3;  q1 c1 rank 1.
    (3, (5 / 6 + 1 / 3) / 2, 1.0),
    # k = 5: q0 c0 ranks 1, 3, 4: (1 + 2/3 + 3/4)/3;  q1 c0 ranks 3, 4, 5: (1/3 + 2/4 + 3/5)/3;
    # q1 c1 ranks 1, 4: (1 + 2/4)/2.
    (5, ((1 + 2 / 3 + 3 / 4) / 3 + (1 / 3 + 2 / 4 + 3 / 5) / 3) / 2, 0.75),
])
def test_class_map_hand_worked_with_ties(k, ap0, ap1):
    out = metrics.class_map_at_k(MAP_SIM, MAP_QUERY, MAP_GALLERY, k)
    np.testing.assert_allclose(out["AP"][:2], [ap0, ap1])
    assert np.isnan(out["AP"][2])
    assert out["mAP"] == pytest.approx((ap0 + ap1) / 2)
    assert out["wmAP"] == pytest.approx((2 * ap0 + 1 * ap1) / 3)  # 2 queries positive for c0, 1 for c1
    assert isinstance(out["mAP"], float) and isinstance(out["wmAP"], float)


def test_class_map_k3_values_and_tie_order_matter():
    out = metrics.class_map_at_k(MAP_SIM, MAP_QUERY, MAP_GALLERY, 3)
    assert out["mAP"] == pytest.approx(19 / 24) and out["wmAP"] == pytest.approx(13 / 18)
    # Reversing the gallery (so ties now favour the other items) changes the answer.
    rev = metrics.class_map_at_k(MAP_SIM[:, ::-1], MAP_QUERY, MAP_GALLERY[::-1], 3)
    assert rev["mAP"] != pytest.approx(out["mAP"])


def _class_map_by_loops(sim, ql, gl, k):
    """Independent slow version: a Python sort per query, the contract's formula per class."""
    q, c = ql.shape
    per_class = []
    for cls in range(c):
        aps = []
        for i in range(q):
            if ql[i, cls] != 1:
                continue
            ranked = sorted(range(sim.shape[1]), key=lambda j: (-sim[i, j], j))[:k]
            ranks = [r + 1 for r, j in enumerate(ranked) if gl[j, cls] == 1]
            aps.append(np.mean([n / r for n, r in enumerate(ranks, 1)]) if ranks else 0.0)
        per_class.append((np.mean(aps), len(aps)) if aps else (np.nan, 0))
    ap = np.array([a for a, _ in per_class])
    n = np.array([m for _, m in per_class])
    ok = n > 0
    return ap, ap[ok].mean(), (n[ok] * ap[ok]).sum() / n[ok].sum()


@pytest.mark.parametrize("seed", [0, 1])
def test_class_map_against_loops_and_streamed_blocks(seed):
    rng = np.random.default_rng(seed)
    q, g, c = 23, 40, 4
    sim = rng.normal(size=(q, g)).astype(np.float32)
    sim[:12] = np.round(sim[:12], 1)  # rounding makes many ties; rows 12.. have (almost) none
    sim[0] = 0.0  # a row tied everywhere
    ql = (rng.random((q, c)) < 0.35).astype(int)
    ql[:, 3] = 0  # a class without positive queries
    gl = (rng.random((g, c)) < 0.3).astype(int)
    acc = metrics.ClassMapAccumulator(gl)
    for start, stop in ((0, 1), (1, 9), (9, 23)):  # uneven blocks, one of a single query
        acc.update(sim[start:stop], ql[start:stop])
    streamed = acc.finalize()
    assert sorted(streamed) == [1, 3, 5, 10]
    for k in (1, 3, 5, 10, g):
        ap, m, w = _class_map_by_loops(sim, ql, gl, k)
        out = metrics.class_map_at_k(sim, ql, gl, k)
        np.testing.assert_allclose(out["AP"], ap, rtol=1e-12)
        assert out["mAP"] == pytest.approx(m, rel=1e-12) and out["wmAP"] == pytest.approx(w, rel=1e-12)
        if k in streamed:
            np.testing.assert_allclose(streamed[k]["AP"], out["AP"], rtol=1e-12)
            assert streamed[k]["mAP"] == pytest.approx(out["mAP"], rel=1e-12)
            assert streamed[k]["wmAP"] == pytest.approx(out["wmAP"], rel=1e-12)


@pytest.mark.parametrize("g, block", [(37, 1), (37, 3), (700, 64), (1000, 16)])
def test_top_k_blocks_equal_a_stable_sort(g, block):
    rng = np.random.default_rng(g + block)
    sim = rng.normal(size=(12, g)).astype(np.float32)
    sim[:4] = np.round(sim[:4], 0)  # heavy ties, also across blocks at the k-th place
    sim[4] = 1.0  # every score tied
    sim[5, ::7] = np.inf  # more +inf than k: all tied at the top
    sim[6, : g // 2] = -np.inf
    sim[7, -3:] = 5.0  # the best items in the tail that no block covers
    for k in (1, 3, 10):
        want = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(metrics._top_k(sim, k, block), want)


def test_class_map_on_a_gallery_large_enough_for_blocks():
    rng = np.random.default_rng(7)
    q, g, c = 6, 900, 3  # 900 > 10 * 64 columns: the block search, not the full sort
    sim = rng.normal(size=(q, g))
    sim[:2] = np.round(sim[:2], 1)
    ql, gl = (rng.random((q, c)) < 0.5).astype(int), (rng.random((g, c)) < 0.1).astype(int)
    for k in (1, 10):
        ap, m, w = _class_map_by_loops(sim, ql, gl, k)
        out = metrics.class_map_at_k(sim, ql, gl, k)
        np.testing.assert_allclose(out["AP"], ap, rtol=1e-12)
        assert (out["mAP"], out["wmAP"]) == (pytest.approx(m, rel=1e-12), pytest.approx(w, rel=1e-12))


def test_class_map_bad_inputs():
    with pytest.raises(ValueError, match=r"similarity \(2, 4\) and query_labels \(2, 3\) must be "
                                         r"\[q, 5\] and \[q, 3\]"):
        metrics.class_map_at_k(MAP_SIM[:, :4], MAP_QUERY, MAP_GALLERY, 1)
    with pytest.raises(ValueError, match=r"must be \[q, 5\] and \[q, 2\]"):
        metrics.class_map_at_k(MAP_SIM, MAP_QUERY, MAP_GALLERY[:, :2], 1)
    with pytest.raises(ValueError, match=r"every k must be in \[1, 5\]"):
        metrics.class_map_at_k(MAP_SIM, MAP_QUERY, MAP_GALLERY, 6)
    with pytest.raises(ValueError, match="has NaN at"):
        metrics.class_map_at_k(np.where(MAP_SIM > 0.8, np.nan, MAP_SIM), MAP_QUERY, MAP_GALLERY, 1)
    nothing = metrics.class_map_at_k(MAP_SIM, np.zeros((2, 3)), MAP_GALLERY, 2)
    assert np.isnan(nothing["mAP"]) and np.isnan(nothing["wmAP"]) and np.isnan(nothing["AP"]).all()


# --------------------------------------------------------------------- weighted AUROC


def test_weighted_auroc_matches_sklearn_and_mask():
    rng = np.random.default_rng(3)
    n, c = 80, 5
    labels = (rng.random((n, c)) < np.array([0.1, 0.3, 0.5, 0.7, 0.4])).astype(float)
    scores = np.round(labels * rng.random(c) + rng.normal(size=(n, c)), 1)
    want = roc_auc_score(labels, scores, average="weighted")
    assert metrics.weighted_auroc(scores, labels) == pytest.approx(want, rel=1e-12)
    assert metrics.weighted_auroc(scores, labels) != pytest.approx(metrics.macro_auroc(scores, labels))
    # With a mask: weights are the positives among counted entries; a one-outcome class drops out.
    mask = (rng.random((n, c)) < 0.7).astype(float)
    mask[labels[:, 4] == 0, 4] = 0  # class 4 keeps positives only
    per_class = metrics.auroc(scores, labels, mask)
    assert np.isnan(per_class[4])
    weight = ((labels == 1) & (mask > 0)).sum(axis=0)[:4]
    assert metrics.weighted_auroc(scores, labels, mask) == pytest.approx(
        (weight * per_class[:4]).sum() / weight.sum())
    assert np.isnan(metrics.weighted_auroc(scores, np.ones_like(labels)))


# --------------------------------------------------------------------- chance levels


def _ap_of_permutations(orders, positive, k):
    """AP@k of each ranking in orders [N, G] for one class's gallery positives [G] bool."""
    rel = positive[orders[:, :k]]  # [N, k]
    ranks = np.arange(1, k + 1)
    n_so_far = rel.cumsum(axis=1)
    return np.where(rel, n_so_far / ranks, 0).sum(axis=1) / np.maximum(rel.sum(axis=1), 1)


def test_class_map_chance_exact_enumeration_and_monte_carlo():
    # Exact: every ranking of a 6-item gallery, classes with 0, 1, 2, 4 and 6 positives.
    gl6 = np.zeros((6, 5), int)
    for cls, p in enumerate((0, 1, 2, 4, 6)):
        gl6[:p, cls] = 1
    orders = np.array(list(itertools.permutations(range(6))))
    ql = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [0, 0, 1, 0, 0]])  # n_c = 1, 2, 3, 1, 2
    for k in (1, 2, 3, 6):
        exact = np.array([_ap_of_permutations(orders, gl6[:, cls] == 1, k).mean() for cls in range(5)])
        n = (ql == 1).sum(axis=0)
        got = metrics.class_map_chance(gl6, ql, k)
        assert got["mAP"] == pytest.approx(exact.mean(), rel=1e-10)
        assert got["wmAP"] == pytest.approx((n * exact).sum() / n.sum(), rel=1e-10)
    # Monte Carlo: 20000 random rankings of a 60-item gallery; AP is in [0, 1], so the standard
    # error of each class mean is below 0.5 / sqrt(20000) = 0.0035: tolerance 0.015 (> 4 SE).
    rng = np.random.default_rng(0)
    gl = np.zeros((60, 3), int)
    gl[rng.permutation(60)[:3], 0] = gl[rng.permutation(60)[:15], 1] = gl[rng.permutation(60)[:40], 2] = 1
    orders = np.argsort(rng.random((20000, 60)), axis=1)
    for k in (1, 3, 5, 10):
        mc = np.array([_ap_of_permutations(orders, gl[:, cls] == 1, k).mean() for cls in range(3)])
        assert metrics.class_map_chance(gl, np.eye(3), k)["mAP"] == pytest.approx(mc.mean(), abs=0.015)
        for cls in range(3):
            one = np.zeros((1, 3)); one[0, cls] = 1  # noqa: E702
            assert metrics.class_map_chance(gl, one, k)["mAP"] == pytest.approx(mc[cls], abs=0.015)


def test_chance_levels_match_random_embeddings():
    rng = np.random.default_rng(5)
    q, g, d, c = 300, 200, 16, 4
    gl = (rng.random((g, c)) < np.array([0.05, 0.2, 0.5, 0.8])).astype(int)
    ql = (rng.random((q, c)) < 0.3).astype(int)
    chance = metrics.chance_levels(ql, gl)
    draws = {k: [] for k in (1, 3, 5, 10)}
    for _ in range(10):  # fresh random embeddings for queries and gallery each draw
        sim = rng.normal(size=(q, d)) @ rng.normal(size=(g, d)).T
        acc = metrics.ClassMapAccumulator(gl)
        acc.update(sim, ql)
        for k, out in acc.finalize().items():
            draws[k].append([out["mAP"], out["wmAP"]])
    # Standard error of the 10-draw mean: 0.006-0.009 (measured over 200 draws); tolerance 0.03.
    for k, values in draws.items():
        m, w = np.mean(values, axis=0)
        assert chance[f"x2x_mAP@{k}"] == pytest.approx(m, abs=0.03)
        assert chance[f"r2x_wmAP@{k}"] == pytest.approx(w, abs=0.03)
        assert chance[f"x2r_mAP@{k}"] == chance[f"x2x_mAP@{k}"]
    # Exact-report recall: random scores hit the match with probability k / n.
    sims = rng.random((400, 50, 50))
    for k in (1, 5, 10):
        assert chance[f"i2t_R@{k}"] == chance[f"t2i_R@{k}"] == metrics.recall_chance(q, k) == k / q
        hits = np.mean([metrics.recall_at_k(s, k) for s in sims])
        assert metrics.recall_chance(50, k) == pytest.approx(hits, abs=0.02)  # SE < 0.004
    assert metrics.recall_chance(5, 10) == 1.0
    assert chance["macro_auroc"] == chance["weighted_auroc"] == 0.5
    expected_keys = {f"{d}_{m}@{k}" for d in ("x2x", "r2x", "x2r") for m in ("mAP", "wmAP")
                     for k in (1, 3, 5, 10)}
    expected_keys |= {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert set(chance) == expected_keys | {"macro_auroc", "weighted_auroc"}
    assert metrics.chance_levels(ql, gl, n_pairs=20)["i2t_R@5"] == 0.25
    json.dumps(chance)


# --------------------------------------------------------------------- prompt forms


def test_zero_shot_probabilities_single_and_paired():
    """sigmoid of the class logits is P(present): single prompts, and the pair softmax."""
    rng = np.random.default_rng(2)
    img = rng.normal(size=(5, 6))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    prompts = rng.normal(size=(6, 6))
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)  # 3 classes: rows 0-2 absent, 3-5 present
    cos = img @ prompts.T
    single = expit(metrics.zero_shot_scores(img, prompts, 7.0, -2.0))
    np.testing.assert_allclose(single, 1 / (1 + np.exp(-(7.0 * cos - 2.0))), rtol=1e-12)
    pair_logits = np.stack([7.0 * cos[:, :3], 7.0 * cos[:, 3:]], axis=-1)  # [N, C, 2]
    softmax = np.exp(pair_logits) / np.exp(pair_logits).sum(axis=-1, keepdims=True)
    for bias in (0.0, -2.0):  # the bias is not used in the paired form
        paired = expit(metrics.zero_shot_scores(img, prompts, 7.0, bias, form="paired"))
        np.testing.assert_allclose(paired, softmax[..., 1], rtol=1e-12)
    np.testing.assert_allclose(metrics.zero_shot_scores(img, prompts, 7.0, form="paired"),
                               7.0 * (cos[:, 3:] - cos[:, :3]), rtol=1e-12)
    assert metrics.zero_shot_scores(img, prompts, 7.0).dtype == np.float64
    with pytest.raises(ValueError, match=r"paired prompts need class_emb \[2C, D\].*\(5, 6\)"):
        metrics.zero_shot_scores(img, prompts[:5], form="paired")
    with pytest.raises(ValueError, match="unknown prompt form 'pairs'"):
        metrics.zero_shot_scores(img, prompts, form="pairs")
