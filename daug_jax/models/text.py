"""The text tower: a BERT encoder in Flax Linen and Hugging Face checkpoint loading.

The encoder follows the original post-LayerNorm BERT exactly so that a Hugging Face ``BertModel``
checkpoint (``model.safetensors``) loads into it and reproduces its last hidden state:

    ids [B, L] -> word + position + token-type embeddings -> LayerNorm -> dropout      x: [B, L, H]
    repeat num_hidden_layers times:
        x = LayerNorm(x + dropout(Dense(self_attention(x, mask))))
        x = LayerNorm(x + dropout(Dense(gelu(Dense(x)))))                 FFN width I, exact GELU

``TextTower`` pools the hidden states ([CLS] token or masked mean) and projects to the joint
embedding space. Normalisation is left to the two-tower model, which owns the temperatures.
The WordPiece tokenisers are in `daug_jax.models.text_tokenizer` (re-exported here).

Mixed precision: ``dtype`` is the compute dtype of the matmuls; parameters are always float32 and the
residual stream, LayerNorm and softmax stay float32, because bfloat16 has too few mantissa bits for the
variance of LayerNorm and for attention logits that differ by small amounts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from daug_jax.models.text_tokenizer import (  # noqa: F401  (re-exported: callers use text.<name>)
    SPECIAL_TOKENS, prompt_tokens, tokenize, train_wordpiece_tokenizer)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT encoder; field names follow Hugging Face ``config.json``."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        """Builds a config from a Hugging Face BERT ``config.json`` dict (unknown keys are ignored)."""
        # Variants with a different architecture would load without error but compute something else.
        checks = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
        for key, supported in checks.items():
            if d.get(key, supported) != supported:
                raise ValueError(f"unsupported {key} {d[key]!r} in BERT config (expected {supported!r})")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in d]
        if missing:
            raise KeyError(f"BERT config is missing required key(s): {', '.join(missing)}")
        return cls(**{n: d[n] for n in fields if n in d and d[n] is not None})

    @classmethod
    def from_json(cls, path_or_dir: str | os.PathLike) -> BertConfig:
        """Reads ``config.json`` (``path_or_dir`` is the file or the checkpoint directory)."""
        path = os.fspath(path_or_dir)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BERT config file not found: {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))


def small_config(vocab_size: int) -> BertConfig:
    """A BERT small enough to train from scratch on 2 CPU cores in minutes."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=128,
    )


# ----------------------------------------------------------------------------- model


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, deterministic: bool) -> jax.Array:
        """input_ids: [B, L] int32 -> [B, L, H] float32."""
        cfg, length = self.config, input_ids.shape[1]
        init = nn.initializers.normal(0.02)  # BERT's initializer_range

        def embed(n, name):
            return nn.Embed(n, cfg.hidden_size, embedding_init=init, name=name)

        x = embed(cfg.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(length))[None]
        # A single segment everywhere: token type 0, as Hugging Face does when token_type_ids is omitted.
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(input_ids))
        x = nn.LayerNorm(cfg.layer_norm_eps, name="LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertLayer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        """x: [B, L, H] float32, mask: [B, L] bool (True = real token) -> [B, L, H] float32."""
        cfg = self.config
        b, length, h = x.shape
        heads, head_dim = cfg.num_attention_heads, h // cfg.num_attention_heads

        def dense(features, name):
            init = nn.initializers.normal(0.02)
            return nn.Dense(features, dtype=self.dtype, kernel_init=init, name=name)

        def layer_norm(y, name):
            return nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32, name=name)(y)

        def dropout(y):
            return nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)

        q, k, v = (dense(h, n)(x).reshape(b, length, heads, head_dim) for n in ("query", "key", "value"))
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        # Padded keys get the most negative float instead of an additive bias, so no overflow to -inf
        # and their weight is exactly 0: real tokens never see what the padding contains.
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)  # [B, heads, L, L]
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bnqk,bknd->bqnd", probs.astype(self.dtype), v).reshape(b, length, h)
        x = layer_norm(x + dropout(dense(h, "attention_output")(context)), "attention_norm")

        ffn = jax.nn.gelu(dense(cfg.intermediate_size, "intermediate")(x), approximate=False)
        return layer_norm(x + dropout(dense(h, "output")(ffn)), "output_norm")


def _check_tokens(input_ids: jax.Array, attention_mask: jax.Array, max_length: int) -> None:
    chex.assert_rank(input_ids, 2)
    chex.assert_equal_shape([input_ids, attention_mask])
    chex.assert_type([input_ids, attention_mask], int)
    if input_ids.shape[1] > max_length:
        raise ValueError(
            f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings {max_length}"
        )


class BertEncoder(nn.Module):
    """BERT encoder; ``dtype`` is the matmul compute dtype, parameters stay float32."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        """input_ids, attention_mask: [B, L] int32 -> last hidden state [B, L, H] float32.

        ``deterministic=False`` applies dropout and needs a ``"dropout"`` PRNG key in ``apply``.
        """
        _check_tokens(input_ids, attention_mask, self.config.max_position_embeddings)
        x = BertEmbeddings(self.config, name="embeddings")(input_ids, deterministic)
        mask = attention_mask > 0
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(x, mask, deterministic)
        return x.astype(jnp.float32)


class TextTower(nn.Module):
    """BERT encoder + pooling + linear projection to the joint space (not normalised)."""

    config: BertConfig
    embed_dim: int
    pooling: str = "cls"  # "cls": the [CLS] token's state; "mean": mean over real (unpadded) tokens
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        """input_ids, attention_mask: [B, L] int32 -> embeddings [B, embed_dim] float32."""
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {self.pooling!r} (expected 'cls' or 'mean')")
        hidden = BertEncoder(self.config, self.dtype, name="encoder")(
            input_ids, attention_mask, deterministic
        )  # [B, L, H]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.astype(jnp.float32)[..., None]  # [B, L, 1]
            pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        proj = nn.Dense(self.embed_dim, dtype=self.dtype, name="proj")
        return proj(pooled).astype(jnp.float32)


# ----------------------------------------------------------------------------- checkpoints


def _hf_names(config: BertConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Our parameter path -> (Hugging Face tensor name, transpose?)."""
    names = {}
    for part in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        names[("embeddings", part, "embedding")] = (f"embeddings.{part}.weight", False)
    names[("embeddings", "LayerNorm", "scale")] = ("embeddings.LayerNorm.weight", False)
    names[("embeddings", "LayerNorm", "bias")] = ("embeddings.LayerNorm.bias", False)
    modules = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attention_output": "attention.output.dense",
        "attention_norm": "attention.output.LayerNorm",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
        "output_norm": "output.LayerNorm",
    }
    for i in range(config.num_hidden_layers):
        for ours, theirs in modules.items():
            prefix = f"encoder.layer.{i}.{theirs}"
            if ours.endswith("norm"):
                names[(f"layer_{i}", ours, "scale")] = (f"{prefix}.weight", False)
            else:  # torch Linear stores weight as [out, in]; Flax Dense kernel is [in, out]
                names[(f"layer_{i}", ours, "kernel")] = (f"{prefix}.weight", True)
            names[(f"layer_{i}", ours, "bias")] = (f"{prefix}.bias", False)
    return names


def _lookup(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Finds ``name`` under the optional ``bert.`` prefix and the old LayerNorm gamma/beta spelling."""
    candidates = [name]
    if name.endswith("LayerNorm.weight"):
        candidates.append(name[: -len("weight")] + "gamma")
    if name.endswith("LayerNorm.bias"):
        candidates.append(name[: -len("bias")] + "beta")
    for candidate in candidates:
        for key in (candidate, "bert." + candidate):
            if key in tensors:
                return tensors[key]
    tried = ", ".join(candidates[1:] + ["bert." + name])
    raise KeyError(f"tensor {name!r} not found in checkpoint (also tried: {tried})")


def load_bert_params(path: str | os.PathLike, config: BertConfig) -> dict:
    """Loads ``<path>/model.safetensors`` (or ``path`` itself if it is the file) as BertEncoder params.

    Returns the encoder's param tree (no ``"params"`` wrapper): it goes to ``params["encoder"]`` of a
    ``TextTower``, or is applied directly as ``BertEncoder(config).apply({"params": tree}, ...)``.
    The pooler and MLM heads of the checkpoint are ignored. Raises FileNotFoundError, KeyError for a
    missing tensor and ValueError for a shape mismatch, each naming the file or tensor.
    """
    path = os.fspath(path)
    file = os.path.join(path, WEIGHTS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"BERT weights file not found: {file}")
    tensors = load_file(file)
    ids = jnp.zeros((1, 1), jnp.int32)
    expected = jax.eval_shape(BertEncoder(config).init, jax.random.key(0), ids, ids)["params"]
    names = _hf_names(config)
    flat = {}
    for ours, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
        key = tuple(k.key for k in ours)
        name, transpose = names[key]
        tensor = _lookup(tensors, name)
        want = tuple(reversed(leaf.shape)) if transpose else tuple(leaf.shape)  # in checkpoint layout
        if tuple(tensor.shape) != want:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {want}")
        flat[key] = jnp.asarray((tensor.T if transpose else tensor).astype(np.float32))
    return _unflatten(flat)


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return tree


def load_hf_bert(path: str | os.PathLike) -> tuple[Callable[..., jax.Array], dict, Any]:
    """Loads a Hugging Face BERT checkpoint directory (config.json, model.safetensors, tokenizer files).

    Returns ``(apply_fn, params, tokenizer)``; ``apply_fn(params, input_ids, attention_mask)`` is jitted
    and returns the last hidden state [B, L, H] float32 (inference: no dropout).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"BERT checkpoint directory not found: {path}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"BERT checkpoint {path} has no {name}")
    import transformers  # imported here: it is slow to import and only tokenizers need it

    config = BertConfig.from_json(path)
    params = load_bert_params(path, config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = BertEncoder(config)

    @jax.jit
    def apply_fn(params, input_ids, attention_mask):
        return model.apply({"params": params}, input_ids, attention_mask)

    return apply_fn, params, tokenizer
