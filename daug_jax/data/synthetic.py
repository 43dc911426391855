"""The built-in benchmark: procedural PA chest radiographs with reports, labels and masks.

Each record is a frontal (PA) film of a phantom patient (soft tissue, lungs, heart, mediastinum,
trachea, spine, ribs, clavicles, diaphragm domes, lung markings, noise) with 0..6 findings drawn
where they develop in real films, a FINDINGS/IMPRESSION report, CheXpert-style labels, a mask per
finding and a *site* per localized class: where that finding would develop in this patient.
`generate` is the benchmark; `synthetic_cases.sample_case` draws a record's patient, findings,
labels and report, `synthetic_render.render` its pixels, masks and sites.

Geometry.  Patient coordinates ``(u, v)`` span about [-1, 1], ``v`` pointing down and ``u < 0``
being the patient's right, drawn on the image left (PA convention).  Shapes are drawn in patient
coordinates, posed (rotated, scaled, shifted) into the image, so any ``image_size >= 32`` works.
Pixels come from a density map (soft tissue, minus lung air, plus bone and findings) through a
per-film contrast, brightness and gamma, plus noise.

Labels.  1 = stated, -1 = hedged ("cannot exclude", "possible"), 0 = negated or not mentioned, as
the CheXpert labeler reads a report; "No Finding" is 1 exactly when no other class is 1 or -1
(the CheXpert rule).  Hedged findings are drawn faintly (a subtle, equivocal opacity is what a
radiologist hedges about) and have masks; masks are all False where the label is 0.

Masks and sites, bool [C, H, W] ("No Finding": all False), both covering every pixel a finding
touches, anti-aliased rim included.  Cardiomegaly: the enlarged silhouette over normal lung / the
band between this patient's heart border and a heart of cardiothoracic ratio 0.68.  Effusion: the
fluid / the basal pleural spaces.  Pneumothorax: the pleural air / the apical-lateral pleural
spaces.  Consolidation, lung lesion: the opacity / the lung fields.  Atelectasis: the plate plus
the lung lost to an elevated hemidiaphragm / the basal lungs.  Masks lie within their sites.

Record ``i`` depends only on ``(seed, i)``: generating in chunks or shards gives the same records.
"""

from __future__ import annotations

import chex
import numpy as np

# The case sampler and the renderer; re-exported: callers use them as `synthetic.<name>`.
from daug_jax.data.synthetic_cases import (  # noqa: F401
    CLASS_NAMES, LOCALIZED_CLASSES, MM_PER_UNIT, sample_case)
from daug_jax.data.synthetic_render import _field, _noise, render  # noqa: F401


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def generate(num: int, *, image_size: int = 64, seed: int = 0, start: int = 0,
             progress: bool = False) -> dict:
    """Records ``start .. start + num - 1`` of the benchmark ``seed`` (``progress``: a tqdm bar).

    Returns {"image": float32 [N, H, W, 1] in [0, 1], "labels": int8 [N, C] in {-1, 0, 1},
    "masks": bool [N, C, H, W], "sites": bool [N, C, H, W], "report": str [N], "id": str [N]}
    with C = len(CLASS_NAMES), H = W = image_size.
    """
    num, image_size = _check_int("num", num, 0), _check_int("image_size", image_size, 32)
    seed, start = _check_int("seed", seed, 0), _check_int("start", start, 0)
    cases = [sample_case(seed, start + i) for i in range(num)]
    out, C = render(cases, image_size, progress=progress), len(CLASS_NAMES)
    out["labels"] = np.array([c["labels"] for c in cases], np.int8).reshape(num, C)
    out["report"] = np.array([c["report"] for c in cases], dtype=str).reshape(num)
    out["id"] = np.array([c["id"] for c in cases], dtype=str).reshape(num)
    chex.assert_shape(out["image"], (num, image_size, image_size, 1))
    chex.assert_shape([out["masks"], out["sites"]], (num, C, image_size, image_size))
    return out
