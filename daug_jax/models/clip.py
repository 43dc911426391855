"""CLIP in Flax Linen: Hugging Face ``CLIPModel``'s two transformers, loadable from its directory.

    vision  pixels [B, H, W, C] -> patch conv (p x p, stride p, no bias) -> [B, n·n, W]
            -> [class token; patches] + position embeddings [1 + n·n, W] -> pre_layrnorm
            -> blocks -> post_layernorm(state of the class token) -> visual_projection  [B, P]
    text    ids [B, L] -> token + position embeddings -> blocks (causal mask)
            -> final_layer_norm -> state at the end-of-text token -> text_projection     [B, P]
    block   x = x + attention(LN1(x));  x = x + fc2(act(fc1(LN2(x))))   (pre-LayerNorm)
            act = quick-GELU x·σ(1.702·x) for OpenAI's checkpoints (``hidden_act``)

Module and parameter names are Hugging Face's, so `clip_weights.load_tree` maps them to the
checkpoint's tensors by rule.  The position-embedding tables take their size from the input
(image grid) or from ``max_length`` (text), and the patch kernel its input channels from the
image: a checkpoint is fitted to them when loaded (resampled, adapted; see `clip_weights`).

Mixed precision as in the BERT tower: ``dtype`` is the matmul compute dtype; parameters,
the residual stream, LayerNorm and softmax stay float32.  ``remat`` recomputes each block's
activations in the backward pass (`nn.remat`): memory for compute, at ViT-B sizes and long
texts.  CLIP has no dropout (its checkpoints set ``attention_dropout`` 0; others are refused).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from daug_jax.models import clip_weights
from daug_jax.models.clip_weights import (  # noqa: F401  (public here: the issue's contract)
    resample_image_posemb, resample_text_posemb)

ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


# ----------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    """``CLIPVisionConfig`` fields (defaults: Hugging Face's, i.e. ViT-B/32 at 224 px)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    projection_dim: int = 512


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """``CLIPTextConfig`` fields (defaults: Hugging Face's)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    projection_dim: int = 512
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """``CLIPConfig``: the two towers' shapes and the joint space's width ``projection_dim``."""
    text_config: ClipTextConfig
    vision_config: ClipVisionConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: dict) -> ClipConfig:
        """From a Hugging Face ``config.json`` dict of ``model_type`` "clip" (unknown keys ignored)."""
        if d.get("model_type", "clip") != "clip":
            raise ValueError(f"unsupported model_type {d['model_type']!r} (expected 'clip': a "
                             "CLIPModel checkpoint with both towers)")
        proj = int(d.get("projection_dim") or 512)
        towers = {}
        for key, sub in (("text_config", ClipTextConfig), ("vision_config", ClipVisionConfig)):
            given = {**(d.get(key) or {}), "projection_dim": proj}  # CLIPModel projects to this
            towers[key] = _sub_config(sub, given, key)
        return cls(**towers, projection_dim=proj,
                   logit_scale_init_value=float(d.get("logit_scale_init_value", 2.6592)))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ClipConfig:
        """Reads ``<path>/config.json`` (``path``: the checkpoint directory)."""
        path = clip_weights.require_files(os.fspath(path), (clip_weights.CONFIG_FILE,))
        with open(os.path.join(path, clip_weights.CONFIG_FILE)) as f:
            return cls.from_dict(json.load(f))


def _sub_config(cls: type, d: dict, key: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in d.items() if k in fields and v is not None}
    for name in ("image_size", "patch_size"):  # HF allows (h, w); these towers are square
        if isinstance(values.get(name), (list, tuple)):
            h, w = values[name]
            if h != w:
                raise ValueError(f"{key}.{name} {values[name]} is not square")
            values[name] = h
    if isinstance(values.get("eos_token_id"), (list, tuple)):
        raise ValueError(f"{key}.eos_token_id {values['eos_token_id']}: one id expected")
    config = cls(**values)
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"unsupported {key}.hidden_act {config.hidden_act!r}; "
                         f"valid: {sorted(ACTIVATIONS)}")
    if config.attention_dropout:
        raise ValueError(f"{key}.attention_dropout {config.attention_dropout}: these towers "
                         "apply no dropout")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"{key}.hidden_size {config.hidden_size} is not divisible by "
                         f"num_attention_heads {config.num_attention_heads}")
    return config


# ----------------------------------------------------------------------------- blocks
def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it: the parity test holds to 1e-4 either way, but
    # E[x²] − E[x]² loses digits when a channel's mean is large against its spread.
    return nn.LayerNorm(eps, dtype=jnp.float32, use_fast_variance=False, name=name)


class ClipAttention(nn.Module):
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: [B, L, W] float32; mask: [B, 1, L, L] bool (True = may attend) or None -> [B, L, W]."""
        b, length, width = x.shape
        head = width // self.num_heads
        q, k, v = (nn.Dense(width, dtype=self.dtype, name=n)(x).reshape(b, length, -1, head)
                   for n in ("q_proj", "k_proj", "v_proj"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head ** -0.5
        if mask is not None:  # the most negative float, not -inf: a masked weight is exactly 0
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, width)
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(out).astype(jnp.float32)


class ClipLayer(nn.Module):
    """One pre-LayerNorm block; x: [B, L, W] float32 -> [B, L, W] float32."""
    config: Any  # ClipVisionConfig or ClipTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        y = _layer_norm(cfg.layer_norm_eps, "layer_norm1")(x)
        x = x + ClipAttention(cfg.num_attention_heads, self.dtype, name="self_attn")(y, mask)
        y = _layer_norm(cfg.layer_norm_eps, "layer_norm2")(x)
        x = x + ClipMLP(cfg, self.dtype, name="mlp")(y)
        return x


class ClipMLP(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, W] -> fc1 [B, L, I] -> act -> fc2 -> [B, L, W] float32."""
        cfg = self.config
        h = ACTIVATIONS[cfg.hidden_act](nn.Dense(cfg.intermediate_size, dtype=self.dtype,
                                                 name="fc1")(x))
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(h).astype(jnp.float32)


class ClipEncoder(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: [B, L, W] float32 -> [B, L, W] float32 after ``num_hidden_layers`` blocks."""
        layer = nn.remat(ClipLayer) if self.remat else ClipLayer
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
        return x


# ----------------------------------------------------------------------------- vision
def patch_grid(height: int, width: int, patch_size: int) -> int:
    """Patches per side n of a square image; ValueError for any other shape."""
    if height != width:
        raise ValueError(f"CLIP image tower: images must be square, got {height} x {width}")
    if height % patch_size:
        raise ValueError(f"CLIP image tower: image size {height} is not divisible by the "
                         f"checkpoint's patch size {patch_size}")
    return height // patch_size


class ClipVisionEmbeddings(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: [B, H, W, C] -> [B, 1 + n·n, W] float32 (class token first)."""
        cfg, b = self.config, pixels.shape[0]
        n = patch_grid(pixels.shape[1], pixels.shape[2], cfg.patch_size)
        p, width = cfg.patch_size, cfg.hidden_size
        patches = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, name="patch_embedding")(pixels.astype(self.dtype))
        cls = self.param("class_embedding", nn.initializers.normal(width ** -0.5), (width,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)),
                             patches.reshape(b, n * n, width).astype(jnp.float32)], axis=1)
        pos = nn.Embed(1 + n * n, width, name="position_embedding")(jnp.arange(1 + n * n))
        return x + pos[None]


class ClipVisionTransformer(nn.Module):
    config: ClipVisionConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: [B, H, W, C] -> pooled [B, W] float32 (post-LayerNorm of the class token)."""
        eps = self.config.layer_norm_eps
        x = ClipVisionEmbeddings(self.config, self.dtype, name="embeddings")(pixels)
        x = _layer_norm(eps, "pre_layrnorm")(x)  # sic: Hugging Face's spelling
        x = ClipEncoder(self.config, self.dtype, self.remat, name="encoder")(x, None)
        return _layer_norm(eps, "post_layernorm")(x[:, 0])


class ClipVisionModel(nn.Module):
    """pixels [B, H, W, C] -> image features [B, projection_dim] float32, not normalised
    (Hugging Face ``get_image_features``).

    With ``image_mean`` / ``image_std`` (3 floats, the checkpoint's preprocessor), pixels are in
    [0, 1] and normalised here: per channel for C = 3, else every channel by the means of the
    three (the rule of `vision.adapt_stem_kernel`, which gives every channel the mean RGB
    filter).  Without them pixels come normalised.  ``train`` is accepted for the image-tower
    interface; CLIP has neither dropout nor batch statistics.
    """
    config: ClipVisionConfig
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, pixels: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(pixels, 4)
        if self.image_mean is not None:
            mean, std = np.asarray(self.image_mean), np.asarray(self.image_std)
            if pixels.shape[-1] != 3:
                mean, std = mean.mean(), std.mean()
            pixels = (pixels.astype(jnp.float32) - mean) / std
        pooled = ClipVisionTransformer(self.config, self.dtype, self.remat,
                                       name="vision_model")(pixels)
        proj = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                        name="visual_projection")
        return proj(pooled).astype(jnp.float32)


# ----------------------------------------------------------------------------- text
class ClipTextEmbeddings(nn.Module):
    config: ClipTextConfig
    max_length: int

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, L] int32 (L <= max_length) -> [B, L, W] float32."""
        width = self.config.hidden_size
        init = nn.initializers.normal(0.02)
        x = nn.Embed(self.config.vocab_size, width, embedding_init=init,
                     name="token_embedding")(input_ids)
        pos = nn.Embed(self.max_length, width, embedding_init=init, name="position_embedding")
        return x + pos(jnp.arange(input_ids.shape[1]))[None]


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B, L] -> [B] int32: where the text tower pools, by Hugging Face's rule.

    The first ``eos_token_id`` in the row; configs written before that rule existed carry
    ``eos_token_id == 2`` and pool at the largest id instead (OpenAI's vocabulary puts
    end-of-text last).  A row without the token pools at position 0, as argmax does there.
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class ClipTextTransformer(nn.Module):
    config: ClipTextConfig
    max_length: int
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids, attention_mask: [B, L] int32 -> pooled [B, W] float32 (end-of-text state)."""
        cfg, length = self.config, input_ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"CLIP text tower: sequence length {length} exceeds its "
                             f"{self.max_length} positions (model.text.max_length)")
        x = ClipTextEmbeddings(cfg, self.max_length, name="embeddings")(input_ids)
        # Causal and padding masks together, as Hugging Face combines them; the pooled
        # end-of-text state sees the same keys under either alone.
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None, None] & (attention_mask > 0)[:, None, None, :]
        x = ClipEncoder(cfg, self.dtype, self.remat, name="encoder")(x, mask)
        x = _layer_norm(cfg.layer_norm_eps, "final_layer_norm")(x)
        return x[jnp.arange(x.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]


class ClipTextModel(nn.Module):
    """input_ids, attention_mask [B, L] int32 -> text features [B, projection_dim] float32, not
    normalised (Hugging Face ``get_text_features``).

    ``max_length``: rows of the position table (None: the checkpoint's
    ``max_position_embeddings``); L may be shorter.  ``deterministic`` is accepted for the
    text-tower interface (no dropout).
    """
    config: ClipTextConfig
    max_length: int | None = None
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        chex.assert_rank([input_ids, attention_mask], 2)
        chex.assert_equal_shape([input_ids, attention_mask])
        max_length = self.max_length or self.config.max_position_embeddings
        pooled = ClipTextTransformer(self.config, max_length, self.dtype, self.remat,
                                     name="text_model")(input_ids, attention_mask)
        proj = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                        name="text_projection")
        return proj(pooled).astype(jnp.float32)


# ----------------------------------------------------------------------------- loading
def load_hf_clip(path: str | os.PathLike, *, image_size: int | None = None,
                 max_length: int | None = None) -> tuple[Callable, Callable, dict, Any]:
    """Loads a Hugging Face CLIP directory (config.json, model.safetensors, tokenizer files).

    Returns ``(image_fn, text_fn, params, tokenizer)``, both functions jitted:
    ``image_fn(params, pixels)``: pixels [B, S, S, 3] float32, NHWC, already normalised with the
    checkpoint's mean/std, S = ``image_size`` -> [B, P] float32 = ``get_image_features``;
    ``text_fn(params, input_ids, attention_mask)``: [B, L] int32, L <= ``max_length`` -> [B, P]
    float32 = ``get_text_features``.  Neither is L2-normalised.  ``image_size`` / ``max_length``
    (None: the checkpoint's) resample the position embeddings: bicubic on the image grid as
    ``interpolate_pos_encoding`` does, linear for longer texts.  params: {"vision", "text"}.
    FileNotFoundError names a missing directory or file.
    """
    path = clip_weights.require_files(os.fspath(path))
    config = ClipConfig.from_json(path)
    vcfg, tcfg = config.vision_config, config.text_config
    size = int(image_size or vcfg.image_size)
    patch_grid(size, size, vcfg.patch_size)
    vision = ClipVisionModel(vcfg)
    text = ClipTextModel(tcfg, int(max_length or tcfg.max_position_embeddings))
    key, ids = jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
    pixels = jnp.zeros((1, size, size, vcfg.num_channels))
    expected = {"vision": jax.eval_shape(vision.init, key, pixels)["params"],
                "text": jax.eval_shape(text.init, key, ids, ids)["params"]}
    tensors = clip_weights.read_tensors(path)
    params = jax.tree.map(jnp.asarray, {k: clip_weights.load_tree(tensors, v, path)
                                        for k, v in expected.items()})
    import transformers  # slow to import; only the tokenizer needs it

    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_fn = jax.jit(lambda p, x: vision.apply({"params": p["vision"]}, x))
    text_fn = jax.jit(lambda p, i, m: text.apply({"params": p["text"]}, i, m))
    return image_fn, text_fn, params, tokenizer
