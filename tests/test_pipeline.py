"""The batch pipeline: deterministic by (seed, step), per-process slices, clear errors."""

import os

import numpy as np
import pytest

from daug_jax import config as config_lib
from daug_jax import losses
from daug_jax.data import pipeline


def _source(n=10):
    rng = np.random.default_rng(0)
    labels = rng.choice([-1, 0, 1], size=(n, 3)).astype(np.int8)
    return pipeline.ArraySource({
        "image": (np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)),
        "labels": labels, "missing": rng.random((n, 3)) < 0.3,
        "report": np.array([f"r{i}" for i in range(n)]), "id": np.array([f"id-{i}" for i in range(n)]),
    })


def _record_ids(batch):
    return [int(v) for v in batch["image"][:, 0, 0, 0] * 255 + 0.5]


def test_batches_are_a_pure_function_of_seed_and_step():
    reader = pipeline.BatchReader(_source())
    stream = pipeline.train_batches(reader, 4, seed=3)
    first = [_record_ids(next(stream)) for _ in range(6)]
    again = pipeline.train_batches(reader, 4, seed=3, start_step=2)   # a resumed run
    assert [_record_ids(next(again)) for _ in range(4)] == first[2:]
    other = pipeline.train_batches(reader, 4, seed=4)
    assert [_record_ids(next(other)) for _ in range(6)] != first


def test_each_epoch_is_a_permutation_and_epochs_differ():
    reader = pipeline.BatchReader(_source(12))
    stream = pipeline.train_batches(reader, 4, seed=0)
    order = [i for _ in range(6) for i in _record_ids(next(stream))]
    assert sorted(order[:12]) == sorted(order[12:]) == list(range(12))
    assert order[:12] != order[12:]


def test_reader_decodes_labels_with_the_shared_convention():
    source = _source()
    reader = pipeline.BatchReader(source, label_columns=[2, 0], label_policy="ignore", reports=True)
    batch = reader([3, 1])
    assert batch["image"].dtype == np.float32 and batch["image"].max() <= 1.0
    want = losses.labels_and_mask(source.arrays["labels"][[3, 1]][:, [2, 0]],
                                  "ignore", missing=source.arrays["missing"][[3, 1]][:, [2, 0]])
    np.testing.assert_array_equal(batch["labels"], want[0])
    np.testing.assert_array_equal(batch["label_mask"], want[1])
    assert list(batch["report"]) == ["r3", "r1"] and list(batch["id"]) == ["id-3", "id-1"]


def test_reader_joins_heatmaps_by_index_and_checks_ids():
    source = _source(6)
    maps = np.random.default_rng(1).integers(0, 256, (6, 4, 4, 2)).astype(np.uint8)
    aligned = pipeline.ArraySource({"id": source.arrays["id"], "heatmaps": maps})
    batch = pipeline.BatchReader(source, heatmaps=aligned)([4, 0])
    np.testing.assert_allclose(batch["heatmaps"], maps[[4, 0]] / 255.0, rtol=1e-6)
    swapped = pipeline.ArraySource({"id": source.arrays["id"][::-1], "heatmaps": maps})
    with pytest.raises(ValueError, match="record 4 of the image split has id 'id-4' but its "
                                         "heatmap record has id 'id-1'"):
        pipeline.BatchReader(source, heatmaps=swapped)([4, 0])
    with pytest.raises(ValueError, match="heatmap dataset has 5 records, the image split 6"):
        pipeline.BatchReader(source, heatmaps=pipeline.ArraySource(
            {"id": source.arrays["id"][:5], "heatmaps": maps[:5]}))


def test_ordered_batches_keep_order_and_a_partial_last_chunk():
    chunks = list(pipeline.ordered_batches(pipeline.BatchReader(_source(10)), 4))
    assert [list(i) for i, _ in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [_record_ids(b) for _, b in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    np.testing.assert_array_equal(pipeline.pad_rows(np.arange(3), 5), [0, 1, 2, 2, 2])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="larger than the 10 records"):
        pipeline.train_batches(pipeline.BatchReader(_source(10)), 16, seed=0)
    with pytest.raises(ValueError, match="must be positive"):
        pipeline.train_batches(pipeline.BatchReader(_source(10)), 0, seed=0)
    with pytest.raises(ValueError, match="different lengths"):
        pipeline.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})
    bad = pipeline.ArraySource({"image": np.full((2, 4, 4, 1), -0.5, np.float32),
                                "id": np.array(["a", "b"])})
    with pytest.raises(ValueError, match=r"record 1 \(id 'b'\) has pixels in \[-0.5, -0.5\]"):
        pipeline.BatchReader(bad)([1])


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


@pytest.mark.parametrize("args, xla_flags, expected", [
    (["--quick"], "", 2),                       # the demo config's cpu_devices
    (["--set", "cpu_devices=1"], "", 1),        # turned off
    ([], "--xla_force_host_platform_device_count=3", 3),  # the user's XLA_FLAGS win
])
def test_demo_splits_the_cpu_into_its_configured_devices(args, xla_flags, expected):
    """`cli._set_up_process` fixes the CPU device count before JAX starts (fresh interpreter)."""
    import subprocess
    import sys

    from tests._subproc import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags, PYTHONPATH=ROOT)
    code = ("import sys; from daug_jax import cli, experiment as e; cli._set_up_process(e, sys.argv[1:]);"
            " import jax; print(jax.device_count())")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.split()[-1] == str(expected)
