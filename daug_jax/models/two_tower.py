"""The two-tower model: images and reports in one embedding space, class prompts as classifiers.

    images [B, H, W, C]     -> image tower -> L2-normalise -> image_emb [B, D]
    report tokens [B, L]    -> text tower  -> L2-normalise -> text_emb  [B, D]
    class prompts [K, L]    -> text tower  -> L2-normalise -> class_emb [K, D]

plus three learned scalars: the CLIP temperature (stored as its log) and the SigLIP-style scale
and bias of the image-class logits (the losses live in `daug_jax.losses`).  The towers:
``model.vision.kind`` "resnet" (`vision.VisionTower`) or "clip" (`clip.ClipVisionModel`), read
per ``model.vision.channels`` (`vision.ChannelModes`); ``model.text.kind`` "bert"
(`text.TextTower`) or "clip" (`clip.ClipTextModel`), from scratch or from ``path``.  CLIP
towers keep the checkpoint's projection: ``model.embed_dim`` must be its ``projection_dim``.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from daug_jax.models import clip, vision
from daug_jax.models import text as text_lib

# The switches of ``config.model`` (daug_jax.config checks configs against these):
VISION_KINDS = ("resnet", "clip")  # model.vision.kind
TEXT_KINDS = ("bert", "clip")      # model.text.kind
FILLS = ("repeat", "heatmaps")     # model.vision.fill: what fills the image tower's extra channels


def l2_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """Rows to unit length; x: [N, D] -> [N, D] float32 (eps keeps a zero row finite)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps * eps)


class TwoTower(nn.Module):
    """Image tower ``(images [B, H, W, C], train) -> [B, D]`` + text tower ``(input_ids [B, L],
    attention_mask [B, L], deterministic) -> [B, D]`` (training dropout needs a "dropout" rng)
    + temperature and class-logit scalars."""
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
        # Also clipped on read (updates are clamped by `clamp_logit_scale`): an init above the cap.
        logit_scale = jnp.exp(jnp.minimum(self.log_logit_scale, math.log(self.max_logit_scale)))
        return {"logit_scale": logit_scale, "class_scale": jnp.exp(self.log_class_scale),
                "class_bias": self.class_bias}

    def __call__(self, images: jnp.ndarray, input_ids: jnp.ndarray, attention_mask: jnp.ndarray,
                 class_ids: jnp.ndarray, class_mask: jnp.ndarray, train: bool = False) -> dict:
        """images [B, H, W, C]; report tokens [B, L]; class-prompt tokens [K, L'] (int32) ->
        {"image_emb" [B, D], "text_emb" [B, D], "class_emb" [K, D] (unit rows, float32),
        "logit_scale", "class_scale", "class_bias" (float32 scalars)}."""
        chex.assert_equal_shape([input_ids, attention_mask])
        chex.assert_equal_shape([class_ids, class_mask])
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {input_ids.shape[0]} reports "
                             "in the batch")
        return {"image_emb": self.encode_image(images, train),
                "text_emb": self.encode_text(input_ids, attention_mask, train),
                "class_emb": self.encode_text(class_ids, class_mask, train), **self.scalars()}


def clamp_logit_scale(params: dict, max_logit_scale: float) -> dict:
    """``params`` with the stored log CLIP temperature clamped to ``log(max_logit_scale)`` after
    each update, as CLIP does: a log only clipped when read gets no gradient to come back down."""
    cap = math.log(max_logit_scale)
    return {**params, "log_logit_scale": jnp.minimum(params["log_logit_scale"], cap)}


# ----------------------------------------------------------------------------- towers
def _clip_path(config: Any, where: str) -> str:
    if not config.path:
        raise ValueError(f"{where}.kind is 'clip': set {where}.path to a local Hugging Face CLIP "
                         "checkpoint directory")
    return config.path


def _check_embed_dim(embed_dim: int, projection_dim: int, path: str) -> None:
    if embed_dim != projection_dim:
        raise ValueError(f"model.embed_dim is {embed_dim} but the CLIP checkpoint {path} projects "
                         f"to {projection_dim}: set model.embed_dim={projection_dim}")


def build_image_tower(config: Any, embed_dim: int) -> nn.Module:
    """``model.vision``'s tower: ``(images [B, H, W, in_channels], train) -> [B, embed_dim]``
    float32, not normalised."""
    dtype, in_channels = jnp.dtype(config.dtype), int(config.in_channels)
    if config.kind == "clip":
        path = _clip_path(config, "model.vision")
        shape = clip.ClipConfig.from_json(path)
        _check_embed_dim(embed_dim, shape.projection_dim, path)
        (mean, std), remat = clip.pixel_stats(path), bool(config.remat)

        def make(c: int, name: str | None = None) -> nn.Module:  # channels come from the input
            return clip.ClipVisionModel(shape.vision_config, mean, std, dtype, remat, name=name)
    else:
        resnet, norm = vision.resnet_config(config.preset, **dict(config.resnet or {})), config.norm

        def make(c: int, name: str | None = None) -> nn.Module:
            return vision.VisionTower(c, int(embed_dim), resnet, norm, dtype, name=name)
    if config.channels == "stack":
        return make(in_channels)
    return vision.ChannelModes(make, in_channels, config.channels)


def text_shape(config: Any, vocab_size: int) -> Any:
    """``model.text``'s shape: a `text.BertConfig` (the checkpoint's at ``path``, or the
    from-scratch size) or, for kind "clip", the checkpoint's `clip.ClipTextConfig`."""
    if config.kind == "clip":
        return clip.ClipConfig.from_json(_clip_path(config, "model.text")).text_config
    if config.path:
        return text_lib.BertConfig.from_json(config.path)
    return text_lib.BertConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=config.max_length,
        hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout)


def build_text_tower(config: Any, shape: Any, embed_dim: int) -> nn.Module:
    """The text tower of ``model.text`` with ``shape`` from `text_shape`:
    ``(input_ids [B, L], attention_mask [B, L], deterministic) -> [B, embed_dim]`` float32."""
    dtype = jnp.dtype(config.dtype)
    if config.kind == "bert":
        return text_lib.TextTower(shape, embed_dim, pooling=config.pooling, dtype=dtype)
    _check_embed_dim(embed_dim, shape.projection_dim, config.path)
    return clip.ClipTextModel(shape, int(config.max_length), dtype, bool(config.remat))


def build_two_tower(model_config: Any, text_config: Any) -> TwoTower:
    """`TwoTower` from ``config.model``; text_config: `text_shape`'s for ``model.text``."""
    embed_dim = int(model_config["embed_dim"])
    return TwoTower(
        image_tower=build_image_tower(model_config["vision"], embed_dim),
        text_tower=build_text_tower(model_config["text"], text_config, embed_dim),
        logit_scale_init=float(model_config["logit_scale_init"]))


def _fill_clip(tree: dict, tensors: dict, path: str) -> dict:
    """Every CLIP vision subtree of ``tree`` ({"vision_model", "visual_projection"}) loaded."""
    if "vision_model" in tree:
        return clip.load_tree(tensors, tree, path)
    return {k: _fill_clip(v, tensors, path) if isinstance(v, dict) else v for k, v in tree.items()}


def load_pretrained(params: dict, model_config: Any, model: Any) -> dict:
    """``params`` of a `TwoTower` with its pretrained towers' weights (NumPy float32): the text
    tower's (BERT encoder or whole CLIP tower) and every CLIP image tower's ("add" has two);
    ``params`` itself when none is pretrained."""
    vision_config, text = model_config["vision"], model_config["text"]
    out = dict(params)
    if text.path:
        if text.kind == "clip":
            out["text_tower"] = clip.load_tree(clip.read_tensors(text.path),
                                               params["text_tower"], text.path)
        else:
            encoder = text_lib.load_bert_params(text.path, model.text_tower.config)
            out["text_tower"] = {**params["text_tower"], "encoder": encoder}
    if vision_config.kind == "clip":
        path = _clip_path(vision_config, "model.vision")
        out["image_tower"] = _fill_clip(params["image_tower"], clip.read_tensors(path), path)
    return out if any(out[k] is not params[k] for k in out) else params
