"""What the towers read: streamed batches of a split, its heatmap channels, the tokenizer.

    reader = make_reader(config, source, dataset.class_names, heatmaps)   # data.pipeline
    tokenizer = make_tokenizer(config.model.text, report_corpus(reader), workdir)
    arrays = tower_batch(config, tokenizer, reader(indices))              # one train-step batch

Shared by training (`daug_jax.train`), evaluation and the benchmark, so that every consumer
assembles the image channels, tokenises the reports and applies the label convention alike.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Iterable, Sequence

import jax
import ml_collections
import numpy as np

from daug_jax.data import synthetic
from daug_jax.data.pipeline import BatchReader, ordered_batches
from daug_jax.models import text as text_lib
from daug_jax.models.two_tower import assemble_images, class_prompts

# The text of every row when the image-report term is off (class-only towers, datasets without
# reports): the CLIP term then has weight 0 and its input is a fixed, harmless placeholder.
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
    names = config.model.get("class_names", None)
    return [str(n) for n in (data_classes if names is None else names)]


def uses_reports(config: ml_collections.ConfigDict) -> bool:
    """Whether the image-report term is trained: ``train.clip_weight`` > 0."""
    w = float(config.train.clip_weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"train.clip_weight must be in [0, 1], got {w}")
    return w > 0.0


def make_reader(config: ml_collections.ConfigDict, source: Any, data_classes: Sequence[str],
                heatmaps: Any = None, reports: bool | None = None) -> BatchReader:
    """The streamed batches of ``source`` for the towers: images (+ heatmap channels when
    ``model.vision.fill`` is "heatmaps"), the ``model.class_names`` labels and mask, and the
    reports (default: when the image-report term is trained)."""
    columns = class_columns(class_names_of(config, data_classes), data_classes)
    use_maps = config.model.vision.fill == "heatmaps"
    if use_maps and heatmaps is None:
        raise ValueError('model.vision.fill is "heatmaps" but no heatmap dataset was given '
                         "(set data.heatmaps_dir)")
    return BatchReader(source, label_columns=columns,
                       label_policy=config.data.get("label_policy", "ignore"),
                       reports=uses_reports(config) if reports is None else reports,
                       heatmaps=heatmaps if use_maps else None)


def tower_batch(config: ml_collections.ConfigDict, tokenizer: Any, batch: dict) -> dict:
    """A `BatchReader` batch -> the arrays of a train step (all [b, ...]).

    image [b, H, W, in_channels] float32 (the X-ray and its extra channels per
    ``model.vision.fill``, see `assemble_images`), input_ids / attention_mask [b, L] int32 (the
    reports; one placeholder text when the image-report term is off), labels / label_mask [b, C'].
    """
    vision, length = config.model.vision, int(config.model.text.max_length)
    image = assemble_images(batch["image"], batch.get("heatmaps"), int(vision.in_channels),
                            vision.fill, vision.get("channels", "stack"))
    if "report" in batch:
        empty = [i for i, r in enumerate(batch["report"]) if not str(r).strip()]
        if empty:
            raise ValueError(f"record id {str(batch['id'][empty[0]])!r} has an empty report")
        ids, mask = text_lib.tokenize(tokenizer, list(batch["report"]), length)
    else:  # class-only towers: the CLIP term has weight 0, its input is a fixed placeholder
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
    """The checkpoint's tokenizer, or a WordPiece vocabulary learnt from ``reports`` + prompts.

    A learnt tokenizer is saved under ``workdir/tokenizer`` and reloaded on resume, so the
    vocabulary belongs to the run (a resumed run reads its reports through the ids it started
    with).  Process 0 learns it; the others wait and read the saved one.
    """
    from transformers import AutoTokenizer

    if text_config.get("path"):
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
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("daug-jax train: tokenizer saved")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)



def open_heatmaps(config: ml_collections.ConfigDict, source: Any, split: str) -> Any:
    """The heatmap dataset of ``split`` (``data.heatmaps_dir/<split>``) when the towers read heatmap
    channels, checked against the image split before anything trains; else None."""
    if config.model.vision.fill != "heatmaps":
        return None
    root = config.data.get("heatmaps_dir", "")
    if not root:
        raise ValueError('model.vision.fill is "heatmaps": set data.heatmaps_dir to the output '
                         "directory of `daug-jax heatmaps`")
    from daug_jax.heatmap_job import HeatmapSource

    heatmaps = HeatmapSource(os.path.join(root, split))
    heatmaps.check_matches(source, int(config.model.vision.in_channels) - 1)
    return heatmaps
