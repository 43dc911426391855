"""Builds that write shard by shard: past TFDS's shuffle buffer, bounded shards, synthetic trees.

``GeneratorBasedBuilder`` shuffles every record and spills to temporary files through TensorFlow
(absent here) once a split passes ``shuffle.MAX_MEM_BUFFER_SIZE`` (1 GB); the builders write
shards directly instead.  The tests below shrink that buffer to one byte, so any build still
routed through the shuffler fails with "No module named 'tensorflow'".
"""

import collections

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle

import fixtures_real as fx
from daug_jax import cli
from daug_jax.data import builders, chexpert, mimic_cxr, pipeline, synthetic
from daug_jax.data import real_common as rc

C = {name: i for i, name in enumerate(rc.CHEXPERT_CLASSES)}


@pytest.fixture
def tiny_buffers(monkeypatch):
    """A shuffler would spill at its first record; shards hold at most 8 records."""
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1)
    monkeypatch.setattr(rc, "MAX_SHARD_RECORDS", 8)


def test_shard_bounds_records_and_bytes(monkeypatch):
    assert [len(s) for s in rc.shard(range(20), 1)] == [20]  # under both bounds
    monkeypatch.setattr(rc, "MAX_SHARD_RECORDS", 8)
    assert [list(s) for s in rc.shard(range(20), 1)] == [
        list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]
    monkeypatch.setattr(rc, "MAX_SHARD_BYTES", 3000)
    assert [len(s) for s in rc.shard(list(range(7)), 1000)] == [3, 3, 1]
    assert [len(s) for s in rc.shard([], 1000)] == [0]  # still one (empty) shard


def test_synthetic_build_past_the_shuffle_buffer(tiny_buffers, tmp_path):
    config = builders.SyntheticCxrConfig(image_size=32, num_train=40, num_validation=6,
                                         num_test=0, seed=2)
    builder = builders.SyntheticCxr(config=config, data_dir=tmp_path)
    builder.download_and_prepare()
    fresh = builders.SyntheticCxr(config=config, data_dir=tmp_path)  # what a later job sees
    splits = fresh.info.splits
    assert splits["train"].shard_lengths == [8, 8, 8, 8, 8]
    assert splits["validation"].shard_lengths == [6]
    assert "test" not in splits  # no record: left out rather than unreadable
    sources = fresh.as_data_source()
    assert set(sources) == {"train", "validation"}
    for split, n in (("train", 40), ("validation", 6)):
        ref = synthetic.generate(n, image_size=32, seed=config.split_seed(split))
        records = [sources[split][i] for i in range(n)]
        assert [r["id"].decode() for r in records] == list(ref["id"])  # index order
        for j, r in enumerate(records):
            np.testing.assert_allclose(pipeline.to_unit_float(r["image"]), ref["image"][j],
                                       atol=0.5 / 255 + 1e-6)
            np.testing.assert_array_equal(r["labels"], ref["labels"][j])
            np.testing.assert_array_equal(r["masks"], ref["masks"][j])
            np.testing.assert_array_equal(r["sites"], ref["sites"][j])
            assert r["report"].decode() == ref["report"][j]


def _films(n: int, image_size: int, size: int) -> np.ndarray:
    """Synthetic films 0 .. n-1 (seed 0) averaged down to size x size, float in [0, 255]."""
    f = image_size // size
    img = synthetic.generate(n, image_size=image_size, seed=0)["image"][..., 0] * 255.0
    return img.reshape(n, size, f, size, f).mean(axis=(2, 4))


def _check_record(r, want, film, size):
    """Labels against the synthetic labels, blank cells as missing, pixels against the film."""
    for i, name in enumerate(synthetic.CLASS_NAMES):
        assert r["labels"][C[name]] == want["labels"][i], name
    missing = np.array([want["cells"][c] == "" for c in rc.CHEXPERT_CLASSES])
    np.testing.assert_array_equal(r["missing"], missing)
    assert not r["labels"][missing].any()
    assert r["image"].shape == (size, size, 1)
    # The same film: > 0.9999 here; two different films correlate under 0.95.
    assert np.corrcoef(r["image"][..., 0].ravel(), film.ravel())[0, 1] > 0.995
    assert (r["study_id"].decode(), r["subject_id"].decode(), r["view"].decode()) == (
        want["study_id"], want["subject_id"], want["view"])


def test_mimic_synthetic_tree_prepares(tiny_buffers, tmp_path, capsys):
    manual = tmp_path / "manual"
    tree = fx.make_mimic_synthetic_tree(manual, num_train=40, num_validation=10, num_test=10)
    assert sum(tree["num_lateral"].values()) >= 3
    code = cli.main(["data", "prepare", "mimic_cxr", "--manual-dir", str(manual),
                     "--data-dir", str(tmp_path / "tfds"), "--size", "32"])
    assert code == 0 and "mimic_cxr/32px_findings_impression train: 40 records" in \
        capsys.readouterr().out
    builder = mimic_cxr.MimicCxr(config=mimic_cxr.MimicCxrConfig(image_size=32),
                                 data_dir=tmp_path / "tfds")
    films = _films(60, 64, 32)
    for split, want in tree["records"].items():
        info = builder.info.splits[split]
        assert info.num_examples == tree["num_frontal"][split]
        assert max(info.shard_lengths) <= 8
        lateral = tree["num_lateral"][split]
        assert builder.info.metadata["dropped"][split] == (
            {"view_excluded": lateral} if lateral else {})
        source = builder.as_data_source(split=split)
        records = [source[i] for i in range(len(source))]
        assert [r["id"].decode() for r in records] == list(want)  # CSV order, laterals dropped
        for r in records:
            w = want[r["id"].decode()]
            assert r["report"].decode() == w["report"] and w["report"]
            _check_record(r, w, films[w["index"]], 32)
    studies = collections.Counter(w["subject_id"] for w in tree["records"]["train"].values())
    assert max(studies.values()) >= 2  # some subjects have several studies


def test_chexpert_synthetic_tree_prepares(tiny_buffers, tmp_path):
    manual = tmp_path / "manual"
    tree = fx.make_chexpert_synthetic_tree(manual, num_train=50, num_validation=10)
    builder = chexpert.ChexpertCxr(config=chexpert.ChexpertCxrConfig(image_size=32),
                                   data_dir=tmp_path / "tfds")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
    films = _films(60, 64, 32)
    for split, want in tree["records"].items():
        info = builder.info.splits[split]
        assert info.num_examples == tree["num_frontal"][split] and max(info.shard_lengths) <= 8
        assert builder.info.metadata["dropped"][split] == {"view_excluded":
                                                           tree["num_lateral"][split]}
        source = builder.as_data_source(split=split)
        records = [source[i] for i in range(len(source))]
        assert [r["id"].decode() for r in records] == list(want)
        for r in records:
            w = want[r["id"].decode()]
            assert r["report"].decode() == ""  # CheXpert has no reports
            _check_record(r, w, films[w["index"]], 32)
    train_cells = [v for w in tree["records"]["train"].values() for v in w["cells"].values()]
    assert "" in train_cells and "-1.0" in train_cells
    assert not any(v == "" for w in tree["records"]["validation"].values()
                   for v in w["cells"].values())
