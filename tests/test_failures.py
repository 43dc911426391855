"""Failure modes a user meets: one-line errors, invalid config values, non-finite training."""

import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import _subproc
import _tiny
from daug_jax import cli
from daug_jax.config import load_config

TOWERS = ["model.vision.resnet={'stage_sizes': (1,), 'widths': (8,), 'stem_width': 8}",
          "model.text.vocab_size=200", "model.text.hidden_size=16", "model.text.num_layers=1",
          "model.text.intermediate_size=32", "model.text.max_length=48", "model.embed_dim=16",
          "train.batch_size=8", "train.warmup=1", "train.log_every=5",
          "data.num_train=32", "data.num_validation=8", "data.num_test=8"]


def test_user_error_is_one_line_with_status_2_and_debug_shows_the_traceback(tmp_path):
    env = _subproc.jax_env(str(tmp_path / "cache"))
    cmd = _subproc.CLI + ["train", "--workdir", str(tmp_path / "w"), "--set", "train.steps=-5"]
    proc = _subproc.start(cmd, env, str(tmp_path / "log"))
    proc.wait(timeout=120)
    lines = [ln for ln in open(tmp_path / "log").read().splitlines() if ln.strip()]
    assert proc.returncode == 2
    assert lines[-1] == "daug-jax train: error: config train.steps = -5: must be a positive integer"
    assert not any("Traceback" in ln for ln in lines)
    proc = _subproc.start(cmd + ["--debug"], env, str(tmp_path / "debug.log"))
    proc.wait(timeout=120)
    assert proc.returncode == 1 and "Traceback" in open(tmp_path / "debug.log").read()


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", "train.steps = 0: must be a positive integer"),
    ("train.batch_size=-8", "train.batch_size = -8: must be a positive integer"),
    ("train.lr=-1.0", "train.lr = -1.0: must be a positive number"),
    ("train.clip_weight=1.5", r"train.clip_weight = 1.5: must be a number in \[0, 1\]"),
    ("data.label_policy='maybe'", "data.label_policy = 'maybe': must be 'ignore'"),
    ("data.train_split='train+'", "data.train_split = 'train\\+': must be a split name"),
])
def test_invalid_config_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("towers", [override])


def test_tied_config_values_are_checked():
    with pytest.raises(ValueError, match=r"heatmaps.level = 600: must be <= T - 1 = 999 and <= "
                                         r"the classifier's trained level .* = 500"):
        load_config("mimic_cxr", ["heatmaps.level=600"])
    with pytest.raises(ValueError, match=r"data.image_size = 34: the UNet's 3 levels need a "
                                         r"multiple of 4"):
        load_config("diffusion", ["data.image_size=34"])
    with pytest.raises(ValueError, match=r"heatmaps.scale = -1.0: must be a number >= 0"):
        load_config("heatmaps", ["heatmaps.scale=-1.0"])


def _finite_checkpoints(workdir):
    """{step: all leaves finite} for every complete checkpoint in ``workdir``."""
    root = os.path.join(workdir, "checkpoints")
    out = {}
    for name in sorted(os.listdir(root)):
        if name.isdigit():
            tree = ocp.StandardCheckpointer().restore(os.path.join(root, name, "state"))
            out[int(name)] = all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
                                 if np.issubdtype(np.asarray(x).dtype, np.floating))
    return out


def test_non_finite_training_stops_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    """lr = 1e8 blows the towers up: the run stops naming the step, exit status 2, and every
    checkpoint left is finite; with train.skip_nonfinite the steps are skipped and counted."""
    workdir = str(tmp_path / "nan")
    args = ["train", "--workdir", workdir, "--data-dir", str(tmp_path / "tfds"),
            *_tiny.sets(TOWERS + ["train.lr=1e8", "train.steps=30", "train.checkpoint_every=10"])]
    assert cli.main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    step = int(re.search(r"non-finite training at step (\d+)", last).group(1))
    assert last.startswith("daug-jax train: error: train: non-finite training at step")
    kept = _finite_checkpoints(workdir)
    assert all(kept.values()) and all(s < step for s in kept), (kept, step)

    skipping = str(tmp_path / "skip")
    assert cli.main([*args[:2], skipping, *args[3:], "--set", "train.skip_nonfinite=True"]) == 0
    history = [json.loads(r) for r in open(os.path.join(skipping, "metrics.jsonl"))]
    assert sum(r["skipped"] for r in history) > 0
    assert all(_finite_checkpoints(skipping).values())


def test_second_run_on_a_workdir_fails_at_once_naming_the_holder(tmp_path, capsys):
    import socket
    import time

    workdir = tmp_path / "towers"
    args = ["train", "--workdir", str(workdir), "--data-dir", str(tmp_path / "tfds"),
            *_tiny.sets(TOWERS + ["train.steps=100000", "train.checkpoint_every=50000"])]
    env = _subproc.jax_env(str(tmp_path / "cache"))
    first = _subproc.start(_subproc.CLI + args, env, str(tmp_path / "first.log"))
    try:
        lock = workdir / ".daug-lock"
        deadline = time.time() + 240
        while not lock.exists():  # the first run holds the workdir once it starts training
            assert first.poll() is None, _subproc.tail(str(tmp_path / "first.log"))
            assert time.time() < deadline, "the first run never took the lock"
            time.sleep(0.5)
        capsys.readouterr()
        assert cli.main(args) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"is in use by pid {first.pid} on {socket.gethostname()}" in last, last
        assert last.startswith("daug-jax train: error: ")
    finally:
        _subproc.kill(first)
