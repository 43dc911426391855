"""Evaluation of trained towers on any prepared dataset, by the authors' protocol.

    daug-jax evaluate --towers runs/towers --data mimic_cxr --data-dir runs/tfds --out eval.json

Queries come from the test split, the gallery is the training split (``--query-split``,
``--gallery-split``).  Class-based retrieval: image->image (``x2x``), report->image (``r2x``) and
image->report (``x2r``) scored by class AP@K (`metrics.class_map_at_k`, K = 1, 3, 5, 10);
classification: per-class, macro and support-weighted AUROC of the class-prompt scores in the
form the towers were trained with (``model.prompts``); exact-report Recall@K (image<->its own
report within the query split).  Every metric comes with its chance level (`metrics.chance_levels`).
Only the embeddings ([N, D] per tower and split) are held, never the films; similarities are
taken in blocks of queries.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from daug_jax import metrics
from daug_jax.config import apply_overrides
from daug_jax.data import registry
from daug_jax.data.pipeline import ordered_batches, pad_rows
from daug_jax.files import write_json
from daug_jax.models.two_tower import TwoTower
from daug_jax.tower_inputs import class_prompt_tokens, make_reader, open_heatmaps, tower_batch
from daug_jax.train import Towers, load_runs, pick_member, saved_configs

_BATCH = 256  # records encoded per call; the last chunk is padded to keep one compiled shape
_QUERY_BLOCK = 1024  # query rows per similarity block: [1024, G] float32 at a time


def encoders(model: TwoTower) -> tuple[Any, Any]:
    """Compiled ``image_fn(variables, images)`` and ``text_fn(variables, ids, mask)``.  The
    variables are an argument, not a constant of the programs: towers of the same shape (the
    members of an ablation) share them."""
    return (jax.jit(lambda v, x: model.apply(v, x, method=TwoTower.encode_image)),
            jax.jit(lambda v, i, m: model.apply(v, i, m, method=TwoTower.encode_text)))


def embed(towers: Towers, source: Any, *, class_names: Sequence[str], heatmaps: Any = None,
          reports: bool = True, progress: bool = False, fns: tuple | None = None) -> dict:
    """Unit-norm embeddings of ``source``'s images, reports and the class prompts.

    towers: `train.load_towers`; source: a random-access split (records as for `train_towers`);
    class_names: its label columns; heatmaps: its heatmap dataset for DAug towers; reports:
    embed the reports (False for datasets without any); fns: `encoders` of the model, to reuse.
    Returns {"image_emb" [N, D], "text_emb" [N, D] or None, "class_emb" [C, D] ([2C, D] for
    paired prompts), "labels" / "label_mask" [N, C] float32 (C = config.model.class_names),
    "id" [N], "prompts", "logit_scale", "class_scale", "class_bias"}.
    """
    model, variables, tokenizer, config = towers
    reader = make_reader(config, source, class_names, heatmaps, reports=reports)
    image_fn, text_fn = fns or encoders(model)
    out = {k: [] for k in ("image_emb", "text_emb", "labels", "label_mask", "id")}
    for _, batch in tqdm(ordered_batches(reader, _BATCH), total=-(-len(source) // _BATCH),
                         desc="embed", unit="chunk", disable=not progress):
        arrays, rows = tower_batch(config, tokenizer, batch), len(batch["id"])
        pad = {k: pad_rows(v, _BATCH) for k, v in arrays.items()}
        out["image_emb"].append(np.asarray(image_fn(variables, pad["image"]))[:rows])
        if reports:
            out["text_emb"].append(np.asarray(
                text_fn(variables, pad["input_ids"], pad["attention_mask"]))[:rows])
        for key in ("labels", "label_mask"):
            out[key].append(arrays[key])
        out["id"].append(batch["id"])
    cls_ids, cls_mask = class_prompt_tokens(tokenizer, config.model.class_names, config.model)
    scalars = jax.device_get(model.apply(variables, method=TwoTower.scalars))
    emb = {k: (np.concatenate(v) if v else None) for k, v in out.items()}
    return {**emb, "class_emb": np.asarray(text_fn(variables, cls_ids, cls_mask)),
            "prompts": config.model.prompts, **{k: float(v) for k, v in scalars.items()}}


def _class_retrieval(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                     gallery_labels: np.ndarray, name: str) -> dict:
    """``{name}_mAP@K`` / ``{name}_wmAP@K`` of unit-norm queries [Q, D] against a gallery [G, D]."""
    acc = metrics.ClassMapAccumulator(gallery_labels)
    for start in range(0, len(queries), _QUERY_BLOCK):
        block = slice(start, start + _QUERY_BLOCK)
        acc.update(queries[block] @ gallery.T, query_labels[block])
    out = {}
    for k, result in acc.finalize().items():
        out[f"{name}_mAP@{k}"], out[f"{name}_wmAP@{k}"] = result["mAP"], result["wmAP"]
    return out


def evaluate_embeddings(query: dict, gallery: dict, class_names: list[str]) -> dict:
    """Every metric of the protocol from `embed` outputs of the query and gallery splits.

    Relevance for class retrieval is sharing a positive label (masked and negative entries are
    0).  Without reports only ``x2x`` and classification are scored.  Returns {metric: value,
    "per_class_auroc": {class: auroc or None}, "chance": {metric: chance level}}.
    """
    q_pos, g_pos = query["labels"], gallery["labels"]  # 1 = positive
    out = _class_retrieval(query["image_emb"], q_pos, gallery["image_emb"], g_pos, "x2x")
    if query["text_emb"] is not None and gallery["text_emb"] is not None:
        out.update(_class_retrieval(query["text_emb"], q_pos, gallery["image_emb"], g_pos, "r2x"))
        out.update(_class_retrieval(query["image_emb"], q_pos, gallery["text_emb"], g_pos, "x2r"))
        pairs = query["image_emb"] @ query["text_emb"].T  # [Q, Q]: row i's own report is column i
        for k in metrics.RECALL_KS:
            out[f"i2t_R@{k}"] = metrics.recall_at_k(pairs, k)
            out[f"t2i_R@{k}"] = metrics.recall_at_k(pairs.T, k)
    scores = metrics.zero_shot_scores(query["image_emb"], query["class_emb"],
                                      query["class_scale"], query["class_bias"], query["prompts"])
    out.update(metrics.classification_metrics(scores, query["labels"], query["label_mask"],
                                              class_names))
    out["weighted_auroc"] = metrics.weighted_auroc(scores, query["labels"], query["label_mask"])
    out["chance"] = {k: v for k, v in metrics.chance_levels(q_pos, g_pos).items() if k in out}
    return out


def evaluate_towers(workdir: str, query: Any, gallery: Any, *, class_names: Sequence[str],
                    heatmaps: dict | None = None, reports: bool = True,
                    members: Sequence[str] | None = None, progress: bool = False) -> dict:
    """Loads the latest checkpoint in ``workdir`` once and scores each of ``members`` (default:
    every run of the workdir: a single run, "run", or a population's members): queries from
    ``query``, the gallery ``gallery`` (random-access splits with the label columns
    ``class_names``); heatmaps: {"query": ..., "gallery": ...} heatmap datasets of DAug towers.
    Returns {member name: `evaluate_embeddings` output}."""
    runs = load_runs(workdir)
    fns, maps = encoders(next(iter(runs.values())).model), heatmaps or {}
    out = {}
    for name in members or runs:
        towers = runs[pick_member(runs, name, workdir)]  # a clear error for an unknown name
        # (a member that does not read heatmaps ignores them: `make_reader`)
        emb = {role: embed(towers, source, class_names=class_names, heatmaps=maps.get(role),
                           reports=reports, progress=progress, fns=fns)
               for role, source in (("query", query), ("gallery", gallery))}
        out[name] = evaluate_embeddings(emb["query"], emb["gallery"],
                                        list(towers.config.model.class_names))
    return out


def main(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--towers", required=True, help="workdir of `daug-jax train`")
    registry.add_data_args(parser)
    parser.add_argument("--query-split", default="test", help="split of the queries")
    parser.add_argument("--gallery-split", default="train",
                        help="split searched by class-based retrieval (the authors': train)")
    parser.add_argument("--member", help="which towers of a population workdir (by name)")
    parser.add_argument("--out", required=True, help="where the metrics go (JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the towers' saved config, e.g. "
                             "data.heatmaps_dir=runs/heatmaps")
    args = parser.parse_args(argv)
    configs = saved_configs(args.towers)
    member = pick_member(configs, args.member, args.towers)
    config = configs[member]
    apply_overrides(config, args.set)
    registry.apply_data_args(config, args)
    dataset = registry.open_dataset(config.data)
    splits = {"query": args.query_split, "gallery": args.gallery_split}
    sources = {role: dataset.source(split) for role, split in splits.items()}
    heatmaps = {role: open_heatmaps(config, sources[role], split) for role, split in splits.items()}
    result = evaluate_towers(args.towers, sources["query"], sources["gallery"],
                             class_names=dataset.class_names, heatmaps=heatmaps,
                             reports=dataset.has_reports, members=[member], progress=True)[member]
    result = {"dataset": dataset.name, "query_split": args.query_split,
              "gallery_split": args.gallery_split, "num_queries": len(sources["query"]),
              "num_gallery": len(sources["gallery"]), "towers": os.path.abspath(args.towers),
              **result}
    write_json(args.out, result)
    shown = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
    print(f"evaluate: {dataset.name} {args.query_split} queries ({len(sources['query'])}) against "
          f"{args.gallery_split} ({len(sources['gallery'])}): {shown}; all metrics in {args.out}")
    return 0
