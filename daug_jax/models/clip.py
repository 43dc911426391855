"""CLIP in Flax Linen: Hugging Face ``CLIPModel``'s two transformers, and loading its directory.

    vision  pixels [B, H, W, C] -> patch conv (p x p, stride p, no bias) -> [B, n·n, W]
            -> [class token; patches] + position embeddings [1 + n·n, W] -> pre_layrnorm
            -> blocks -> post_layernorm(state of the class token) -> visual_projection  [B, P]
    text    ids [B, L] -> token + position embeddings -> blocks (causal mask)
            -> final_layer_norm -> state at the end-of-text token -> text_projection     [B, P]
    block   x = x + attention(LN1(x));  x = x + fc2(act(fc1(LN2(x))))   (pre-LayerNorm)
            act = quick-GELU x·σ(1.702·x) for OpenAI's checkpoints (``hidden_act``)

Module and parameter names are Hugging Face's, so `hf_name` maps a parameter path to its tensor
in ``model.safetensors`` mechanically: ("vision_model", "encoder", "layers_0", "self_attn",
"q_proj", "kernel") -> "vision_model.encoder.layers.0.self_attn.q_proj.weight" (transposed).

Position tables and the patch kernel take their sizes from the input; where they differ from
the checkpoint, `_fit` resamples the image grid bicubically and the text positions linearly,
and adapts a 3-channel patch kernel.  NumPy only: no torch, no network.  ``dtype`` as in the
BERT tower; ``remat`` recomputes each block in the backward pass.  CLIP has no dropout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from daug_jax.models.text import CONFIG_FILE, WEIGHTS_FILE, require_files
from daug_jax.models.vision import adapt_stem_kernel

PREPROCESSOR_FILE = "preprocessor_config.json"
# OpenAI's pixel statistics, CLIPImageProcessor's defaults: for a checkpoint without its own.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


# ----------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class _TowerConfig:
    """The fields ``CLIPVisionConfig`` and ``CLIPTextConfig`` share (defaults: Hugging Face's)."""
    num_hidden_layers: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, d: dict, key: str) -> Any:
        """The tower config ``key`` of ``config.json`` (unknown keys ignored), checked."""
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


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(_TowerConfig):
    """``CLIPVisionConfig`` (defaults: ViT-B/32 at 224 px)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32


@dataclasses.dataclass(frozen=True)
class ClipTextConfig(_TowerConfig):
    """``CLIPTextConfig``."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
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
        """From a Hugging Face ``config.json`` dict of ``model_type`` "clip"."""
        if d.get("model_type", "clip") != "clip":
            raise ValueError(f"unsupported model_type {d['model_type']!r} (expected 'clip': a "
                             "CLIPModel checkpoint with both towers)")
        proj = int(d.get("projection_dim") or 512)  # CLIPModel projects both towers to this
        towers = {key: sub.from_dict({**(d.get(key) or {}), "projection_dim": proj}, key)
                  for key, sub in (("text_config", ClipTextConfig),
                                   ("vision_config", ClipVisionConfig))}
        return cls(**towers, projection_dim=proj,
                   logit_scale_init_value=float(d.get("logit_scale_init_value", 2.6592)))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ClipConfig:
        """Reads ``<path>/config.json`` (``path``: the checkpoint directory)."""
        path = require_files(path, (CONFIG_FILE,), "CLIP")
        with open(os.path.join(path, CONFIG_FILE)) as f:
            return cls.from_dict(json.load(f))


# ----------------------------------------------------------------------------- blocks
def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch: E[x²] − E[x]² loses digits when a mean dwarfs the spread.
    return nn.LayerNorm(eps, dtype=jnp.float32, use_fast_variance=False, name=name)


class ClipAttention(nn.Module):
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: [B, L, W] float32, mask: [B, 1, L, L] bool (True: attend) or None -> [B, L, W]."""
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
        return x + ClipMLP(cfg, self.dtype, name="mlp")(y)


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
    (Hugging Face ``get_image_features``).  With ``image_mean`` / ``image_std`` (3 floats each)
    pixels in [0, 1] are normalised here: per channel for C = 3, else by the means of the three
    (an adapted stem holds the mean RGB filter in every channel).  ``train`` is unused."""
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
        embed = functools.partial(nn.Embed, features=self.config.hidden_size,
                                  embedding_init=nn.initializers.normal(0.02))
        x = embed(self.config.vocab_size, name="token_embedding")(input_ids)
        pos = embed(self.max_length, name="position_embedding")(jnp.arange(input_ids.shape[1]))
        return x + pos[None]


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B, L] -> [B] int32: where the text tower pools, by Hugging Face's rule: the first
    ``eos_token_id`` in the row (position 0 if none), or the largest id for configs older than
    that rule (``eos_token_id == 2``; OpenAI's vocabulary puts end-of-text last)."""
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
        """input_ids, attention_mask: [B, L] int32 -> pooled [B, W] float32 (end-of-text)."""
        cfg, length = self.config, input_ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"CLIP text tower: sequence length {length} exceeds its "
                             f"{self.max_length} positions (model.text.max_length)")
        x = ClipTextEmbeddings(cfg, self.max_length, name="embeddings")(input_ids)
        # Causal and padding masks together, as Hugging Face combines them.
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None, None] & (attention_mask > 0)[:, None, None, :]
        x = ClipEncoder(cfg, self.dtype, self.remat, name="encoder")(x, mask)
        x = _layer_norm(cfg.layer_norm_eps, "final_layer_norm")(x)
        return x[jnp.arange(x.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]


class ClipTextModel(nn.Module):
    """input_ids, attention_mask [B, L] int32 -> text features [B, projection_dim] float32, not
    normalised (``get_text_features``); L <= ``max_length`` (None: the checkpoint's)."""
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


# ----------------------------------------------------------------------------- resampling
def _cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] weights of torch's ``interpolate(mode="bicubic", align_corners=False)``:
    Keys' kernel with a = -0.75 (not PIL's -0.5), source (i + 0.5)·n_in/n_out − 0.5 unclamped,
    the four taps clamped to the border."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    t = src - base

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    m = np.zeros((n_out, n_in))
    for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
        np.add.at(m, (np.arange(n_out), np.clip(base + offset, 0, n_in - 1).astype(int)), w)
    return m


def resample_image_posemb(posemb: Any, new_grid: int) -> np.ndarray:
    """posemb [1 + g·g, D] (class token first, then the g x g grid row by row) -> [1 + n·n, D]
    float32: the grid resampled to ``new_grid`` = n with torch's bicubic kernel (as Hugging
    Face's ``interpolate_pos_encoding``), the class token's position kept."""
    posemb = np.asarray(posemb, np.float64)
    g = math.isqrt(posemb.shape[0] - 1)
    if posemb.ndim != 2 or g * g != posemb.shape[0] - 1:
        raise ValueError(f"image position embeddings must be [1 + g*g, D], got {posemb.shape}")
    if new_grid < 1:
        raise ValueError(f"new_grid must be >= 1, got {new_grid}")
    w = _cubic_matrix(g, new_grid)
    grid = np.einsum("ia,jb,abd->ijd", w, w, posemb[1:].reshape(g, g, -1))
    return np.concatenate([posemb[:1], grid.reshape(new_grid * new_grid, -1)]).astype(np.float32)


def resample_text_posemb(posemb: Any, new_length: int) -> np.ndarray:
    """posemb [L, D] -> [new_length, D] float32: when longer (the authors' 77 -> 154), torch's
    ``interpolate(mode="linear", align_corners=False)`` (half-pixel centres, ends held), else
    the first rows (what the checkpoint computes for a text that long)."""
    posemb = np.asarray(posemb, np.float32)
    n_in, rows = posemb.shape[0], np.arange(new_length)
    if new_length <= n_in:
        return posemb[:new_length]
    src = np.maximum((rows + 0.5) * (n_in / new_length) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    w = np.zeros((new_length, n_in))
    np.add.at(w, (rows, lo), 1 - (src - lo))
    np.add.at(w, (rows, np.minimum(lo + 1, n_in - 1)), src - lo)
    return (w @ posemb.astype(np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------- checkpoints
def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of ``<path>/model.safetensors`` as NumPy (name -> array)."""
    return load_file(os.path.join(require_files(path, (WEIGHTS_FILE,), "CLIP"), WEIGHTS_FILE))


def pixel_stats(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(image_mean, image_std), 3 floats each, from ``preprocessor_config.json`` when present."""
    file = os.path.join(os.fspath(path), PREPROCESSOR_FILE)
    if not os.path.isfile(file):
        return CLIP_MEAN, CLIP_STD
    with open(file) as f:
        cfg = json.load(f)
    mean, std = cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{file}: image_mean and image_std must have 3 entries each")
    return tuple(map(float, mean)), tuple(map(float, std))


def hf_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> the Hugging Face tensor name (see the module docstring)."""
    *modules, leaf = path
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join([*modules, leaf]).replace(".layers_", ".layers.")


def _fit(name: str, value: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    """The checkpoint's ``value`` fitted to the tower's parameter ``shape``."""
    if value.shape == shape:
        return value
    if name.endswith("vision_model.embeddings.position_embedding.weight"):
        return resample_image_posemb(value, math.isqrt(shape[0] - 1))
    if name.endswith("text_model.embeddings.position_embedding.weight"):
        return resample_text_posemb(value, shape[0])
    if name.endswith("patch_embedding.weight") and value.shape[:2] + value.shape[3:] == \
            shape[:2] + shape[3:]:
        if value.shape[2] != 3:
            raise ValueError(
                f"{where}: the patch embedding takes {value.shape[2]} input channels (a stem "
                f"already adapted from RGB), but this image tower reads {shape[2]}: the heatmap "
                f"count (model.vision.in_channels = 1 + heatmaps, model.vision.channels) must "
                f"give {value.shape[2]}")
        return adapt_stem_kernel(value, shape[2])
    raise ValueError(f"{where}: tensor {name!r} has shape {value.shape} (as Flax), "
                     f"the model expects {shape}")


def load_tree(tensors: dict[str, np.ndarray], expected: Any, where: str = "checkpoint") -> dict:
    """The parameter tree shaped like ``expected`` (arrays or ShapeDtypeStructs of HF-named
    modules) filled from ``tensors``, float32 NumPy leaves.  KeyError names a missing tensor,
    ValueError a shape that cannot be fitted; ``where`` (the checkpoint path) starts each."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
    out = []
    for path, leaf in leaves:
        keys = tuple(k.key for k in path)
        name = hf_name(keys)
        if name not in tensors:
            raise KeyError(f"{where}: tensor {name!r} not found in {WEIGHTS_FILE}")
        value = np.asarray(tensors[name], np.float32)
        if keys[-1] == "kernel":  # torch Linear [out, in], Conv [out, in, kh, kw] -> Flax
            value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
        out.append(_fit(name, value, tuple(leaf.shape), where))
    return jax.tree_util.tree_unflatten(treedef, out)


def load_hf_clip(path: str | os.PathLike, *, image_size: int | None = None,
                 max_length: int | None = None) -> tuple[Callable, Callable, dict, Any]:
    """Loads a Hugging Face CLIP directory (config.json, model.safetensors, tokenizer files).

    Returns ``(image_fn, text_fn, params {"vision", "text"}, tokenizer)``, both jitted:
    ``image_fn(params, pixels [B, S, S, 3] float32, normalised)`` -> [B, P] float32 and
    ``text_fn(params, input_ids, attention_mask [B, L] int32)`` -> [B, P] float32, Hugging
    Face's unnormalised features; S = ``image_size``, L <= ``max_length`` (None: the
    checkpoint's).  FileNotFoundError names a missing directory or file.
    """
    path = require_files(path, kind="CLIP")
    config = ClipConfig.from_json(path)
    vcfg, tcfg = config.vision_config, config.text_config
    size = int(image_size or vcfg.image_size)
    vision = ClipVisionModel(vcfg)
    text = ClipTextModel(tcfg, int(max_length or tcfg.max_position_embeddings))
    key, ids = jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
    pixels = jnp.zeros((1, size, size, vcfg.num_channels))
    expected = {"vision": jax.eval_shape(vision.init, key, pixels)["params"],
                "text": jax.eval_shape(text.init, key, ids, ids)["params"]}
    tensors = read_tensors(path)
    params = jax.tree.map(jnp.asarray, {k: load_tree(tensors, v, path)
                                        for k, v in expected.items()})
    import transformers  # slow to import; only the tokenizer needs it

    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_fn = jax.jit(lambda p, x: vision.apply({"params": p["vision"]}, x))
    text_fn = jax.jit(lambda p, i, m: text.apply({"params": p["text"]}, i, m))
    return image_fn, text_fn, params, tokenizer
