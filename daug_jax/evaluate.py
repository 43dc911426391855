"""Evaluation of trained towers on any prepared dataset: retrieval (image<->report, image->image)
and zero-shot classification from the class-prompt embeddings, embedded in streamed chunks.

    daug-jax evaluate --towers runs/towers --data mimic_cxr --data-dir runs/tfds --out eval.json

Only the embeddings ([N, D] per tower) are held, never the films of a split.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from daug_jax import metrics
from daug_jax.data.pipeline import ordered_batches, pad_rows
from daug_jax.models import text as text_lib
from daug_jax.models.two_tower import TwoTower, class_prompts
from daug_jax.tower_inputs import make_reader, tower_batch
from daug_jax.train import load_towers

_BATCH = 256  # records encoded per call; the last chunk is padded to keep one compiled shape


def embed(model: TwoTower, variables: dict, tokenizer: Any, config: Any, source: Any, *,
          class_names: Sequence[str], heatmaps: Any = None, reports: bool = True,
          progress: bool = False) -> dict:
    """Unit-norm embeddings of ``source``'s images, reports and the class prompts.

    source: a random-access split (records as for `train_towers`); class_names: its label
    columns; heatmaps: its heatmap dataset for DAug towers; reports: embed the reports (False for
    datasets without any).  Returns {"image_emb" [N, D], "text_emb" [N, D] or None, "class_emb"
    [C, D], "labels" / "label_mask" [N, C] float32 (C = config.model.class_names), "id" [N],
    "logit_scale", "class_scale", "class_bias"}.
    """
    reader = make_reader(config, source, class_names, heatmaps, reports=reports)
    # The variables are an argument, not a constant of the programs: towers of the same shape
    # (the variants of an ablation) share the compiled encoders.
    image_fn = jax.jit(lambda v, x: model.apply(v, x, method=TwoTower.encode_image))
    text_fn = jax.jit(lambda v, i, m: model.apply(v, i, m, method=TwoTower.encode_text))
    out = {k: [] for k in ("image_emb", "text_emb", "labels", "label_mask", "id")}
    chunks = ordered_batches(reader, _BATCH)
    for _, batch in tqdm(chunks, total=-(-len(source) // _BATCH), desc="embed", unit="chunk",
                         disable=not progress):
        arrays, rows = tower_batch(config, tokenizer, batch), len(batch["id"])
        pad = {k: pad_rows(v, _BATCH) for k, v in arrays.items()}
        out["image_emb"].append(np.asarray(image_fn(variables, pad["image"]))[:rows])
        if reports:
            out["text_emb"].append(np.asarray(
                text_fn(variables, pad["input_ids"], pad["attention_mask"]))[:rows])
        for key in ("labels", "label_mask"):
            out[key].append(arrays[key])
        out["id"].append(batch["id"])
    length = int(config.model.text.max_length)
    cls_ids, cls_mask = text_lib.tokenize(
        tokenizer, class_prompts(list(config.model.class_names)), length)
    scalars = jax.device_get(model.apply(variables, method=TwoTower.scalars))
    emb = {k: (np.concatenate(v) if v else None) for k, v in out.items()}
    return {**emb, "class_emb": np.asarray(text_fn(variables, cls_ids, cls_mask)),
            **{k: float(v) for k, v in scalars.items()}}


def evaluate_embeddings(emb: dict, class_names: list[str]) -> dict:
    """Retrieval and zero-shot classification metrics of `embed` output.

    Image->image relevance is sharing a positive class; without reports only image->image
    retrieval and classification are scored.
    """
    positives = emb["labels"]  # 1 = positive (masked and negative entries are 0)
    if emb["text_emb"] is not None:
        out = metrics.retrieval_metrics(emb["image_emb"], emb["text_emb"], positives)
    else:
        img = emb["image_emb"]
        out = {"i2i_P@10": metrics.precision_at_k(img @ img.T, positives, positives, 10,
                                                  exclude_self=True)}
    scores = metrics.zero_shot_scores(emb["image_emb"], emb["class_emb"], emb["class_scale"],
                                      emb["class_bias"])
    out.update(metrics.classification_metrics(scores, emb["labels"], emb["label_mask"],
                                              class_names))
    return out


def evaluate_towers(workdir: str, source: Any, *, class_names: Sequence[str],
                    heatmaps: Any = None, reports: bool = True, progress: bool = False) -> dict:
    """Loads the latest checkpoint in ``workdir`` and evaluates it on ``source`` (see `embed`).

    Returns {"macro_auroc", "per_class_auroc": {class: auroc or None}, "i2i_P@10", and with
    reports "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"}.
    """
    model, variables, tokenizer, config = load_towers(workdir)
    emb = embed(model, variables, tokenizer, config, source, class_names=class_names,
                heatmaps=heatmaps, reports=reports, progress=progress)
    return evaluate_embeddings(emb, list(config.model.class_names))


def main(command: str, argv: list[str]) -> int:
    """``daug-jax evaluate --towers WORKDIR [--data NAME --data-dir DIR] --out FILE.json``."""
    from daug_jax import parallel
    from daug_jax.config import apply_overrides
    from daug_jax.data import registry
    from daug_jax.files import write_json
    from daug_jax.tower_inputs import open_heatmaps

    parser = argparse.ArgumentParser(prog=f"daug-jax {command}",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--towers", required=True, help="workdir of `daug-jax train`")
    registry.add_data_args(parser)
    parser.add_argument("--query-split", default="test", help="split whose films are scored")
    parser.add_argument("--out", required=True, help="where the metrics go (JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the towers' saved config, e.g. "
                             "data.heatmaps_dir=runs/heatmaps")
    args = parser.parse_args(argv)
    parallel.maybe_initialize_distributed()
    _, _, _, config = load_towers(args.towers)
    apply_overrides(config, args.set)
    registry.apply_data_args(config, args)
    dataset = registry.open_dataset(config.data)
    source = dataset.source(args.query_split)
    heatmaps = open_heatmaps(config, source, args.query_split)
    result = evaluate_towers(args.towers, source, class_names=dataset.class_names,
                             heatmaps=heatmaps, reports=dataset.has_reports, progress=True)
    result = {"dataset": dataset.name, "split": args.query_split, "num_films": len(source),
              "towers": os.path.abspath(args.towers), **result}
    write_json(args.out, result)
    shown = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
    print(f"evaluate: {dataset.name} {args.query_split} ({len(source)} films): {shown}; "
          f"all metrics in {args.out}")
    return 0
