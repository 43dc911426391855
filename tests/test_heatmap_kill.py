"""``daug-jax heatmaps`` as two processes: process 1 SIGKILLed mid-job (held by the test hook
``DAUG_TEST_PAUSE_AFTER_SHARD`` right after its first shard, 1, is complete), process 0 finishes
on its own, the dataset is incomplete; the same two commands rerun complete it with exactly one
record per source id, in split order (the killed process's ``.tmp`` shard does not stop it, and
its lock died with it: an OS lock, released by the kernel).
"""

from __future__ import annotations

import json
import os

import ml_collections
import pytest

import _subproc
import _tiny
from daug_jax import cli
from daug_jax.data import registry
from daug_jax.heatmap_job import PAUSE_AFTER_SHARD, HeatmapSource
from daug_jax.lock import LOCK_NAME

SIZE, NUM_TRAIN, SHARD = 32, 64, 8  # 8 shards: process 0 writes 0, 2, 4, 6 and process 1 the rest
DATA = ["data.num_train=64", "data.num_validation=8", "data.num_test=8", f"data.image_size={SIZE}"]
MODELS = _tiny.diffusion(steps=2, save_every=2)
# Two batches per shard.  Process 1 is killed paused after its first shard: 3, 5 and 7 missing.
HEATMAPS = ["heatmaps.targets='No Finding'", "heatmaps.num_steps=2", "heatmaps.batch_size=4",
            f"heatmaps.shard_size={SHARD}", "heatmaps.calibration.num_images=8"]
TIMEOUT = 240


def _shards(split_dir, suffix=".array_record") -> list[int]:
    """Indices of the shard files in ``split_dir`` ending in ``suffix``."""
    if not os.path.isdir(split_dir):
        return []
    return sorted(int(n.split("-")[1]) for n in os.listdir(split_dir)
                  if n.startswith("heatmaps-") and n.endswith(suffix))


def _start_job(tmp, out, tag, pause_after=None):
    """Both processes of one ``daug-jax heatmaps`` job (a fresh coordinator port each time);
    ``pause_after``: process 1 blocks once that shard is complete (the test hook)."""
    env = _subproc.jax_env(str(tmp / "jax-cache"))
    port = _subproc.free_port()
    cmd = _subproc.CLI + ["heatmaps", "--diffusion", tmp / "diffusion", "--classifier",
                          tmp / "classifier", "--out", out, "--splits", "train",
                          "--data", "synthetic_cxr", "--data-dir", tmp / "tfds",
                          *_tiny.sets(DATA + HEATMAPS)]
    procs = []
    for rank in range(2):
        penv = {**env, "DAUG_COORDINATOR": f"127.0.0.1:{port}", "DAUG_NUM_PROCESSES": "2",
                "DAUG_PROCESS_ID": str(rank)}
        if rank == 1 and pause_after is not None:
            penv[PAUSE_AFTER_SHARD] = str(pause_after)
        procs.append(_subproc.start([str(c) for c in cmd], penv, str(tmp / f"{tag}{rank}.log")))
    return procs


def _wait_ok(proc, log, timeout=TIMEOUT):
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, _subproc.tail(log)


def _kill_when_paused(proc, shard, split_dir, log):
    """SIGKILLs ``proc`` (process 1) where the test hook holds it, once its first ``shard`` is
    complete on disk: it cannot write another shard, nor finish, before the kill."""
    try:
        _subproc.wait_for_line(proc, log, f"{PAUSE_AFTER_SHARD}={shard}: paused", TIMEOUT)
    finally:
        _subproc.kill(proc)  # reaped too: its pid is dead, as after a crash
    assert proc.returncode == -9, f"expected death by SIGKILL, got exit code {proc.returncode}"
    mine = [k for k in _shards(split_dir) if k % 2]
    assert mine == [shard], f"killed paused after shard {shard}, process 1 has shards {mine}"


def test_killed_process_then_rerun_gives_one_record_per_id(tmp_path):
    data = ["--data", "synthetic_cxr", "--data-dir", str(tmp_path / "tfds"), *_tiny.sets(DATA)]
    for command in ("train-diffusion", "train-classifier"):
        assert cli.main([command, "--workdir", str(tmp_path / command.split("-")[1]), *data,
                         *_tiny.sets(MODELS)]) == 0
    out, split_dir = tmp_path / "heatmaps", tmp_path / "heatmaps" / "train"
    procs = _start_job(tmp_path, out, "first", pause_after=1)
    try:
        _kill_when_paused(procs[1], 1, str(split_dir), str(tmp_path / "first1.log"))
        _wait_ok(procs[0], str(tmp_path / "first0.log"))  # does not wait for process 1
    finally:
        for proc in procs:
            _subproc.kill(proc)
    done = _shards(split_dir)
    assert [k for k in done if k % 2 == 0] == [0, 2, 4, 6], done
    missing = sorted({1, 3, 5, 7} - set(done))
    assert missing, f"process 1 finished all its shards before it was killed: {done}"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        HeatmapSource(str(split_dir))

    # What a crash of process 1 can leave beside: a half-written shard (the pause comes before
    # its next shard is opened, so there is none yet), and the lock file, written by whichever
    # process took the lock first, with no live holder now.
    name = json.loads((split_dir / "metadata.json").read_text())["shards"][missing[0]]
    assert not _shards(split_dir, ".tmp"), os.listdir(split_dir)
    (split_dir / f"{name}.tmp").write_bytes(b"half a shard")
    assert (out / LOCK_NAME).exists()

    procs = _start_job(tmp_path, out, "rerun")
    try:
        for rank, proc in enumerate(procs):
            _wait_ok(proc, str(tmp_path / f"rerun{rank}.log"))
    finally:
        for proc in procs:
            _subproc.kill(proc)
    logs = "".join(_subproc.tail(str(tmp_path / f"rerun{r}.log"), 10**6) for r in range(2))
    assert "in use by" not in logs and not _shards(split_dir, ".tmp")

    source = registry.open_dataset(ml_collections.ConfigDict(dict(
        name="synthetic_cxr", data_dir=str(tmp_path / "tfds"), image_size=SIZE,
        num_train=NUM_TRAIN, num_validation=8, num_test=8, seed=0))).source("train")
    maps = HeatmapSource(str(split_dir))
    ids = [maps[i]["id"] for i in range(len(maps))]
    want = [source[i]["id"].decode() for i in range(len(source))]
    assert len(ids) == len(want) == NUM_TRAIN and ids == want  # one per source id, in order
    assert [maps[i]["index"] for i in range(len(maps))] == list(range(NUM_TRAIN))
