"""Evaluation of trained towers: retrieval (image<->report, image->image) and zero-shot
classification from the class-prompt embeddings, on records that carry their labels.

    metrics = evaluate_towers("runs/towers", synthetic.generate(500, image_size=32, seed=2))
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from daug_jax import metrics
from daug_jax.models import text as text_lib
from daug_jax.models.two_tower import TwoTower, class_prompts
from daug_jax.train import load_towers, prepare_data

_BATCH = 256  # records encoded per call; the last chunk is padded to keep one compiled shape


def _chunked(fn, *arrays: np.ndarray) -> np.ndarray:
    """Applies ``fn`` to fixed-size chunks of the leading axis and concatenates the results."""
    n, out = len(arrays[0]), []
    for start in range(0, n, _BATCH):
        parts = [a[start:start + _BATCH] for a in arrays]
        rows = len(parts[0])
        parts = [np.concatenate([p, np.repeat(p[-1:], _BATCH - rows, axis=0)]) for p in parts]
        out.append(np.asarray(jax.device_get(fn(*parts)))[:rows])
    return np.concatenate(out)


def embed(model: TwoTower, variables: dict, tokenizer: Any, config: Any, data: dict) -> dict:
    """Unit-norm embeddings of ``data``'s images, reports and the class prompts.

    data: like `synthetic.generate` output (+ "heatmaps" [N, H, W, K] for DAug towers).
    Returns {"image_emb" [N, D], "text_emb" [N, D], "class_emb" [C, D], "labels" / "label_mask"
    [N, C] float32 (C = config.model.class_names), "logit_scale", "class_scale", "class_bias"}.
    """
    arrays, reports = prepare_data(config, data)
    images, length = arrays["image"], int(config.model.text.max_length)
    # The variables are an argument, not a constant of the programs: towers of the same shape
    # (the variants of an ablation) share the compiled encoders.
    image_fn = jax.jit(lambda v, x: model.apply(v, x, method=TwoTower.encode_image))
    text_fn = jax.jit(lambda v, i, m: model.apply(v, i, m, method=TwoTower.encode_text))
    encode_image = lambda x: image_fn(variables, x)  # noqa: E731
    encode_text = lambda i, m: text_fn(variables, i, m)  # noqa: E731
    ids, mask = text_lib.tokenize(tokenizer, reports, length)
    cls_ids, cls_mask = text_lib.tokenize(
        tokenizer, class_prompts(list(config.model.class_names)), length)
    scalars = jax.device_get(model.apply(variables, method=TwoTower.scalars))
    return {"image_emb": _chunked(encode_image, images),
            "text_emb": _chunked(encode_text, ids, mask),
            "class_emb": np.asarray(encode_text(cls_ids, cls_mask)),
            "labels": np.asarray(arrays["labels"]), "label_mask": np.asarray(arrays["label_mask"]),
            **{k: float(v) for k, v in scalars.items()}}


def evaluate_embeddings(emb: dict, raw_labels: np.ndarray, class_names: list[str]) -> dict:
    """Retrieval and zero-shot classification metrics of `embed` output.

    raw_labels: [N, C] in {-1, 0, 1}; image->image relevance is sharing a positive (1) class.
    """
    out = metrics.retrieval_metrics(emb["image_emb"], emb["text_emb"], raw_labels)
    scores = metrics.zero_shot_scores(emb["image_emb"], emb["class_emb"], emb["class_scale"],
                                      emb["class_bias"])
    out.update(metrics.classification_metrics(scores, emb["labels"], emb["label_mask"],
                                              class_names))
    return out


def evaluate_towers(workdir: str, data: dict) -> dict:
    """Loads the latest checkpoint in ``workdir`` and evaluates it on ``data`` (see module doc).

    Returns {"macro_auroc", "per_class_auroc": {class: auroc or None}, "i2t_R@1", "i2t_R@5",
    "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "i2i_P@10"}.
    """
    model, variables, tokenizer, config = load_towers(workdir)
    emb = embed(model, variables, tokenizer, config, data)
    names = list(config.model.class_names)
    columns = [list(data.get("class_names", names)).index(n) for n in names]
    return evaluate_embeddings(emb, np.asarray(data["labels"])[:, columns], names)
