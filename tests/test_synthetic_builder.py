"""The ``synthetic_cxr`` TFDS builder: build, read back through as_data_source, batch."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from daug_jax.data import builders, pipeline, registry, synthetic


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    config = builders.SyntheticCxrConfig(image_size=32, num_train=20, num_validation=6,
                                         num_test=4, seed=5)
    builder = builders.SyntheticCxr(config=config, data_dir=data_dir)
    builder.download_and_prepare()
    return builder, config, data_dir


def test_round_trip_equals_the_generator(built):
    builder, config, _ = built
    train = builder.as_data_source(split="train")
    assert len(train) == 20
    ref = synthetic.generate(20, image_size=32, seed=config.split_seed("train"))
    records = [train[i] for i in range(20)]
    by_id = {r["id"].decode() if isinstance(r["id"], bytes) else r["id"]: r for r in records}
    for j, rid in enumerate(ref["id"]):
        rec = by_id[str(rid)]
        assert rec["image"].dtype == np.uint8 and rec["image"].shape == (32, 32, 1)
        # uint8 storage: at most half a grey level of rounding.
        np.testing.assert_allclose(pipeline.to_unit_float(rec["image"]), ref["image"][j],
                                   atol=0.5 / 255 + 1e-6)
        np.testing.assert_array_equal(rec["labels"], ref["labels"][j])
        np.testing.assert_array_equal(rec["masks"], ref["masks"][j])
        np.testing.assert_array_equal(rec["sites"], ref["sites"][j])
        report = rec["report"].decode() if isinstance(rec["report"], bytes) else rec["report"]
        assert report == ref["report"][j]


def test_splits_sizes_and_no_shared_records(built):
    builder, _, _ = built
    ids = {}
    for split, n in (("train", 20), ("validation", 6), ("test", 4)):
        src = builder.as_data_source(split=split)
        assert len(src) == n
        ids[split] = {src[i]["id"] for i in range(n)}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"])
    assert list(builder.info.metadata["class_names"]) == list(synthetic.CLASS_NAMES)


def test_registered_by_name_and_batched_by_the_pipeline(built):
    _, config, data_dir = built
    builder = tfds.builder("synthetic_cxr", config=config, data_dir=data_dir)
    reader = pipeline.BatchReader(builder.as_data_source(split="train"), label_columns=range(7),
                                  reports=True)
    batch = next(pipeline.train_batches(reader, 8, seed=1))
    assert batch["image"].shape == (8, 32, 32, 1) and batch["labels"].shape == (8, 7)
    assert batch["report"].dtype.kind == "U"  # bytes decoded to str
    again = pipeline.train_batches(reader, 8, seed=1, start_step=3)
    later = pipeline.train_batches(reader, 8, seed=1)
    for _ in range(3):
        next(later)
    np.testing.assert_array_equal(next(again)["labels"], next(later)["labels"])


def test_bad_configs_and_splits(built):
    with pytest.raises(ValueError, match="image_size must be >= 32"):
        builders.SyntheticCxrConfig(image_size=16)
    with pytest.raises(ValueError, match="num_train must be >= 0"):
        builders.SyntheticCxrConfig(num_train=-1)
    builder, _, _ = built
    dataset = registry.Dataset("synthetic_cxr", builder, registry.REGISTRY["synthetic_cxr"])
    with pytest.raises(ValueError, match="split 'dev' is not in synthetic_cxr .* its splits: test, "
                                         "train, validation"):
        dataset.source("dev")
