"""The text tower: a BERT encoder in Flax Linen, Hugging Face checkpoint loading, and the
WordPiece tokenisation of reports and prompts.  The encoder is the original post-LayerNorm BERT,
so a Hugging Face ``BertModel`` checkpoint loads into it and reproduces its last hidden state:

    ids [B, L] -> word + position + token-type embeddings -> LayerNorm -> dropout      x: [B, L, H]
    repeat num_hidden_layers times:
        x = LayerNorm(x + dropout(Dense(self_attention(x, mask))))
        x = LayerNorm(x + dropout(Dense(gelu(Dense(x)))))                 FFN width I, exact GELU

``TextTower`` pools ([CLS] or masked mean) and projects to the joint space, unnormalised.
``dtype`` is the matmul compute dtype; parameters, the residual stream, LayerNorm and softmax
stay float32 (bfloat16 has too few mantissa bits for LayerNorm variances and close logits).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from safetensors.numpy import load_file

if TYPE_CHECKING:
    import transformers

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first: pad id 0, as in BERT


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
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        """From a Hugging Face BERT ``config.json`` dict (unknown keys ignored)."""
        # Other architectures would load without error but compute something else.
        checks = {"model_type": "bert", "hidden_act": "gelu",
                  "position_embedding_type": "absolute"}
        for key, supported in checks.items():
            if d.get(key, supported) != supported:
                raise ValueError(f"unsupported {key} {d[key]!r} in BERT config "
                                 f"(expected {supported!r})")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [n for n, f in fields.items()
                   if f.default is dataclasses.MISSING and n not in d]
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


# ----------------------------------------------------------------------------- model
class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, deterministic: bool) -> jax.Array:
        """input_ids: [B, L] int32 -> [B, L, H] float32."""
        cfg, length = self.config, input_ids.shape[1]
        embed = functools.partial(nn.Embed, features=cfg.hidden_size,
                                  embedding_init=nn.initializers.normal(0.02))  # BERT's init
        x = embed(cfg.vocab_size, name="word_embeddings")(input_ids)
        pos = embed(cfg.max_position_embeddings, name="position_embeddings")(jnp.arange(length))
        x = x + pos[None]
        # One segment: token type 0, as Hugging Face does when token_type_ids is omitted.
        x = x + embed(cfg.type_vocab_size, name="token_type_embeddings")(jnp.zeros_like(input_ids))
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

        dense = functools.partial(nn.Dense, dtype=self.dtype,
                                  kernel_init=nn.initializers.normal(0.02))
        layer_norm = functools.partial(nn.LayerNorm, cfg.layer_norm_eps, dtype=jnp.float32)

        def dropout(y):
            return nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)

        q, k, v = (dense(h, name=n)(x).reshape(b, length, heads, head_dim)
                   for n in ("query", "key", "value"))
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        # The most negative float, not an additive bias: a padded key's weight is exactly 0.
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)  # [B, heads, L, L]
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bnqk,bknd->bqnd", probs.astype(self.dtype), v).reshape(b, length, h)
        attended = dense(h, name="attention_output")(context)
        x = layer_norm(name="attention_norm")(x + dropout(attended))
        ffn = jax.nn.gelu(dense(cfg.intermediate_size, name="intermediate")(x), approximate=False)
        return layer_norm(name="output_norm")(x + dropout(dense(h, name="output")(ffn)))


class BertEncoder(nn.Module):
    """BERT encoder; ``dtype`` is the matmul compute dtype, parameters stay float32."""
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """input_ids, attention_mask: [B, L] int32 -> last hidden state [B, L, H] float32;
        ``deterministic=False`` applies dropout (a ``"dropout"`` PRNG key in ``apply``)."""
        chex.assert_rank(input_ids, 2)
        chex.assert_equal_shape([input_ids, attention_mask])
        chex.assert_type([input_ids, attention_mask], int)
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
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
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """input_ids, attention_mask: [B, L] int32 -> embeddings [B, embed_dim] float32."""
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {self.pooling!r} (expected 'cls' or 'mean')")
        hidden = BertEncoder(self.config, self.dtype, name="encoder")(
            input_ids, attention_mask, deterministic)  # [B, L, H]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.astype(jnp.float32)[..., None]  # [B, L, 1]
            pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        proj = nn.Dense(self.embed_dim, dtype=self.dtype, name="proj")
        return proj(pooled).astype(jnp.float32)


# ----------------------------------------------------------------------------- tokenisers
def train_wordpiece_tokenizer(texts: Sequence[str],
                              vocab_size: int = 2000) -> transformers.PreTrainedTokenizerFast:
    """A lower-casing BERT WordPiece tokenizer (``[CLS] ... [SEP]``) learnt from ``texts``: the
    special tokens ([PAD] = 0), every character alone and as ``##`` continuation (no word falls
    to [UNK]), then words by descending count, ties alphabetical (the tokenizers library's
    trainer breaks them in hash order), up to ``vocab_size``; size the model with ``len()``."""
    import transformers  # here, not at the top: slow to import, and only tokenizers need it

    texts = _as_text_list(texts)
    normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    counts = collections.Counter(
        word for text in texts
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(vocab)} special and "
                         "character tokens this corpus needs")
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[:vocab_size - len(vocab)]

    tok = tokenizers.Tokenizer(
        tokenizers.models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]")


def _as_text_list(texts: Sequence[str]) -> list[str]:
    # A bare string is a Sequence[str] too, and would silently become one text per character.
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, got a single string")
    texts = [t.item() if isinstance(t, np.generic) else t for t in texts]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    return texts


def tokenize(tokenizer: Any, texts: Sequence[str],
             max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises with [CLS] ... [SEP], padded and cut to ``max_length``: input_ids,
    attention_mask [B, max_length] int32 (1 = real token).  ValueError names an empty text's index.
    """
    texts = _as_text_list(texts)
    for i, t in enumerate(texts):
        if not t.strip():
            raise ValueError(f"texts[{i}] is empty")
    if not texts:
        raise ValueError("texts is empty")
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def prompt_tokens(tokenizer: Any, prompts: Sequence[str],
                  max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """`tokenize` padded only to the longest prompt (at most ``max_length``): [P, L'] twice.
    Padding is masked out of attention and pooling: the same embeddings for less work."""
    ids, mask = tokenize(tokenizer, prompts, max_length)
    length = int(mask.sum(axis=1).max())
    return ids[:, :length], mask[:, :length]


# ----------------------------------------------------------------------------- checkpoints
def require_files(path: str | os.PathLike, names: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE),
                  kind: str = "BERT") -> str:
    """``path`` as a string; FileNotFoundError naming the ``kind`` checkpoint directory or the
    first of ``names`` missing in it."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{kind} checkpoint directory not found: {path}")
    for name in names:
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{kind} checkpoint {path} has no {name}")
    return path


# The modules of our `BertLayer` -> Hugging Face's, under ``encoder.layer.<i>``.
_LAYER_MODULES = {"query": "attention.self.query", "key": "attention.self.key",
                  "value": "attention.self.value", "attention_output": "attention.output.dense",
                  "attention_norm": "attention.output.LayerNorm",
                  "intermediate": "intermediate.dense", "output": "output.dense",
                  "output_norm": "output.LayerNorm"}


def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Our parameter path -> (Hugging Face tensor name, transpose? torch's Linear is [out, in])."""
    module, part, leaf = path  # ("embeddings" | "layer_<i>", module, kernel | scale | ...)
    if module == "embeddings":
        prefix = f"embeddings.{part}"
    else:
        prefix = f"encoder.layer.{module.removeprefix('layer_')}.{_LAYER_MODULES[part]}"
    return f"{prefix}.{'bias' if leaf == 'bias' else 'weight'}", leaf == "kernel"


def _lookup(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    """``name``, also under the ``bert.`` prefix and the old LayerNorm gamma/beta spelling."""
    candidates = [name]
    for new, old in (("weight", "gamma"), ("bias", "beta")):
        if name.endswith(f"LayerNorm.{new}"):
            candidates.append(name[:-len(new)] + old)
    for candidate in candidates:
        for key in (candidate, "bert." + candidate):
            if key in tensors:
                return tensors[key]
    tried = ", ".join(candidates[1:] + ["bert." + name])
    raise KeyError(f"tensor {name!r} not found in checkpoint (also tried: {tried})")


def load_bert_params(path: str | os.PathLike, config: BertConfig) -> dict:
    """``<path>/model.safetensors`` (or the file ``path``) as BertEncoder params (no ``"params"``
    wrapper: a ``TextTower``'s ``params["encoder"]``; pooler and MLM heads ignored).  Raises
    FileNotFoundError, KeyError (missing tensor) or ValueError (shape), naming file or tensor.
    """
    file = os.path.join(path, WEIGHTS_FILE) if os.path.isdir(path) else os.fspath(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"BERT weights file not found: {file}")
    tensors = load_file(file)
    ids = jnp.zeros((1, 1), jnp.int32)
    expected = jax.eval_shape(BertEncoder(config).init, jax.random.key(0), ids, ids)["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
    out = []
    for ours, leaf in leaves:
        name, transpose = _hf_name(tuple(k.key for k in ours))
        tensor = _lookup(tensors, name)
        want = tuple(reversed(leaf.shape)) if transpose else tuple(leaf.shape)  # torch layout
        if tuple(tensor.shape) != want:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {want}")
        out.append(jnp.asarray((tensor.T if transpose else tensor).astype(np.float32)))
    return jax.tree_util.tree_unflatten(treedef, out)


def load_hf_bert(path: str | os.PathLike) -> tuple[Callable[..., jax.Array], dict, Any]:
    """Loads a Hugging Face BERT directory (config.json, model.safetensors, tokenizer files):
    ``(apply_fn, params, tokenizer)``, ``apply_fn(params, input_ids, attention_mask)`` jitted
    -> the last hidden state [B, L, H] float32 (no dropout)."""
    path = require_files(path)
    import transformers  # here, not at the top: slow to import, and only tokenizers need it

    config = BertConfig.from_json(path)
    params = load_bert_params(path, config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = BertEncoder(config)
    apply_fn = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))
    return apply_fn, params, tokenizer
