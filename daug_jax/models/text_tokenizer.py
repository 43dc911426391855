"""WordPiece tokenisers for the text tower: a deterministic vocabulary learnt from a corpus, and
the tokenisation of reports and prompts into padded [CLS] ... [SEP] id arrays.

Any Hugging Face tokenizer (``transformers.AutoTokenizer``, e.g. a checkpoint's own) goes
through `tokenize` the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import transformers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first: pad id 0, as in BERT


def train_wordpiece_tokenizer(
    texts: Sequence[str], vocab_size: int = 2000
) -> transformers.PreTrainedTokenizerFast:
    """A lower-casing BERT WordPiece tokenizer with a vocabulary learnt from ``texts``.

    The vocabulary: the special tokens ([PAD] = 0), every character of the corpus alone and as a
    ``##`` continuation (no word of the corpus falls to [UNK]), then whole words by descending
    count, ties in alphabetical order, up to ``vocab_size``.  It is a function of the corpus
    alone: the same texts give the same token ids in every process and run.  (The tokenizers
    library's WordPiece trainer breaks count ties in hash order: two trainings on one corpus of
    synthetic reports differed in 44 of 580 tokens, and towers trained on them differed.)
    Inputs are tokenised into ``[CLS] ... [SEP]``.  Save with ``save_pretrained(dir)``, reload with
    ``AutoTokenizer.from_pretrained(dir, local_files_only=True)``; the vocabulary may come out
    smaller than ``vocab_size`` on a small corpus, so size the model with ``len(tokenizer)``.
    """
    import collections

    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    texts = _as_text_list(texts)
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
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

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _as_text_list(texts: Sequence[str]) -> list[str]:
    # A bare string is a Sequence[str] too, and would silently become one text per character.
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, got a single string")
    texts = [t.item() if isinstance(t, np.generic) else t for t in texts]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    return texts


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises with [CLS] ... [SEP], padding and truncating to ``max_length``.

    Returns input_ids [B, max_length] int32 and attention_mask [B, max_length] int32 (1 = real token).
    An empty (or all-whitespace) text raises ValueError naming its index: it would otherwise become
    [CLS] [SEP] and pass silently as a report that says nothing.
    """
    texts = _as_text_list(texts)
    for i, t in enumerate(texts):
        if not t.strip():
            raise ValueError(f"texts[{i}] is empty")
    if not texts:
        raise ValueError("texts is empty")
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np"
    )
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def prompt_tokens(tokenizer: Any, prompts: Sequence[str],
                  max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """`tokenize` padded only to the longest prompt (at most ``max_length``): [P, L'] twice.

    Class prompts are a few words, and the text tower masks padding out of both attention and
    pooling, so the shorter rows give the same embeddings (up to float reassociation) for a
    fraction of the text tower's work on them in every train step.
    """
    ids, mask = tokenize(tokenizer, prompts, max_length)
    length = int(mask.sum(axis=1).max())
    return ids[:, :length], mask[:, :length]
