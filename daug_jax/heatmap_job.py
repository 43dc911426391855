"""The heatmap dataset: DAug channels for every record of a split, written once, read by index.

    daug-jax heatmaps --diffusion runs/diffusion --classifier runs/classifier \\
        --targets "Pleural Effusion,No Finding" --out runs/heatmaps

writes ``runs/heatmaps/<split>/`` for each split of the benchmark: array_record shards whose
record i is ``{"index": i, "id": <source id>, "heatmaps": [H, W, K]}`` and a ``metadata.json``
(scale constant, targets, encode level, DDIM steps, guidance scale).  The scale constant is
calibrated once on the first images of the first split and kept in ``calibration.json``, so all
splits, and a rerun, share it.  An interrupted job rerun with the same command redoes only the
shards that are not complete; ``<out>/.daug-lock`` keeps a second job off the same
directory while one runs (its processes share the lock, `daug_jax.lock`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import jax
import numpy as np
from array_record.python import array_record_data_source, array_record_module
from flax import serialization
from tqdm import tqdm

from daug_jax.config import load_config
from daug_jax.data import pipeline, registry
from daug_jax.diffusion.schedule import to_model_space
from daug_jax.files import as_json, pause_for_test, read_json, write_json
from daug_jax.heatmaps import (HeatmapFn, add_model_args, calibrate_scale, load_models,
                               make_heatmap_fn, make_translation, scale_heatmaps)
from daug_jax.lock import workdir_lock

_METADATA = "metadata.json"
_CALIBRATION = "calibration.json"
# Test-only fault injection (`files.pause_for_test`): stop once shard <k> is in place.
PAUSE_AFTER_SHARD = "DAUG_TEST_PAUSE_AFTER_SHARD"


def _num_records(path: str) -> int | None:
    """Records in a finished array_record file, or None if it is missing or unreadable."""
    if not os.path.exists(path):
        return None
    try:
        reader = array_record_module.ArrayRecordReader(path)
        count = reader.num_records()
        reader.close()
        return count
    except (RuntimeError, ValueError, OSError):
        return None


def write_heatmap_dataset(source: Any, out_dir: str, heatmap_fn: HeatmapFn, scale_constant: float,
                          *, batch_size: int = 16, shard_size: int = 256, dtype: str = "uint8",
                          extra_metadata: dict | None = None) -> dict:
    """Writes the heatmaps of every record of ``source``, aligned 1:1 with it; returns the metadata.

    source: random-access split whose records have "id" and "image" ([H, W, C] uint8, or float in
    [0, 1]).  Record i of the output is ``{"index": i, "id": source[i]["id"], "heatmaps": [H, W,
    K]}`` (uint8 = round(255 * channel), or float16), in array_record shards of ``shard_size``
    records, each renamed into place once complete: a rerun redoes only the missing shards, and
    the result has exactly one record per source id.  Of P processes (`job_process`), process p
    writes shards p, p + P, ...  A rerun with other settings (`_store_metadata`) is refused.
    """
    if dtype not in ("uint8", "float16"):
        raise ValueError(f"dtype must be 'uint8' or 'float16', got {dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size}, "
                         f"{shard_size}")
    n = len(source)
    num_shards = max(1, -(-n // shard_size))
    meta = _store_metadata(out_dir, {
        "num_records": n, "shard_size": shard_size, "dtype": dtype,
        "scale_constant": float(scale_constant),
        "shards": [f"heatmaps-{k:05d}-of-{num_shards:05d}.array_record"
                   for k in range(num_shards)],
        **heatmap_fn.settings(), **(extra_metadata or {})})
    index, count = job_process()
    mine = range(index, num_shards, count)
    for k in mine:                            # leftovers of this process's interrupted shards
        tmp = os.path.join(out_dir, meta["shards"][k] + ".tmp")
        if os.path.exists(tmp):
            os.remove(tmp)

    def rows(k):
        return range(k * shard_size, min(n, (k + 1) * shard_size))

    todo = [k for k in mine
            if _num_records(os.path.join(out_dir, meta["shards"][k])) != len(rows(k))]
    bar = tqdm(total=sum(len(rows(k)) for k in todo), desc=f"heatmaps {os.path.basename(out_dir)}",
               unit="img")
    for k in todo:
        path = os.path.join(out_dir, meta["shards"][k])
        _write_shard(path, source, rows(k), heatmap_fn, scale_constant, batch_size, dtype, bar)
        pause_for_test(PAUSE_AFTER_SHARD, k, f"paused after shard {path}")
    bar.close()
    return meta


def _store_metadata(out_dir: str, meta: dict) -> dict:
    """Writes ``metadata.json`` (as JSON reads it back) unless the directory holds heatmaps made
    with other settings, which are refused rather than mixed in."""
    meta = as_json(meta)
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, _METADATA)
    old = read_json(meta_path, meta)  # a new directory: nothing to differ from
    diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
    if diff:
        raise ValueError(f"{out_dir} holds heatmaps made with other settings "
                         f"({', '.join(diff)}: {[old.get(k) for k in diff]} vs "
                         f"{[meta.get(k) for k in diff]}); use another output directory")
    write_json(meta_path, meta)  # every process writes the same bytes (atomic rename)
    return meta


def _write_shard(path: str, source: Any, rows: range, heatmap_fn: HeatmapFn,
                 scale_constant: float, batch_size: int, dtype: str, bar: tqdm) -> None:
    """The records ``rows`` of ``source`` into the shard ``path``: written under a temporary
    name, renamed once complete (an interrupted shard leaves no file of its final name)."""
    writer = array_record_module.ArrayRecordWriter(f"{path}.tmp", "group_size:1")
    try:
        for start in range(rows.start, rows.stop, batch_size):
            index = np.arange(start, min(rows.stop, start + batch_size))
            batch = pipeline.read(source, index)
            if "id" not in batch:
                raise ValueError(f"source records need an 'id' field, got {sorted(batch)}")
            # A shard's last batch is padded to the compiled batch size.
            _, raw = heatmap_fn(pipeline.pad_rows(to_model_space(batch["image"]), batch_size))
            heat = scale_heatmaps(jax.device_get(raw)[:len(index)], scale_constant)
            heat = (np.round(heat * 255).astype(np.uint8) if dtype == "uint8"
                    else heat.astype(np.float16))
            for j, i in enumerate(index):
                writer.write(serialization.msgpack_serialize(
                    {"index": int(i), "id": str(batch["id"][j]), "heatmaps": heat[j]}))
            bar.update(len(index))
    except BaseException:
        writer.close()
        os.remove(f"{path}.tmp")
        raise
    writer.close()
    os.replace(f"{path}.tmp", path)


class HeatmapSource:
    """Random access to a heatmap dataset: ``source[i] -> {"index", "id", "heatmaps"}``, with
    ``heatmaps`` [H, W, K] float32 the [0, 1] channels (uint8 storage decoded as v / 255)."""

    def __init__(self, directory: str):
        self.metadata = read_json(os.path.join(directory, _METADATA))
        if self.metadata is None:
            raise FileNotFoundError(f"no heatmap dataset in {directory} (missing {_METADATA})")
        paths = [os.path.join(directory, s) for s in self.metadata["shards"]]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"heatmap dataset {directory} is incomplete ({len(missing)} "
                                    f"shards missing, e.g. {missing[0]}); rerun the heatmaps job")
        self._records = array_record_data_source.ArrayRecordDataSource(paths)
        if len(self._records) != self.metadata["num_records"]:
            raise ValueError(f"heatmap dataset {directory} has {len(self._records)} records, "
                             f"metadata says {self.metadata['num_records']}")

    def __len__(self) -> int:
        return len(self._records)

    def check_matches(self, source: Any, channels: int, samples: int = 64) -> None:
        """Raises, naming the shapes or the id, unless these heatmaps belong to ``source``: checks
        the record count, the image size and the channel count (``channels`` heatmaps expected),
        and the ids of ``samples`` records spread over the split (every batch read checks its own).
        """
        where = self.metadata.get("split", "?")
        if len(self) != len(source):
            raise ValueError(f"the heatmap dataset ({where}) has {len(self)} records, the image "
                             f"split {len(source)}: it was made from another split or dataset")
        targets = self.metadata["targets"]
        if len(targets) != channels:
            raise ValueError(f"the heatmap dataset has {len(targets)} channel(s) {targets}, the "
                             f"towers expect {channels} (model.vision.in_channels - 1)")
        stored, size = self.metadata.get("image_shape"), np.shape(source[0]["image"])[:2]
        if stored is not None and list(size) != list(stored[:2]):
            raise ValueError(f"the heatmaps are {stored[0]}x{stored[1]}, the images "
                             f"{'x'.join(map(str, size))}")
        for i in sorted({int(i) for i in np.linspace(0, len(source) - 1, samples)}):
            want, got = pipeline.read(source, [i])["id"][0], self[i]["id"]
            if str(want) != str(got):
                raise ValueError(f"image record {i} has id {str(want)!r}, its heatmap record id "
                                 f"{str(got)!r}: the heatmaps were made from another split")

    def _decode(self, raw: bytes) -> dict:
        record = serialization.msgpack_restore(raw)
        heat = record["heatmaps"]
        record["heatmaps"] = heat.astype(np.float32) / (255.0 if heat.dtype == np.uint8 else 1.0)
        return record

    def __getitem__(self, index: int) -> dict:
        return self._decode(self._records[int(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self._decode(r) for r in self._records.__getitems__([int(i) for i in indices])]


# ----------------------------------------------------------------------------- calibration
def calibrate(heatmap_fn: HeatmapFn, source: Any, out_dir: str, *, num_images: int,
              percentile: float, batch_size: int) -> dict:
    """The dataset's scale constant, with how it was found: read from ``calibration.json`` or
    computed on the first ``num_images`` records of ``source`` and stored there."""
    path = os.path.join(out_dir, _CALIBRATION)
    settings = as_json({**heatmap_fn.settings(), "num_images": int(min(num_images, len(source))),
                        "percentile": float(percentile)})
    stored = read_json(path)
    if stored is not None:
        if {k: stored.get(k) for k in settings} != settings:
            raise ValueError(f"{path} was calibrated with other settings {stored}; "
                             f"use another output directory")
        return stored
    raw = []  # [N, H, W, K] of the first N images, in padded batches
    for start in tqdm(range(0, settings["num_images"], batch_size), desc="calibration",
                      unit="batch"):
        index = np.arange(start, min(start + batch_size, settings["num_images"]))
        x = pipeline.pad_rows(to_model_space(pipeline.read(source, index)["image"]), batch_size)
        raw.append(jax.device_get(heatmap_fn(x)[1])[:len(index)])
    calibration = {**settings, "scale_constant": calibrate_scale(np.concatenate(raw), percentile)}
    os.makedirs(out_dir, exist_ok=True)
    write_json(path, calibration)
    return calibration


def job_process() -> tuple[int, int]:
    """``(p, P)``: this process's index in its heatmap job and the job's process count, read
    from ``DAUG_PROCESS_ID`` / ``DAUG_NUM_PROCESSES`` (or, under ``DAUG_DISTRIBUTED=auto``, from
    JAX's runtime).  Otherwise the CLI leaves that runtime unjoined (`cli.py`): it would tie each
    process to the others' lives, and a killed process should cost only its own shards."""
    if os.environ.get("DAUG_DISTRIBUTED") == "auto":
        return jax.process_index(), jax.process_count()
    if not os.environ.get("DAUG_COORDINATOR"):
        return 0, 1
    count, index = int(os.environ["DAUG_NUM_PROCESSES"]), int(os.environ["DAUG_PROCESS_ID"])
    if not 0 <= index < count:
        raise ValueError(f"DAUG_PROCESS_ID={index} is not in [0, DAUG_NUM_PROCESSES={count})")
    return index, count


# ----------------------------------------------------------------------------- CLI
# The CLI joins JAX's multi-process runtime for this command only under DAUG_DISTRIBUTED=auto.
SHARES_COMPUTATION = False


def main(command: str, argv: list[str]) -> int:
    """The heatmap datasets of ``--splits`` under ``--out``, this process's shards."""
    parser = argparse.ArgumentParser(prog="daug-jax heatmaps", description=__doc__.splitlines()[0])
    add_model_args(parser, out="runs/heatmaps")
    parser.add_argument("--targets", help='e.g. "Pleural Effusion,No Finding" (default: config)')
    parser.add_argument("--splits", default="train,validation,test")
    args = parser.parse_args(argv)
    process = job_process()
    with workdir_lock(args.out, what="heatmaps"):
        config = load_config(args.config, args.set)
        registry.apply_data_args(config, args)
        h = config.heatmaps
        models = load_models(args.diffusion, args.classifier)
        heatmap_fn = make_heatmap_fn(models, args.targets or h.targets,
                                     make_translation(models, h), h.scale)
        dataset = registry.open_dataset(config.data, image_size=models.image_shape[0])
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        sources = {s: dataset.source(s) for s in splits}
        calibration = calibrate(heatmap_fn, sources[splits[0]], args.out,
                                num_images=h.calibration.num_images,
                                percentile=h.calibration.percentile, batch_size=h.batch_size)
        scale_constant = calibration["scale_constant"]
        print(f"heatmaps: {dataset.name}, targets {[t.spec for t in heatmap_fn.targets]}, scale "
              f"constant {scale_constant:.4g} (raw |x_c - x0| at the "
              f"{h.calibration.percentile}th percentile), process {process[0] + 1} of "
              f"{process[1]}")
        for split, source in sources.items():
            meta = write_heatmap_dataset(
                source, os.path.join(args.out, split), heatmap_fn, scale_constant,
                batch_size=h.batch_size, shard_size=h.shard_size, dtype=h.dtype,
                extra_metadata={"split": split, "dataset": dataset.name,
                                "calibration": calibration})
            print(f"heatmaps {split}: {meta['num_records']} records in {len(meta['shards'])} "
                  f"shards under {os.path.join(args.out, split)}")
    return 0
