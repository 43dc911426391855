"""The evaluation protocol on known embeddings: test queries against a train gallery."""

import numpy as np
import pytest

from daug_jax import evaluate, metrics


def _split(rng, n, c=3, d=8, text=True):
    emb = rng.normal(size=(n, d))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = (rng.uniform(size=(n, c)) < 0.4).astype(np.float32)
    labels[0] = 1.0  # every class has a positive query
    out = {"image_emb": emb, "labels": labels, "label_mask": np.ones_like(labels),
           "text_emb": None, "class_emb": np.eye(c, d), "prompts": "single", "class_scale": 2.0,
           "class_bias": 0.0}
    if text:
        noisy = emb + 0.3 * rng.normal(size=emb.shape)
        out["text_emb"] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return out


def test_protocol_matches_the_metrics_on_whole_matrices(monkeypatch):
    rng = np.random.default_rng(0)
    query, gallery = _split(rng, 40), _split(rng, 90)
    monkeypatch.setattr(evaluate, "_QUERY_BLOCK", 7)  # several uneven query blocks
    out = evaluate.evaluate_embeddings(query, gallery, ["A", "B", "C"])
    q, g = query, gallery
    for name, sim in (("x2x", q["image_emb"] @ g["image_emb"].T),
                      ("r2x", q["text_emb"] @ g["image_emb"].T),
                      ("x2r", q["image_emb"] @ g["text_emb"].T)):
        for k in metrics.MAP_KS:
            want = metrics.class_map_at_k(sim, q["labels"], g["labels"], k)
            assert out[f"{name}_mAP@{k}"] == pytest.approx(want["mAP"], abs=1e-12)
            assert out[f"{name}_wmAP@{k}"] == pytest.approx(want["wmAP"], abs=1e-12)
    pairs = q["image_emb"] @ q["text_emb"].T
    assert out["i2t_R@5"] == metrics.recall_at_k(pairs, 5)
    assert out["t2i_R@1"] == metrics.recall_at_k(pairs.T, 1)
    scores = q["image_emb"] @ q["class_emb"].T
    assert out["weighted_auroc"] == pytest.approx(metrics.weighted_auroc(scores, q["labels"]))
    assert out["macro_auroc"] == pytest.approx(metrics.macro_auroc(scores, q["labels"]))
    assert out["chance"]["x2x_mAP@5"] == pytest.approx(
        metrics.class_map_chance(g["labels"], q["labels"], 5)["mAP"])
    assert out["chance"]["i2t_R@5"] == pytest.approx(5 / 40)
    # Near-copies as reports: exact-report recall far above its chance level.
    assert out["i2t_R@5"] > 3 * out["chance"]["i2t_R@5"]


def test_without_reports_only_images_and_classes_are_scored():
    rng = np.random.default_rng(1)
    out = evaluate.evaluate_embeddings(_split(rng, 20, text=False), _split(rng, 30, text=False),
                                       ["A", "B", "C"])
    assert "x2x_mAP@10" in out and "r2x_mAP@10" not in out and "i2t_R@1" not in out
    assert set(out["chance"]) <= set(out)
