"""Fault tolerance: a training command SIGKILLed mid-run and rerun ends with the uninterrupted run's state.

For each training CLI (``daug-jax train-diffusion``, ``daug-jax train``) with a tiny config,
checkpointing every 2 of 6 steps on 2 simulated devices:
  A. the command runs uninterrupted;
  B. the same command in another workdir is SIGKILLed while the test hook
     ``DAUG_TEST_PAUSE_AFTER_CHECKPOINT`` holds it right after its first checkpoint (step 2) is
     complete, then started again without the hook and left to finish.
The final checkpoints of A and B must be *bitwise* equal, every leaf (parameters, EMA, optimizer
moments, step).  Bitwise, not approximately: batches are a pure function of (seed, step), PRNG keys
are folded from the step, orbax restores the exact float32 bytes, and both runs execute the same
compiled program (same flags, device count and compilation cache) on the same inputs, which XLA
on CPU computes deterministically.  Any tolerance would hide a resume that replays a batch, skips
one or restarts the learning-rate schedule, which all change the bits.
"""

from __future__ import annotations

import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import _subproc
from daug_jax.checkpoint import PAUSE_AFTER_CHECKPOINT

STEPS, EVERY, TIMEOUT = 6, 2, 420

CASES = {
    "train-diffusion": [
        "data.num_train=32", "data.num_validation=8", "data.num_test=8", "unet.ch=8", "unet.channel_mult=(1,)", "unet.norm_groups=4",
        f"unet_train.steps={STEPS}", "unet_train.batch_size=8", f"unet_train.save_every={EVERY}",
        f"unet_train.log_every={EVERY}", "unet_train.warmup_steps=1"],
    "train": [
        "data.num_train=32", "data.num_validation=8", "data.num_test=8",
        "model.vision.resnet={'stage_sizes': (1,), 'widths': (8,), 'stem_width': 8}",
        "model.text.vocab_size=200", "model.text.hidden_size=16", "model.text.num_layers=1",
        "model.text.intermediate_size=32", "model.text.max_length=48", "model.embed_dim=16",
        f"train.steps={STEPS}", "train.batch_size=8", f"train.checkpoint_every={EVERY}",
        f"train.log_every={EVERY}", "train.warmup=1"],
}


def _finished_steps(checkpoints: str) -> list[int]:
    """Steps of the complete checkpoints (orbax renames a step's temporary folder when done)."""
    if not os.path.isdir(checkpoints):
        return []
    return sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())


def _final_state(workdir: str) -> dict:
    """{leaf path: numpy array} of the state in the last checkpoint of ``workdir``."""
    checkpoints = os.path.join(workdir, "checkpoints")
    steps = _finished_steps(checkpoints)
    assert steps and steps[-1] == STEPS, f"{workdir}: checkpoints {steps}, expected one at {STEPS}"
    path = os.path.join(checkpoints, str(STEPS), "state")
    # As host numpy arrays: the checkpoint was written from 2 devices, this process has 1.
    reader = ocp.PyTreeCheckpointer()
    tree = reader.metadata(path).item_metadata
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(tree),
                            is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
    state = reader.restore(path, restore_args=as_numpy)
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _kill_when_paused(cmd: list[str], env: dict, workdir: str) -> int:
    """Starts ``cmd`` with the test hook that blocks it once checkpoint ``EVERY`` is complete
    (``DAUG_TEST_PAUSE_AFTER_CHECKPOINT``), SIGKILLs it there; returns its latest complete step.

    The run cannot finish, nor save another step, before the kill, however fast the machine."""
    checkpoints, log = os.path.join(workdir, "checkpoints"), workdir + ".killed.log"
    proc = _subproc.start(cmd, {**env, PAUSE_AFTER_CHECKPOINT: str(EVERY)}, log)
    try:
        _subproc.wait_for_line(proc, log, f"{PAUSE_AFTER_CHECKPOINT}={EVERY}: paused", TIMEOUT)
    finally:
        _subproc.kill(proc)
    steps = _finished_steps(checkpoints)
    assert proc.returncode == -9, f"expected death by SIGKILL, got exit code {proc.returncode}"
    assert steps and steps[-1] == EVERY, f"killed paused after checkpoint {EVERY}, has {steps}"
    assert steps[-1] < STEPS, f"the run finished ({steps}) before it could be killed"
    return steps[-1]


@pytest.mark.parametrize("command", sorted(CASES))
def test_killed_and_rerun_equals_uninterrupted(command, tmp_path_factory):
    cache = str(tmp_path_factory.getbasetemp() / "jax-cache")
    tmp = tmp_path_factory.mktemp(command)
    env = _subproc.jax_env(cache, devices=2)
    overrides = [a for item in CASES[command] for a in ("--set", item)]
    overrides += ["--data-dir", str(tmp / "tfds")]  # built by the first run, read by the others
    uninterrupted, resumed = str(tmp / "uninterrupted"), str(tmp / "resumed")

    # First the uninterrupted run: it also fills the compilation cache the others load from.
    _subproc.run(_subproc.CLI + [command, "--workdir", uninterrupted] + overrides, env,
                 uninterrupted + ".log", TIMEOUT)
    tokenizer = os.path.join(uninterrupted, "tokenizer")
    if os.path.isdir(tokenizer):
        # The towers learn a WordPiece vocabulary first; its training breaks frequency ties in
        # no fixed order, so a second workdir would get other token ids.  Resume reloads the
        # workdir's tokenizer; giving both runs the same one isolates what this test checks.
        shutil.copytree(tokenizer, os.path.join(resumed, "tokenizer"))

    cmd = _subproc.CLI + [command, "--workdir", resumed] + overrides
    killed_at = _kill_when_paused(cmd, env, resumed)
    output = _subproc.run(cmd, env, resumed + ".log", TIMEOUT)
    # The rerun's progress bar starts at the restored step: it resumed, it did not start over.
    counts = re.findall(rf"\b(\d+)/{STEPS}\b", output)
    assert counts and int(counts[0]) == killed_at, (
        f"rerun should resume at step {killed_at}; its progress started at "
        f"{counts[0] if counts else '?'}:\n{output[-2000:]}")

    expected, got = _final_state(uninterrupted), _final_state(resumed)
    assert sorted(got) == sorted(expected)
    for path in expected:
        assert got[path].dtype == expected[path].dtype, path
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)
