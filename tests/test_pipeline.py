"""The batch pipeline: deterministic by (seed, step), per-process slices, clear errors."""

import numpy as np
import pytest

from daug_jax import config as config_lib
from daug_jax.data import pipeline


def _source(n=10):
    return pipeline.ArraySource({
        "x": np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32),
        "report": np.array([f"r{i}" for i in range(n)]),
    })


def test_batches_are_a_pure_function_of_seed_and_step():
    a = pipeline.Loader(_source(), 4, seed=3)
    b = pipeline.Loader(_source(), 4, seed=3)
    for step in (0, 1, 5, 17):
        np.testing.assert_array_equal(a.batch(step)["x"], b.batch(step)["x"])
    resumed = list(a.from_step(3, 6))
    full = list(b.from_step(0, 6))[3:]
    for r, f in zip(resumed, full):
        np.testing.assert_array_equal(r["x"], f["x"])
        np.testing.assert_array_equal(r["report"], f["report"])


def test_each_epoch_is_a_permutation_without_repeats():
    loader = pipeline.Loader(_source(12), 4, seed=0)
    assert loader.steps_per_epoch == 3
    seen = np.concatenate([loader.batch(s)["x"][:, 0] for s in range(3)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(12))
    other_epoch = np.concatenate([loader.batch(s)["x"][:, 0] for s in range(3, 6)])
    assert not np.array_equal(seen, other_epoch)  # reshuffled per epoch


def test_unshuffled_epoch_keeps_order_and_partial_batch():
    loader = pipeline.Loader(_source(10), 4, shuffle=False, drop_remainder=False)
    batches = list(loader.epoch())
    assert [len(b["x"]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"][:, 0] for b in batches]), np.arange(10))
    assert batches[0]["report"].tolist() == ["r0", "r1", "r2", "r3"]


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="larger than the 10 records"):
        pipeline.Loader(_source(10), 16)
    with pytest.raises(ValueError, match="positive"):
        pipeline.Loader(_source(10), 0)
    with pytest.raises(ValueError, match="different lengths"):
        pipeline.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})


def test_config_overrides():
    import ml_collections
    cfg = ml_collections.ConfigDict({"train": {"steps": 10, "name": "a"}})
    config_lib.apply_overrides(cfg, ["train.steps=25", "train.name=hello"])
    assert cfg.train.steps == 25 and cfg.train.name == "hello"
    with pytest.raises(KeyError, match="train.nope"):
        config_lib.apply_overrides(cfg, ["train.nope=1"])
    with pytest.raises(ValueError, match="key=value"):
        config_lib.apply_overrides(cfg, ["train.steps"])
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        config_lib.load_config("nope")


def test_cli_routes_and_rejects_unknown_commands(capsys):
    from daug_jax import cli
    assert cli.main(["no-such-command"]) == 2
    assert "usage: daug-jax" in capsys.readouterr().err
