"""The two-tower model: images and reports in one embedding space, class prompts as classifiers.

    images [B, H, W, C]     -> image tower -> L2-normalise -> image_emb [B, D]
    report tokens [B, L]    -> text tower  -> L2-normalise -> text_emb  [B, D]
    class prompts [K, L]    -> text tower  -> L2-normalise -> class_emb [K, D]

plus three learned scalars: the CLIP temperature (``logit_scale``, stored as its log) and the
SigLIP-style scale and bias of the image-class sigmoid logits.  The class prompts ("a chest X-ray
showing pleural effusion") go through the text tower at every step, so the class embeddings
move with it; at inference they are a ready-made linear classifier over image embeddings.
The losses live in `daug_jax.losses`; this file only computes embeddings.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from daug_jax.models import backbones
from daug_jax.models.text_tokenizer import prompt_tokens

NO_FINDING = "No Finding"
FILLS = ("repeat", "heatmaps")  # how the image tower's extra channels are filled


def class_prompts(class_names: Sequence[str], form: str = "single") -> list[str]:
    """Class prompts for the text tower, in the row layout `losses.class_logits` expects.

    form "single": C prompts, one per class, e.g. "a chest X-ray showing pleural effusion".
    form "paired": 2C prompts, ``[absent_0 .. absent_{C-1}, present_0 .. present_{C-1}]``: the
    "present" half is the single form, the "absent" half its healthy counterpart, e.g. "a chest
    X-ray with no pleural effusion"; each class is scored by a softmax over its pair.
    "No Finding" becomes "a chest X-ray with no findings": "showing no finding" would put a
    negation inside a sentence that otherwise asserts presence.  Its "absent" prompt is "a chest
    X-ray with abnormal findings": the pair must describe the two outcomes of the label, and
    No Finding = 0 means some finding is present ("a chest X-ray with no no findings", the
    mechanical negation, would be a double negative the text tower cannot be expected to read).
    """
    if form not in ("single", "paired"):
        raise ValueError(f"unknown prompt form {form!r}; valid: single, paired")
    present, absent = [], []
    for name in class_names:
        if not str(name).strip():
            raise ValueError(f"class name at index {len(present)} is empty")
        if name == NO_FINDING:
            present.append("a chest X-ray with no findings")
            absent.append("a chest X-ray with abnormal findings")
        else:
            present.append(f"a chest X-ray showing {name.lower()}")
            absent.append(f"a chest X-ray with no {name.lower()}")
    return present if form == "single" else absent + present


def class_prompt_tokens(tokenizer: Any, class_names: Sequence[str],
                        model_config: Any) -> tuple[np.ndarray, np.ndarray]:
    """The class prompts of ``model_config.prompts`` ("single" or "paired", `class_prompts`)
    tokenised for the text tower, padded to the longest prompt and cut at
    ``model_config.text.max_length`` (`text_tokenizer.prompt_tokens`): ids, mask [P, L'] int32.
    Training, evaluation and the benchmark score classes with these same rows."""
    prompts = class_prompts(list(class_names), model_config.get("prompts", "single"))
    return prompt_tokens(tokenizer, prompts, int(model_config.text.max_length))


def l2_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """Rows to unit length; x: [N, D] -> [N, D] float32 (eps keeps the zero vector finite)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps * eps)


class TwoTower(nn.Module):
    """Image tower + text tower + temperature and class-logit scalars.

    image_tower: ``(images [B, H, W, C], train) -> [B, D]`` (e.g. `vision.VisionTower`).
    text_tower: ``(input_ids [B, L], attention_mask [B, L], deterministic) -> [B, D]``
      (e.g. `text.TextTower`); dropout in training needs a "dropout" rng.
    """
    image_tower: nn.Module
    text_tower: nn.Module
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
    max_logit_scale: float = 100.0                 # CLIP's cap: beyond it training destabilises
    class_scale_init: float = math.log(10.0)       # SigLIP: t' = log 10, b = -10, so that the
    class_bias_init: float = -10.0                 # many negatives start with a small loss

    def setup(self):
        const = nn.initializers.constant
        self.log_logit_scale = self.param("log_logit_scale", const(self.logit_scale_init), ())
        self.log_class_scale = self.param("log_class_scale", const(self.class_scale_init), ())
        self.class_bias = self.param("class_bias", const(self.class_bias_init), ())

    def encode_image(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """images: [B, H, W, C] float -> [B, D] float32, unit rows."""
        chex.assert_rank(images, 4)
        return l2_normalize(self.image_tower(images, train=train))

    def encode_text(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray,
                    train: bool = False) -> jnp.ndarray:
        """input_ids, attention_mask: [B, L] int32 -> [B, D] float32, unit rows."""
        chex.assert_rank([input_ids, attention_mask], 2)
        return l2_normalize(self.text_tower(input_ids, attention_mask, deterministic=not train))

    def scalars(self) -> dict[str, jnp.ndarray]:
        """The three learned scalars, exponentiated where stored as logs (float32 [])."""
        # The stored log is clamped after every update (`clamp_logit_scale`, as CLIP clamps its
        # parameter); clipping the value as well caps a checkpoint or init above the cap.
        logit_scale = jnp.exp(jnp.minimum(self.log_logit_scale, math.log(self.max_logit_scale)))
        return {"logit_scale": logit_scale, "class_scale": jnp.exp(self.log_class_scale),
                "class_bias": self.class_bias}

    def __call__(self, images: jnp.ndarray, input_ids: jnp.ndarray, attention_mask: jnp.ndarray,
                 class_ids: jnp.ndarray, class_mask: jnp.ndarray, train: bool = False) -> dict:
        """images [B, H, W, C]; report tokens [B, L]; class-prompt tokens [K, L'] (int32).

        Returns {"image_emb" [B, D], "text_emb" [B, D], "class_emb" [K, D] (unit rows, float32),
        "logit_scale", "class_scale", "class_bias" (float32 scalars)}.
        """
        chex.assert_equal_shape([input_ids, attention_mask])
        chex.assert_equal_shape([class_ids, class_mask])
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {input_ids.shape[0]} reports "
                             "in the batch")
        out = {"image_emb": self.encode_image(images, train),
               "text_emb": self.encode_text(input_ids, attention_mask, train),
               "class_emb": self.encode_text(class_ids, class_mask, train)}
        return {**out, **self.scalars()}


def clamp_logit_scale(params: dict, max_logit_scale: float) -> dict:
    """``params`` with the stored log CLIP temperature clamped to ``log(max_logit_scale)``.

    Applied after each optimizer update, as CLIP clamps its parameter: a log left above the cap
    and only clipped when read would get zero gradient there and never come back down.
    """
    cap = math.log(max_logit_scale)
    return {**params, "log_logit_scale": jnp.minimum(params["log_logit_scale"], cap)}


def assemble_images(image: np.ndarray, heatmaps: np.ndarray | None, in_channels: int,
                    fill: str, channels: str = "stack") -> np.ndarray:
    """The image tower's input [B, H, W, in_channels] float32: ``[x0, extra...]`` on the channel axis.

    image: [B, H, W, 1] float in [0, 1]; heatmaps: [B, H, W, K] float in [0, 1] (fill "heatmaps",
    with 1 + K == in_channels) or None (fill "repeat": the image fills every channel, the
    baseline of the ablation with the same architecture).  Assembled on the host (NumPy): the
    compiled train step then sees the same [B, H, W, in_channels] input whatever the fill, so
    every variant of the ablation runs one program.  ``channels`` (``model.vision.channels``)
    is how the image tower reads these channels (`backbones`: "stack", "replace" — ONE
    heatmap, in_channels 2 — or "add"); the layout here is the same for all three.
    """
    if fill not in FILLS:
        raise ValueError(f"unknown model.vision.fill {fill!r}; valid: {', '.join(FILLS)}")
    backbones.check_channels(channels, in_channels)
    image = np.asarray(image, np.float32)
    if image.ndim != 4 or image.shape[-1] != 1:
        raise ValueError(f"image batch must be [B, H, W, 1] (the X-ray alone; extra channels come "
                         f"from model.vision.fill), got shape {tuple(image.shape)}")
    if fill == "repeat":
        return np.repeat(image, in_channels, axis=-1)
    if heatmaps is None:
        raise ValueError('model.vision.fill is "heatmaps" but the data has no "heatmaps" '
                         "[N, H, W, K] (set data.heatmaps_dir)")
    if 1 + heatmaps.shape[-1] != in_channels:
        raise ValueError(f"model.vision.in_channels is {in_channels} (expected 1 image + "
                         f"{in_channels - 1} heatmaps) but got 1 image + {heatmaps.shape[-1]} "
                         f"heatmap channels = {1 + heatmaps.shape[-1]}")
    if heatmaps.shape[:-1] != image.shape[:-1]:
        raise ValueError(f"heatmaps {tuple(heatmaps.shape)} do not match images "
                         f"{tuple(image.shape)} in [B, H, W]")
    return np.concatenate([image, np.asarray(heatmaps, np.float32)], axis=-1)


def bert_config(text_config: Any, vocab_size: int) -> Any:
    """``model.text``'s shape: the BERT in the checkpoint at ``path`` or of the from-scratch size
    (`text.BertConfig`), or for ``kind`` "clip" the checkpoint's `clip.ClipTextConfig`."""
    return backbones.text_shape(text_config, vocab_size)


def build_two_tower(model_config: Any, text_config: Any) -> TwoTower:
    """`TwoTower` from ``config.model`` ({vision: {...}, text: {pooling, dtype, ...}, embed_dim,
    optional logit_scale_init: the log of the initial CLIP temperature's inverse}).

    text_config: the text tower's shape, e.g. ``bert_config(config.model.text, len(tokenizer))``.
    """
    embed_dim = int(model_config["embed_dim"])
    return TwoTower(
        image_tower=backbones.build_image_tower(model_config["vision"], embed_dim),
        text_tower=backbones.build_text_tower(model_config["text"], text_config, embed_dim),
        logit_scale_init=float(model_config.get("logit_scale_init", math.log(1 / 0.07))))
