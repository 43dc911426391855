"""Data parallelism: the same train steps on 1 device, 4 devices and 2 processes give the same result.

The real train steps (``diffusion_step_fn``, ``daug_jax.train.make_train_step``) run 3 steps in
`_distributed_worker.py` subprocesses, whose device counts are fixed by XLA_FLAGS before JAX starts:
  * one process with 4 simulated CPU devices runs them on a 1-device and on a 4-device mesh;
  * two processes with 2 devices each (``jax.distributed`` over 127.0.0.1 via the DAUG_* variables
    and `parallel.maybe_initialize_distributed`, gloo collectives) run them on the 4-device global
    mesh, each process feeding only its half of every global batch.
Tolerances: float32, metrics rtol 1e-5, state leaves atol 1e-5 + rtol 1e-5.  The sharded step
sums per-device partial gradients in a different order than one device sums the whole batch, so
results differ by float32 rounding (~1e-7 relative; observed <= 4e-7 absolute on the parameters).
AdamW normalises each coordinate, so a rounding-level gradient change moves a parameter by a
tiny fraction of one learning-rate step (lr = 1e-3 / 2e-3): 1e-5 is 1 % of a step, far below
what a wrong batch split, a missing all-reduce or a per-device mean would do (those change the
loss at the first step and the parameters by whole steps).

Mixed precision: the same worker runs one bfloat16-compute step for the UNet, the noise-aware
classifier and the two towers (vision and text dtype); the lowered program must contain bf16
arithmetic, the loss must be finite and the parameters must stay float32.
"""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest

import _subproc

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_distributed_worker.py")
TIMEOUT = 540
MODELS = ("diffusion", "towers")
BF16 = ("diffusion", "classifier", "towers")


def _load(path: str) -> dict:
    with np.load(path) as data:
        return dict(data)


def _runs(results: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Compilation cache and workdir shared by every subprocess (one tokenizer for the towers)."""
    base = tmp_path_factory.mktemp("distributed")
    os.makedirs(base / "work")
    return {"cache": str(tmp_path_factory.getbasetemp() / "jax-cache"), "base": base,
            "work": str(base / "work")}


@pytest.fixture(scope="module")
def single(shared):
    """One process, 4 devices: float32 on 1 and 4 devices, bfloat16 on 4."""
    runs = [a for m in MODELS for n in ("1", "4") for a in ("--run", m, "float32", n)]
    runs += [a for m in BF16 for a in ("--run", m, "bfloat16", "4")]
    out = str(shared["base"] / "single.npz")
    _subproc.run([_subproc.PYTHON, WORKER, out, "--workdir", shared["work"]] + runs,
                 _subproc.jax_env(shared["cache"], devices=4), out + ".log", TIMEOUT)
    return _load(out)


@pytest.fixture(scope="module")
def multi(shared, single):
    """Two processes over loopback, 2 devices each (after `single`: it learns the tokenizer)."""
    out = str(shared["base"] / "multi.npz")
    runs = [a for m in MODELS for a in ("--run", m, "float32", "all")]
    coordinator = f"127.0.0.1:{_subproc.free_port()}"
    procs, logs = [], [f"{out}.{i}.log" for i in range(2)]
    try:
        for i in range(2):
            env = _subproc.jax_env(shared["cache"], devices=2, DAUG_COORDINATOR=coordinator,
                                   DAUG_NUM_PROCESSES="2", DAUG_PROCESS_ID=str(i))
            procs.append(_subproc.start(
                [_subproc.PYTHON, WORKER, out, "--workdir", shared["work"]] + runs, env, logs[i]))
        deadline = time.monotonic() + TIMEOUT
        for proc, log in zip(procs, logs):
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"process timed out after {TIMEOUT} s:\n{_subproc.tail(log)}")
            if proc.returncode != 0:
                raise AssertionError(f"process exited with {proc.returncode}:\n{_subproc.tail(log)}")
    finally:
        for proc in procs:
            _subproc.kill(proc)
    return _load(out)


def _assert_same_run(got: dict, expected: dict, what: str) -> None:
    metrics = sorted(k for k in expected if k.startswith("metric/"))
    states = sorted(k for k in expected if k.startswith("state"))
    assert metrics and states, f"{what}: nothing to compare"
    assert sorted(k for k in got if k.startswith(("metric/", "state"))) == metrics + states
    for key in metrics:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=0, err_msg=f"{what} {key}")
    for key in states:
        assert got[key].dtype == expected[key].dtype, f"{what} {key}"
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5,
                                   err_msg=f"{what} {key}")


@pytest.mark.parametrize("model", MODELS)
def test_four_devices_match_one_device(single, model):
    one, four = _runs(single, f"{model}/float32/1/"), _runs(single, f"{model}/float32/4/")
    assert int(one["num_devices"]) == 1 and int(four["num_devices"]) == 4
    _assert_same_run(four, one, f"{model} 4 devices vs 1")


@pytest.mark.parametrize("model", MODELS)
def test_two_processes_match_one_process(single, multi, model):
    assert int(multi["process_count"]) == 2
    both = _runs(multi, f"{model}/float32/all/")
    assert int(both["num_devices"]) == 4
    _assert_same_run(both, _runs(single, f"{model}/float32/1/"), f"{model} 2 processes vs 1")


@pytest.mark.parametrize("model", BF16)
def test_bfloat16_compute_float32_params(single, model):
    run = _runs(single, f"{model}/bfloat16/4/")
    assert int(run["bf16_values"]) > 0, f"{model}: no bfloat16 arithmetic in the lowered step"
    assert np.all(np.isfinite(run["metric/loss"])), run["metric/loss"]
    params = {k: v for k, v in run.items() if k.startswith("state") and "param" in k}
    assert params
    for key, value in params.items():
        assert value.dtype == np.float32, f"{model} {key}: {value.dtype}"
        assert np.all(np.isfinite(value)), key
    if model in MODELS:  # float32 programs of the same step have no bf16 at all
        assert int(single[f"{model}/float32/4/bf16_values"]) == 0
        np.testing.assert_allclose(run["metric/loss"][0], single[f"{model}/float32/4/metric/loss"][0],
                                   rtol=0.05)
