"""What the towers read: streamed batches of a split, its heatmap channels, the tokenizer.

    reader = make_reader(config, source, dataset.class_names, heatmaps)   # data.pipeline
    tokenizer = make_tokenizer(config.model.text, report_corpus(reader), workdir)
    arrays = tower_batch(config, tokenizer, reader(indices))              # one train-step batch

Shared by training, evaluation and the benchmark, so that all of them read batches alike.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Iterable, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from daug_jax.data import synthetic
from daug_jax.data.registry import NO_FINDING
from daug_jax.data.pipeline import BatchReader, ordered_batches
from daug_jax.heatmap_job import HeatmapSource
from daug_jax.losses import PROMPT_FORMS
from daug_jax.models import text as text_lib

# Every row's text when the image-report term is off (weight 0): a fixed, harmless placeholder.
NO_REPORT = "no report"


# ----------------------------------------------------------------------------- data
def class_columns(names: Sequence[str], valid: Sequence[str]) -> list[int]:
    """Indices of ``names`` among the dataset's label columns ``valid``."""
    valid = [str(v) for v in valid]
    for name in names:
        if name not in valid:
            raise ValueError(f"unknown class name {name!r} in model.class_names; valid: {valid}")
    if len(set(names)) != len(names):
        raise ValueError(f"model.class_names has duplicates: {list(names)}")
    return [valid.index(n) for n in names]


def class_names_of(config: ml_collections.ConfigDict, data_classes: Sequence[str]) -> list[str]:
    """The classes of the image-class term: ``model.class_names``, else every label column."""
    names = config.model.class_names
    return [str(n) for n in (data_classes if names is None else names)]


def class_prompts(class_names: Sequence[str], form: str = "single") -> list[str]:
    """Class prompts in the row layout `losses.class_logits` expects: form "single", C prompts
    ("a chest X-ray showing pleural effusion"); "paired", 2C ``[absent_0 .. absent_{C-1},
    present_0 .. present_{C-1}]`` ("a chest X-ray with no pleural effusion").  "No Finding"
    reads "... with no findings" (absent: "... with abnormal findings"), so that no prompt
    negates inside a sentence asserting presence or reads as a double negative."""
    if form not in PROMPT_FORMS:
        raise ValueError(f"unknown prompt form {form!r}; valid: {', '.join(PROMPT_FORMS)}")
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
    """The class prompts of ``model_config.prompts`` (`class_prompts`) tokenised by
    `text.prompt_tokens` at ``model_config.text.max_length``: ids, mask [P, L'] int32."""
    prompts = class_prompts(list(class_names), model_config.prompts)
    return text_lib.prompt_tokens(tokenizer, prompts, int(model_config.text.max_length))


def uses_reports(config: ml_collections.ConfigDict) -> bool:
    """Whether the image-report term is trained: ``train.clip_weight`` > 0."""
    w = float(config.train.clip_weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"train.clip_weight must be in [0, 1], got {w}")
    return w > 0.0


def make_reader(config: ml_collections.ConfigDict, source: Any, data_classes: Sequence[str],
                heatmaps: Any = None, reports: bool | None = None) -> BatchReader:
    """The streamed batches of ``source`` for the towers: images (+ heatmaps for fill
    "heatmaps"), the labels and mask of ``model.class_names``, and the reports (default: when
    the image-report term is trained)."""
    columns = class_columns(class_names_of(config, data_classes), data_classes)
    use_maps = config.model.vision.fill == "heatmaps"
    if use_maps and heatmaps is None:
        raise ValueError('model.vision.fill is "heatmaps" but no heatmap dataset was given '
                         "(set data.heatmaps_dir)")
    return BatchReader(source, label_columns=columns, label_policy=config.data.label_policy,
                       reports=uses_reports(config) if reports is None else reports,
                       heatmaps=heatmaps if use_maps else None)


def assemble_images(image: np.ndarray, heatmaps: np.ndarray | None, in_channels: int,
                    fill: str) -> np.ndarray:
    """The image tower's input [B, H, W, in_channels] float32: ``[x0, extra...]``, one layout for
    every fill (checked by `daug_jax.config`) and channel mode, so the ablation runs one program.

    image: [B, H, W, 1] float in [0, 1]; heatmaps: [B, H, W, K] float in [0, 1] (fill "heatmaps",
    1 + K == in_channels) or None (fill "repeat": the image in every channel, the baseline).
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 4 or image.shape[-1] != 1:
        raise ValueError(f"image batch must be [B, H, W, 1] (the X-ray alone; extra channels "
                         f"come from model.vision.fill), got shape {tuple(image.shape)}")
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


def tower_batch(config: ml_collections.ConfigDict, tokenizer: Any, batch: dict) -> dict:
    """A `BatchReader` batch -> the arrays of a train step: image [b, H, W, in_channels] float32
    (`assemble_images`), input_ids / attention_mask [b, L] int32 (the reports, or `NO_REPORT`),
    labels / label_mask [b, C']."""
    vision, length = config.model.vision, int(config.model.text.max_length)
    image = assemble_images(batch["image"], batch.get("heatmaps"), int(vision.in_channels),
                            vision.fill)
    if "report" in batch:
        empty = [i for i, r in enumerate(batch["report"]) if not str(r).strip()]
        if empty:
            raise ValueError(f"record id {str(batch['id'][empty[0]])!r} has an empty report")
        ids, mask = text_lib.tokenize(tokenizer, list(batch["report"]), length)
    else:  # class-only towers
        ids, mask = (np.repeat(a, len(image), axis=0)
                     for a in text_lib.tokenize(tokenizer, [NO_REPORT], length))
    return {"image": image, "input_ids": ids, "attention_mask": mask, "labels": batch["labels"],
            "label_mask": batch["label_mask"]}


def report_corpus(reader: BatchReader, chunk: int = 256):
    """Every report of ``reader``'s split, streamed in order (the tokenizer's training corpus)."""
    for _, batch in ordered_batches(reader, chunk):
        yield from (str(r) for r in batch["report"])


def make_tokenizer(text_config: Any, reports: Iterable[str], workdir: str,
                   class_names: Sequence[str] = synthetic.CLASS_NAMES) -> Any:
    """The checkpoint's tokenizer, or a WordPiece vocabulary learnt from ``reports`` + prompts by
    process 0 (the others wait), saved under ``workdir/tokenizer`` and reloaded on resume."""
    from transformers import AutoTokenizer  # here, not at the top: slow to import

    if text_config.path:
        return AutoTokenizer.from_pretrained(text_config.path, local_files_only=True)
    directory = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(directory):
        if jax.process_index() == 0:
            # Prompts of both forms included, so that class words never fall to [UNK].
            corpus = [*reports, *class_prompts(class_names, "single"),
                      *class_prompts(class_names, "paired"), NO_REPORT]
            tokenizer = text_lib.train_wordpiece_tokenizer(corpus, int(text_config.vocab_size))
            tmp = directory + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, directory)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("daug-jax train: tokenizer saved")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def open_heatmaps(config: ml_collections.ConfigDict, source: Any, split: str) -> Any:
    """The heatmap dataset of ``split`` (``data.heatmaps_dir/<split>``) when the towers read heatmap
    channels, checked against the image split before anything trains; else None."""
    if config.model.vision.fill != "heatmaps":
        return None
    root = config.data.heatmaps_dir
    if not root:
        raise ValueError('model.vision.fill is "heatmaps": set data.heatmaps_dir to the output '
                         "directory of `daug-jax heatmaps`")
    heatmaps = HeatmapSource(os.path.join(root, split))
    heatmaps.check_matches(source, int(config.model.vision.in_channels) - 1)
    return heatmaps
