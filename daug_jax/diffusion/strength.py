"""How well the noise-aware classifier tells classes apart at each noise level.

Classifier guidance moves a DDIM decode along the gradient of log p(class | x_t); where the
classifier cannot separate a class at level t, that gradient carries no information about the
class and the guidance steers nowhere in particular.  Per-class AUROC of the logits on noised
held-out films, per level, says where the guidance can act (a stronger classifier — more steps,
wider — is the remedy where it is near 0.5).

    auroc = classifier_auroc(models, images, labels, data_classes, levels=(0, 250, 500))
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from daug_jax import metrics
from daug_jax.data.pipeline import pad_rows
from daug_jax.diffusion.schedule import q_sample


def classifier_auroc(models, images: np.ndarray, labels: np.ndarray, data_classes: Sequence[str],
                     *, levels: Sequence[int], batch_size: int = 64, seed: int = 0) -> dict:
    """{str(level): {"macro": float or None, "per_class": {class: auroc or None}}}.

    models: `heatmaps.TranslationModels`; images: [N, H, W, 1] in [-1, 1]; labels: [N, C'] in
    {-1, 0, 1} ordered as ``data_classes`` (uncertain entries are not counted); levels: noise
    levels t (0 = clean).  Every film is noised once per level with a fixed key.
    """
    columns = [list(data_classes).index(c) for c in models.class_names if c in data_classes]
    names = [data_classes[c] for c in columns]
    logit_index = [list(models.class_names).index(n) for n in names]
    truth = np.asarray(labels)[:, columns]
    positive, mask = (truth == 1).astype(np.float32), (truth >= 0).astype(np.float32)
    alpha_bar = jnp.asarray(models.alpha_bar, jnp.float32)

    @jax.jit
    def logits(logit_fn, x, t, key):
        t_b = jnp.full((x.shape[0],), t, jnp.int32)
        x_t = q_sample(x, t_b, jax.random.normal(key, x.shape, x.dtype), alpha_bar)
        return logit_fn(x_t, t_b)

    out = {}
    for level in levels:
        key = jax.random.fold_in(jax.random.key(seed), int(level))
        scores = []
        for i, start in enumerate(range(0, len(images), batch_size)):
            x = images[start:start + batch_size]
            batch = logits(models.logit_fn, pad_rows(x.astype(np.float32), batch_size),
                           int(level), jax.random.fold_in(key, i))
            scores.append(np.asarray(batch)[:len(x)][:, logit_index])
        scores = np.concatenate(scores)
        per_class = metrics.auroc(scores, positive, mask)
        macro = metrics.macro_auroc(scores, positive, mask)
        out[str(int(level))] = {
            "macro": None if np.isnan(macro) else macro,
            "per_class": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, per_class)}}
    return out
