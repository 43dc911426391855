"""The shared training loop (`daug_jax.loop`) on a toy step: logging, saving, exact resume, the
metadata check before restoring, and the non-finite stop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daug_jax import loop
from daug_jax.checkpoint import Checkpointer


@jax.jit
def _step(state, batch):
    """A toy 'training' step: w <- w + batch; loss = sum(w) (NaN once w passes ``limit``)."""
    w = state["w"] + batch["x"]
    loss = jnp.where(jnp.sum(w) > state["limit"], jnp.nan, jnp.sum(w))
    return {"w": w, "limit": state["limit"]}, {"loss": loss, "grad_norm": jnp.float32(1.0)}


def _batches(start):
    step = start
    while True:
        step += 1
        yield {"x": jnp.full((2,), float(step))}  # a pure function of the step


def _run(workdir, *, stop=None, average=False, limit=1e9, meta=None):
    meta = meta or {"shape": [2]}
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=3)
    template = {"w": jnp.zeros(2), "limit": jnp.float32(limit)}
    state, start = loop.resume(ckpt, template, meta, workdir)
    job = loop.Job(name="toy", workdir=workdir, steps=8, log_every=2, save_every=3,
                   log_file="log.jsonl", ckpt=ckpt, meta=meta, stop=stop, average=average,
                   progress=False)
    return loop.fit(job, state, lambda s, b: _step(s, b), _batches(start), start=start)


def _lines(workdir):
    return [json.loads(r) for r in open(os.path.join(workdir, "log.jsonl"))]


def test_per_step_log_checkpoints_and_exact_resume(tmp_path):
    full, hist = _run(str(tmp_path / "full"))
    # w = sum of 1..8 = 36 per entry; one log row per step, the loss of that step.
    np.testing.assert_array_equal(np.asarray(full["w"]), [36.0, 36.0])
    rows = _lines(str(tmp_path / "full"))
    assert [r["step"] for r in rows] == list(range(1, 9)) == [r["step"] for r in hist]
    assert [r["loss"] for r in rows] == [2.0 * k * (k + 1) / 2 for k in range(1, 9)]
    assert sorted(int(d) for d in os.listdir(tmp_path / "full" / "checkpoints")
                  if d.isdigit()) == [6, 8]  # every 3 steps and the last, 2 kept

    split = str(tmp_path / "split")
    _run(split, stop=4)   # saves at 3 and at the stop, 4
    resumed, _ = _run(split)
    np.testing.assert_array_equal(np.asarray(resumed["w"]), np.asarray(full["w"]))
    assert _lines(split) == rows  # the rows past the restored step are not repeated


def test_interval_means(tmp_path):
    _, hist = _run(str(tmp_path / "avg"), average=True)
    rows = hist
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    # Interval (1, 2): losses 2 and 6 -> 4; (7, 8): 56 and 72 -> 64.
    assert rows[0]["loss"] == 4.0 and rows[-1]["loss"] == 64.0
    assert all(r["sec_per_step"] > 0 for r in rows)


def test_resume_refuses_another_configuration_before_restoring(tmp_path):
    workdir = str(tmp_path / "run")
    _run(workdir, stop=3)
    # Another parameter shape would fail inside orbax; the metadata check names the field.
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=3)
    with pytest.raises(ValueError, match=r"\(shape: \[2\] -> \[5\]\); use another --workdir"):
        loop.resume(ckpt, {"w": jnp.zeros(5), "limit": jnp.float32(0)}, {"shape": [5]},
                    workdir)
    assert ckpt.latest_meta() == {"shape": [2]}
    ckpt.close()
    loop.check_resume({"shape": [2]}, {"shape": (2,), "new": 1}, workdir)  # tuples == lists;
    # fields the checkpoint does not have are not compared


def test_non_finite_step_stops_before_it_is_saved(tmp_path):
    workdir = str(tmp_path / "nan")
    # sum(w) after step k is k (k + 1): passes 25 at step 5, so steps 5.. are NaN.
    with pytest.raises(loop.NonFiniteError, match=r"toy: non-finite training at step 5 .*step 3"):
        _run(workdir, limit=25.0)
    steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert steps == [3]
