"""Downstream stages read any dataset by the name in their data config."""

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from daug_jax.data import real_common, records, synthetic
from fixtures_real import make_mimic_tree


def test_synthetic_records_are_the_builder_split():
    cfg = ml_collections.ConfigDict(dict(name="synthetic", image_size=32, num_train=6, seed=0))
    data = records.load_records(cfg, "train")
    ref = synthetic.generate(6, image_size=32, seed=0)  # seed 0, split "train" -> 0 * 3 + 0
    np.testing.assert_array_equal(data["labels"], ref["labels"])
    assert list(data["id"]) == list(ref["id"])


def test_mimic_records_by_name(tmp_path):
    manual = tmp_path / "manual"
    make_mimic_tree(manual)
    data_dir = str(tmp_path / "tfds")
    cfg = ml_collections.ConfigDict(dict(name="mimic_cxr", image_size=32, data_dir=data_dir,
                                         report_section="findings+impression", num_train=None))
    with pytest.raises(FileNotFoundError, match="daug-jax data prepare mimic_cxr"):
        records.load_records(cfg, "train")
    real_common.make_builder("mimic_cxr", data_dir=data_dir, image_size=32).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    data = records.load_records(cfg, "train")
    n = len(data["id"])
    assert n > 0 and data["image"].shape == (n, 32, 32, 1) and data["image"].dtype == np.float32
    assert 0.0 <= data["image"].min() and data["image"].max() <= 1.0
    assert data["labels"].shape == data["missing"].shape == (n, 14)
    assert data["class_names"] == list(real_common.CHEXPERT_CLASSES)
    assert all(isinstance(r, str) and r for r in data["report"])


def test_unknown_dataset_name():
    cfg = ml_collections.ConfigDict(dict(name="nih", image_size=32))
    with pytest.raises(ValueError, match="unknown dataset 'nih'"):
        records.load_records(cfg)
