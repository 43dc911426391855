"""Writes ``clip_tiny/`` (a small, randomly initialised Hugging Face CLIP) and ``clip_reference.npz``.

``clip_tiny/`` is a complete Hugging Face checkpoint directory as ``CLIPModel.save_pretrained`` and
``CLIPTokenizer.save_pretrained`` write it: ``config.json``, ``model.safetensors``, the tokenizer
files and ``preprocessor_config.json``.  The shape is a real ``CLIPConfig`` at toy size: ViT with
8-px patches on 32-px images (a 4 x 4 grid), 2 layers of width 32 in each tower, 77 text
positions, quick-GELU, projection to 16.  The tokenizer is CLIP's byte-level BPE (end-of-word
``</w>``, lower-casing, CLIP's pre-tokeniser) with merges learnt here from a few radiology
sentences by the ``tokenizers`` BPE trainer; ``<|startoftext|>`` / ``<|endoftext|>`` are its last
two ids, as in OpenAI's vocabulary.  Biases and LayerNorm parameters are perturbed from their
(0, 1) initialisation, so a loader that swaps or drops them fails the parity test.

``clip_reference.npz`` holds the torch outputs the parity tests compare against:

- ``pixels`` [3, 32, 32, 3] float32 NHWC (already normalised) -> ``image_features`` [3, 16]
  from ``get_image_features`` on the NCHW transpose;
- ``pixels_48`` [2, 48, 48, 3] -> ``image_features_48`` [2, 16] with
  ``interpolate_pos_encoding=True`` (the 4 x 4 position grid resampled bicubically to 6 x 6);
- ``texts``, ``input_ids`` / ``attention_mask`` [4, 24] int32 (padding and truncation both
  occur) -> ``text_features`` [4, 16] from ``get_text_features``;
- ``random_ids`` [2, 24] (no end-of-text token in them) -> ``text_features_random`` (pooled at
  the first ``eos_token_id``: none, so position 0) and ``text_features_random_argmax`` (the
  legacy rule of configs with ``eos_token_id == 2``: pooled at the largest id);
- ``grid`` [1, 5, 4, 4] and its torch ``interpolate(mode="bicubic", align_corners=False)`` to
  6 x 6 (``grid_up``) and 3 x 3 (``grid_down``).

It needs torch, which the project itself never depends on, so run it from a separate environment:

    python3.11 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers safetensors
    /tmp/refvenv/bin/python tests/reference/make_clip_reference.py
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "clip_tiny")
OUT_NPZ = os.path.join(HERE, "clip_reference.npz")

CORPUS = (
    "No acute cardiopulmonary process.",
    "Moderate left pleural effusion with adjacent basilar atelectasis; no pneumothorax.",
    "Cardiomegaly with mild pulmonary vascular congestion.",
    "Small right apical pneumothorax. No focal consolidation.",
    "Right lower lobe consolidation, concerning for pneumonia.",
    "Heart size is normal. The lungs are clear. No pleural effusion.",
    "Nodular opacity in the left mid lung, possibly a lung lesion; recommend CT.",
    "Bibasilar atelectasis. Stable mild cardiomegaly.",
    "Interval increase in the right pleural effusion.",
    "No evidence of pneumothorax or pleural effusion.",
    "A chest X-ray showing pleural effusion.",
    "A chest X-ray with no findings.",
    "Enlarged cardiac silhouette. Lungs without focal opacity.",
    "Patchy opacities in both lung bases may reflect atelectasis or consolidation.",
)
TEXTS = (
    "No acute cardiopulmonary process.",
    "Moderate left pleural effusion with adjacent basilar atelectasis; no pneumothorax.",
    "cardiomegaly",
    # More than MAX_LENGTH tokens: truncation must keep <|endoftext|> last.
    "Right lower lobe consolidation, concerning for pneumonia. Nodular opacity in the left mid "
    "lung, possibly a lung lesion; recommend CT. Interval increase in the right pleural effusion.",
)
MAX_LENGTH = 24
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def make_tokenizer(vocab_size: int = 600):
    """CLIP's byte-level BPE with merges learnt from CORPUS (``transformers.CLIPTokenizer``)."""
    import tempfile

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # CLIPTokenizer's own normaliser and pre-tokeniser, so the learnt merges fit how it splits.
    reference = transformers.CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[])
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = reference.backend_tokenizer.normalizer
    bpe.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = bpe.model.save(tmp)
        vocab = json.load(open(vocab_file))
        merges = [tuple(line.split()) for line in open(merges_file).read().splitlines()
                  if line and not line.startswith("#")]
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def make_model(tokenizer):
    import torch
    import transformers

    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         projection_dim=16, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.config._attn_implementation = "eager"  # the plain softmax(QK^T/sqrt(d) + mask) V
    return model


def main() -> None:
    import torch
    import transformers

    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    model.save_pretrained(OUT_DIR)
    tokenizer.save_pretrained(OUT_DIR)
    # What CLIPImageProcessor.save_pretrained writes (written directly: the class needs Pillow
    # and torchvision); OpenAI CLIP's pixel statistics.
    with open(os.path.join(OUT_DIR, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                   "size": {"shortest_edge": 32}, "resample": 3, "do_center_crop": True,
                   "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True},
                  f, indent=2)

    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    pixels_48 = rng.normal(size=(2, 48, 48, 3)).astype(np.float32)
    enc = tokenizer(list(TEXTS), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                    return_tensors="pt")
    random_ids = rng.integers(0, tokenizer.eos_token_id, size=(2, MAX_LENGTH))
    grid = rng.normal(size=(1, 5, 4, 4)).astype(np.float32)
    nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)  # noqa: E731
    interp = lambda n: torch.nn.functional.interpolate(  # noqa: E731
        torch.from_numpy(grid), size=(n, n), mode="bicubic", align_corners=False).numpy()
    with torch.no_grad():
        out = dict(
            image_features=model.get_image_features(nchw(pixels)).pooler_output,
            image_features_48=model.get_image_features(
                nchw(pixels_48), interpolate_pos_encoding=True).pooler_output,
            text_features=model.get_text_features(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output,
            text_features_random=model.get_text_features(
                input_ids=torch.from_numpy(random_ids)).pooler_output)
        model.text_model.eos_token_id = 2  # the legacy pooling rule: at the largest id
        out["text_features_random_argmax"] = model.get_text_features(
            input_ids=torch.from_numpy(random_ids)).pooler_output
    tmp = OUT_NPZ + ".tmp"
    with open(tmp, "wb") as f:  # a file object, so np.savez does not append ".npz" to the temp name
        np.savez_compressed(
            f, pixels=pixels, pixels_48=pixels_48, texts=np.array(TEXTS),
            input_ids=enc["input_ids"].numpy().astype(np.int32),
            attention_mask=enc["attention_mask"].numpy().astype(np.int32),
            random_ids=random_ids.astype(np.int32), grid=grid, grid_up=interp(6),
            grid_down=interp(3), **{k: v.numpy().astype(np.float32) for k, v in out.items()})
    os.replace(tmp, OUT_NPZ)
    size = sum(os.path.getsize(os.path.join(OUT_DIR, n)) for n in os.listdir(OUT_DIR))
    print(f"wrote {OUT_DIR} ({sorted(os.listdir(OUT_DIR))}, {size / 1e3:.0f} kB) and {OUT_NPZ}: "
          f"vocabulary {len(tokenizer)}, tokens per text {enc['attention_mask'].sum(1).tolist()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
