"""Retrieval, AUROC and pointing-game metrics on hand-worked cases and against scikit-learn."""

import json

import numpy as np
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


# --------------------------------------------------------------------- precision


def test_precision_ties_in_stable_order():
    # Columns 0, 2, 3 tie at 0.7; only column 0 is relevant, so a tie order other than
    # "lower index first" would change the answer.
    sim = np.array([[0.7, 0.9, 0.7, 0.7],
                    [0.1, 0.1, 0.1, 0.1]])
    query = np.array([[1, 0], [1, 0]])
    gallery = np.array([[1, 0], [0, 1], [0, 1], [-1, 1]])
    # query 0: top-2 = columns 1, 0 -> 1 relevant;  query 1 (all tied): columns 0, 1 -> 1 relevant.
    # (Higher index first would give columns 1, 3 and 3, 2: nothing relevant.)
    assert metrics.precision_at_k(sim, query, gallery, 2) == pytest.approx(0.5)
    # k = 3: query 0 gets 1, 0, 2 -> 1/3; query 1 gets 0, 1, 2 -> 1/3.
    assert metrics.precision_at_k(sim, query, gallery, 3) == pytest.approx(1 / 3)
    # k = 1: query 0 -> column 1 (not relevant); query 1 -> column 0 (relevant).
    assert metrics.precision_at_k(sim, query, gallery, 1) == 0.5


def test_precision_relevance_needs_a_shared_positive():
    sim = np.array([[0.9, 0.5, 0.1]])
    query = np.array([[1, -1, 1]])  # uncertain does not count as positive
    gallery = np.array([[0, 1, 0], [0, 0, 1], [-1, -1, -1]])
    assert metrics.precision_at_k(sim, query, gallery, 1) == 0.0  # shares only an uncertain class
    assert metrics.precision_at_k(sim, query, gallery, 2) == 0.5


def test_precision_exclude_self():
    sim = np.array([[1.0, 0.8, 0.2],
                    [0.8, 1.0, 0.5],
                    [0.2, 0.5, 1.0]])
    labels = np.array([[1, 0], [1, 0], [0, 1]])
    assert metrics.precision_at_k(sim, labels, labels, 1) == 1.0  # each query finds itself
    # Without itself: 0 -> 1 (relevant), 1 -> 0 (relevant), 2 -> 1 (not).
    assert metrics.precision_at_k(sim, labels, labels, 1, exclude_self=True) == pytest.approx(2 / 3)
    # k = 2 is the whole remaining gallery: 0 -> {1, 2}: 1/2; 1 -> {0, 2}: 1/2; 2 -> {1, 0}: 0.
    assert metrics.precision_at_k(sim, labels, labels, 2, exclude_self=True) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\]"):
        metrics.precision_at_k(sim, labels, labels, 3, exclude_self=True)


# --------------------------------------------------------------------- retrieval_metrics


def _rank_of_match(row, i):
    """0-based rank of item i when ties with it are resolved in its favour (explicit loop)."""
    return sum(1 for j, s in enumerate(row) if s > row[i])


def test_retrieval_metrics_against_explicit_loops():
    rng = np.random.default_rng(0)
    n, d = 16, 5
    img = rng.normal(size=(n, d))
    txt = img + 0.8 * rng.normal(size=(n, d))  # noisy pairs: recalls strictly between 0 and 1
    labels = (rng.random((n, 3)) < 0.4).astype(int)
    out = metrics.retrieval_metrics(3.0 * img, txt, labels)  # scale: cosine is scale-free
    assert sorted(out) == sorted(["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5",
                                  "t2i_R@10", "i2i_P@10"])
    u = img / np.linalg.norm(img, axis=1, keepdims=True)
    v = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sim = u @ v.T
    for k in (1, 5, 10):
        i2t = np.mean([_rank_of_match(sim[i], i) < k for i in range(n)])
        t2i = np.mean([_rank_of_match(sim[:, i], i) < k for i in range(n)])
        assert out[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert out[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert 0 < out["i2t_R@1"] < 1 and out["i2t_R@1"] != out["t2i_R@1"]
    sii, p = u @ u.T, []
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: -sii[i, j])[:10]
        p.append(np.mean([bool(np.any((labels[i] == 1) & (labels[j] == 1))) for j in others]))
    assert out["i2i_P@10"] == pytest.approx(np.mean(p))
    json.dumps(out)


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
    with pytest.raises(ValueError, match="query_labels has 2 rows, expected 3"):
        metrics.precision_at_k(np.ones((3, 4)), np.ones((2, 2)), np.ones((4, 2)), 1)
    with pytest.raises(ValueError, match="gallery_labels has 3 rows, expected 4"):
        metrics.precision_at_k(np.ones((3, 4)), np.ones((3, 2)), np.ones((3, 2)), 1)
    with pytest.raises(ValueError, match="mask has shape"):
        metrics.auroc(np.ones((4, 2)), np.ones((4, 2)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="text_emb has shape"):
        metrics.retrieval_metrics(np.ones((12, 4)), np.ones((12, 3)), np.ones((12, 2)))
    with pytest.raises(ValueError, match="got 2 class names for 3 score columns"):
        metrics.classification_metrics(np.ones((4, 3)), np.ones((4, 3)), None, ["a", "b"])
    with pytest.raises(ValueError, match="class_emb has width 3, expected 2"):
        metrics.zero_shot_scores(np.ones((4, 2)), np.ones((5, 3)))
