r"""The Image-Text-Class hybrid contrastive loss (MedImageInsight / DAug formulation).

All embeddings are L2-normalised rows; B is the batch, D the embedding width, C the number of
classes.  With image embeddings ``u_i``, report embeddings ``v_j`` and class-prompt embeddings
``w_c`` (the text tower applied to prompts such as "a chest X-ray showing pleural effusion"):

**Image-text (CLIP).**  With logits ``s_ij = τ · u_i·v_j`` (τ = ``logit_scale``), every other
report in the batch a negative:

    L_it = ½ · [ 1/B Σ_i −log softmax_j(s_ij)[i]  +  1/B Σ_j −log softmax_i(s_ij)[j] ]

**Image-class (sigmoid).**  With ``z_ic = a · u_i·w_c + b`` (a = ``class_scale``,
b = ``class_bias``), multi-hot labels ``y_ic ∈ {0, 1}`` and mask ``m_ic`` (1 = counted):

    L_ic = Σ_ic m_ic · [ softplus(z_ic) − y_ic · z_ic ]  /  max(Σ_ic m_ic, 1)

a per-entry binary cross-entropy (an image may have several findings); uncertain or missing
labels (mask 0) contribute neither value nor gradient.  A class prompt is a fixed target, so the
class prompts become a ready-made linear classifier at inference.

**Prompt forms** (`class_logits`, ``model.prompts``).  ``"single"``: one prompt per class, the
logit above (the authors' ``label_bce`` mode).  ``"paired"``: an absent / present prompt pair per
class (CheXzero's), scored by a softmax over the pair, ``P(c) = softmax([a·u·w⁰_c, a·u·w¹_c])[1]``,
which is ``sigmoid(z_ic)`` with ``z_ic = a · (u_i·w¹_c − u_i·w⁰_c)``; the same masked BCE on that
logit is the pair's cross-entropy (b cancels in the pair softmax).  Training and scoring both
call `class_logits`, so a model is scored in the form it was trained.

**Hybrid.**  ``L = w · L_it + (1 − w) · L_ic`` with w = ``clip_weight`` (the paper's
parameterisation): w = 1 is the plain CLIP baseline, w = 0 trains the class term alone (datasets
without reports, and the paper's classification baseline).

Every function is pure and safe under ``jax.jit`` and ``jax.grad``; inputs of any float dtype
are cast to float32, since a bfloat16 softmax over logits up to ~100 loses the small differences
the loss is made of.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

LABEL_POLICIES = ("ignore", "ones", "zeros")
PROMPT_FORMS = ("single", "paired")


def _f32(x) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


def _scalar(x, name: str) -> jax.Array:
    x = _f32(x)
    if x.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {x.shape}")
    return x


def clip_loss(image_emb, text_emb, logit_scale) -> jax.Array:
    """L_it, the symmetric softmax cross-entropy of CLIP: a float32 scalar.  image_emb, text_emb:
    [B, D] L2-normalised, row i of text_emb the report of image i; logit_scale: scalar τ (the
    temperature's inverse, already exponentiated; typically <= 100)."""
    image_emb, text_emb = _f32(image_emb), _f32(text_emb)
    chex.assert_rank([image_emb, text_emb], 2, custom_message="image_emb, text_emb must be [B, D]")
    chex.assert_equal_shape([image_emb, text_emb],
                            custom_message="image_emb and text_emb must both be [B, D]")
    logit_scale = _scalar(logit_scale, "logit_scale")

    logits = logit_scale * image_emb @ text_emb.T  # [B, B]; row i: image i against every report
    targets = jnp.arange(logits.shape[0])
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


def _check_form(form: str) -> None:
    if form not in PROMPT_FORMS:
        raise ValueError(f"unknown prompt form {form!r}; valid: {', '.join(PROMPT_FORMS)}")


def class_logits(image_emb, class_emb, scale, bias, form: str = "single"):
    """Image-class logits z [B, C] of either prompt form (module docstring); probabilities are
    ``sigmoid(z)``.  image_emb: [B, D] L2-normalised.  class_emb: [C, D] for "single"; [2C, D]
    for "paired", rows ``[absent_0 .. absent_{C-1}, present_0 .. present_{C-1}]`` (the order of
    `two_tower.class_prompts(names, "paired")`).  scale, bias: scalars a, b (b unused by
    "paired").  All-NumPy inputs give float64 NumPy (evaluation); any JAX input (or tracer)
    gives float32 JAX."""
    _check_form(form)
    on_jax = any(isinstance(x, jax.Array) for x in (image_emb, class_emb, scale, bias))
    xp, dtype = (jnp, jnp.float32) if on_jax else (np, np.float64)
    u, w = xp.asarray(image_emb, dtype), xp.asarray(class_emb, dtype)
    scale, bias = xp.asarray(scale, dtype), xp.asarray(bias, dtype)
    if u.ndim != 2 or w.ndim != 2 or u.shape[1] != w.shape[1]:
        raise ValueError(f"image_emb {tuple(u.shape)} and class_emb {tuple(w.shape)} must be "
                         f"[B, D] and [K, D] with the same D")
    if scale.ndim or bias.ndim:
        raise ValueError(f"scale and bias must be scalars, got shapes {scale.shape}, {bias.shape}")
    cos = u @ w.T  # [B, K]
    if form == "single":
        return scale * cos + bias
    if w.shape[0] % 2:
        raise ValueError(f"paired prompts need class_emb [2C, D] (absent rows, then present "
                         f"rows), got shape {tuple(w.shape)}")
    c = w.shape[0] // 2
    return scale * (cos[:, c:] - cos[:, :c])


def class_sigmoid_loss(image_emb, class_emb, labels, mask, scale, bias,
                       form: str = "single") -> jax.Array:
    """L_ic, the `masked_bce` of the `class_logits` z [B, C]: a float32 scalar.  image_emb:
    [B, D] L2-normalised; class_emb: [C, D] or [2C, D] L2-normalised, laid out as in
    `class_logits`; labels, mask: [B, C] float as in `masked_bce`; scale, bias: scalars a, b."""
    _check_form(form)
    image_emb, class_emb, labels, mask = map(_f32, (image_emb, class_emb, labels, mask))
    chex.assert_rank([image_emb, class_emb, labels, mask], 2,
                     custom_message="image_emb [B, D], class_emb [C, D], labels, mask [B, C]")
    chex.assert_equal_shape_suffix([image_emb, class_emb], 1,
                                   custom_message="image_emb and class_emb differ in D")
    n_classes = class_emb.shape[0] // 2 if form == "paired" else class_emb.shape[0]
    expected = (image_emb.shape[0], n_classes)
    chex.assert_shape(labels, expected, custom_message=f"labels must be [B, C] = {expected}")
    chex.assert_shape(mask, expected, custom_message=f"mask must be [B, C] = {expected}")
    scale, bias = _scalar(scale, "class scale"), _scalar(bias, "class bias")

    return masked_bce(class_logits(image_emb, class_emb, scale, bias, form), labels, mask)


def masked_bce(logits, labels, mask) -> jax.Array:
    """Mask-weighted mean sigmoid cross-entropy Σ m · BCE(z, y) / max(Σ m, 1), a float32 scalar:
    the loss of the image-class term and of the noise-aware classifier.  logits, labels, mask:
    [B, C]; labels 1 = present, 0 = absent; mask 1 = counted, 0 = ignored (fractional weights
    allowed), e.g. from `labels_and_mask`."""
    chex.assert_equal_shape([logits, labels, mask])
    logits, labels, mask = _f32(logits), _f32(labels), _f32(mask)
    # Masked labels are replaced by 0 before the cross-entropy: whatever was there (NaN for a
    # missing CheXpert label, say) must not leak into the value or, via 0 * NaN, the gradient;
    # where(), not multiply, for the same reason with an extreme logit.
    counted = mask > 0
    labels = jnp.where(counted, labels, 0.0)
    per_entry = optax.sigmoid_binary_cross_entropy(logits, labels)  # [B, C]
    per_entry = jnp.where(counted, per_entry * mask, 0.0)
    return per_entry.sum() / jnp.maximum(mask.sum(), 1.0)


def hybrid_contrastive_loss(towers: dict, labels, mask, *, clip_weight, prompts: str = "single"):
    """Image-Text-Class hybrid loss  L = w · L_it + (1 − w) · L_ic  (see the module docstring).
    towers: the two towers' outputs (`two_tower.TwoTower.__call__`): "image_emb" [B, D],
    "text_emb" [B, D], "class_emb" [C, D] or [2C, D] (as in `class_logits`), all L2-normalised;
    scalars "logit_scale" τ, "class_scale" a and "class_bias" b.
    labels, mask: [B, C] float (see `labels_and_mask`).
    clip_weight: w in [0, 1] (1: CLIP only, 0: class term only; both terms are always reported).
    prompts: the class-prompt form, "single" or "paired" (static under jit; see `class_logits`).
    Returns (loss, {"image_text": L_it, "image_class": L_ic}), float32 scalars."""
    image_text = clip_loss(towers["image_emb"], towers["text_emb"], towers["logit_scale"])
    image_class = class_sigmoid_loss(towers["image_emb"], towers["class_emb"], labels, mask,
                                     towers["class_scale"], towers["class_bias"], prompts)
    w = _f32(clip_weight)
    loss = w * image_text + (1.0 - w) * image_class
    return loss, {"image_text": image_text, "image_class": image_class}


def labels_and_mask(raw, policy: str = "ignore", missing=None):
    """CheXpert-style labels to (multi-hot targets, loss mask) under an uncertainty policy.

    raw: [B, C] with 1 = positive, 0 = negative, -1 = uncertain, any int or float dtype (NaN:
      missing, unmentioned).  missing: optional [B, C] bool, True = missing (with the NaNs).
    policy: uncertain (-1) labels are "ignore": masked out (default); "ones": counted as
      positive (U-Ones); "zeros": counted as negative (U-Zeros).  Missing ones are always masked.
    Returns (labels [B, C] float32 in {0, 1}, mask [B, C] float32 in {0, 1}); labels are 0
    wherever mask is 0.  Jit-safe with ``policy`` static; with concrete inputs, values other than
    -1/0/1/NaN raise a ValueError naming the first offending [row, class].
    """
    if policy not in LABEL_POLICIES:
        raise ValueError(f"unknown label policy {policy!r}; valid policies: "
                         f"{', '.join(LABEL_POLICIES)}")
    # NumPy in, NumPy out: the input pipeline calls this on the host (in its worker threads),
    # where placing arrays on an accelerator would be wasted transfers.
    xp = np if isinstance(raw, np.ndarray) and not isinstance(missing, jax.Array) else jnp
    raw = xp.asarray(raw)
    chex.assert_rank(raw, 2, custom_message="raw labels must be [B, C]")
    raw = raw.astype(xp.float32)
    is_missing = xp.isnan(raw)
    if missing is not None:
        missing = xp.asarray(missing)
        chex.assert_shape(missing, raw.shape, custom_message=f"missing must match raw {raw.shape}")
        is_missing = is_missing | missing.astype(bool)
    # Values are checked only when known (not under tracing).
    if not isinstance(raw, jax.core.Tracer) and not isinstance(is_missing, jax.core.Tracer):
        bad = ~is_missing & (raw != -1) & (raw != 0) & (raw != 1)
        if bool(bad.any()):
            row, col = (int(i) for i in np.argwhere(np.asarray(bad))[0])
            raise ValueError(f"label at [{row}, {col}] is {float(raw[row, col])}; expected -1 "
                             f"(uncertain), 0, 1 or NaN (missing)")
    positive, uncertain = raw == 1, raw == -1
    labels = (positive | uncertain) if policy == "ones" else positive
    mask = ~(is_missing | uncertain) if policy == "ignore" else ~is_missing
    return (labels & mask).astype(xp.float32), mask.astype(xp.float32)
