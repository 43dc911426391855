"""MIMIC-CXR-JPG and CheXpert builders, built offline from fixture trees in the original formats."""

import gzip
import logging
import pathlib
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

import fixtures_real as fx
from daug_jax import cli
from daug_jax.config import load_config
from daug_jax.data import chexpert, mimic_cxr, registry
from daug_jax.data import real_common as rc

C = {name: i for i, name in enumerate(rc.CHEXPERT_CLASSES)}


def _vectors(cells: dict[str, int | None]):
    """{class: 1 | 0 | -1 | None (blank)} -> expected (labels, missing), all other classes blank."""
    labels = np.zeros(14, np.int8)
    missing = np.ones(14, bool)
    for name, value in cells.items():
        if value is not None:
            labels[C[name]], missing[C[name]] = value, False
    return labels, missing


def _build(cls, config, data_dir, manual_dir, mode=None):
    builder = cls(config=config, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, **({"download_mode": mode} if mode else {})))
    return builder


def _records(builder) -> dict:
    """{split: {id: record}} read back through a fresh builder (what a later job sees)."""
    fresh = type(builder)(config=builder.builder_config, data_dir=builder.data_dir_root)
    sources = fresh.as_data_source()
    return {split: {r["id"].decode(): r for r in src} for split, src in sources.items()}


def _check_image(image, level, size):
    """Flat grey `level` with a bright top-left quadrant, resized to size x size."""
    assert image.shape == (size, size, 1) and image.dtype == np.uint8
    q, m = size // 8, size // 2
    corners = {"top-left": image[q, q, 0], "top-right": image[q, -q, 0],
               "bottom-left": image[-q, q, 0], "bottom-right": image[-q, -q, 0]}
    assert abs(int(corners.pop("top-left")) - fx.BRIGHT) <= 6, "orientation lost"
    for where, value in corners.items():
        assert abs(int(value) - level) <= 6, (where, value, level)
    assert abs(int(image[m - q, m - q, 0]) - fx.BRIGHT) <= 6  # quadrant scaled with the image


# Expected records, written out by hand from the fixture tables.
FINDINGS = "Moderate right pleural effusion. The cardiac silhouette is normal. No pneumothorax."
IMPRESSION = "Right pleural effusion."
MIMIC_EXPECTED = {
    "train": {
        "d01-pa": ("50414267", "10000032", "PA", f"{FINDINGS} {IMPRESSION}",
                   {"Pleural Effusion": 1, "Cardiomegaly": -1, "Edema": 0}),
        "d03-ap": ("53189527", "10000032", "AP", "No acute cardiopulmonary process.",
                   {"No Finding": 1}),
        "d08-ap": ("50000005", "11000001", "AP", "Lungs are clear. Heart size is normal.",
                   {"No Finding": 1, "Support Devices": 0}),
    },
    "validation": {"d09-pa": ("50000006", "12000002", "PA", f"{FINDINGS} {IMPRESSION}",
                              {"Pneumothorax": -1, "Fracture": 1})},
    "test": {"d10-ap": ("50000007", "13000003", "AP", f"{FINDINGS} {IMPRESSION}",
                        {"Lung Opacity": 1, "Pneumonia": -1})},
}
MIMIC_DROPPED = {
    "train": {"image_corrupt": 1, "image_missing": 1, "report_missing": 1,
              "report_no_sections": 1, "view_excluded": 1},
    "validation": {},
    "test": {"labels_missing": 1, "view_excluded": 1},
}


@pytest.fixture(scope="module")
def mimic_manual(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic_manual")
    return root, fx.make_mimic_tree(root)


@pytest.fixture(scope="module")
def chexpert_manual(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert_manual")
    return root, fx.make_chexpert_tree(root)


def test_encode_labels_blank_is_missing_and_bad_values_are_named():
    row = {"No Finding": "", "Cardiomegaly": "1.0", "Edema": "-1.0", "Fracture": "0.0",
           "Pneumonia": "1", "Atelectasis": " -1 "}
    labels, missing = rc.encode_labels(row)
    want_labels, want_missing = _vectors(
        {"Cardiomegaly": 1, "Edema": -1, "Fracture": 0, "Pneumonia": 1, "Atelectasis": -1})
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(missing, want_missing)
    assert labels.dtype == np.int8 and missing.dtype == np.bool_
    with pytest.raises(ValueError, match=r"row 7: label 'Edema' has value '2.0'"):
        rc.encode_labels({"Edema": "2.0"}, "row 7")


def test_report_sections_and_fallback_order():
    sections = mimic_cxr.report_sections(fx.REPORTS["both"])
    assert sections["FINDINGS"] == FINDINGS and sections["IMPRESSION"] == IMPRESSION
    assert sections["INDICATION"] == "___F with cough and fever. Evaluate for pneumonia."
    pick = mimic_cxr.select_report
    assert pick(fx.REPORTS["both"], "findings") == FINDINGS
    assert pick(fx.REPORTS["both"], "impression") == IMPRESSION
    assert pick(fx.REPORTS["both"], "findings+impression") == f"{FINDINGS} {IMPRESSION}"
    only_impression = "No acute cardiopulmonary process."
    for mode in mimic_cxr.REPORT_SECTIONS:
        assert pick(fx.REPORTS["impression_only"], mode) == only_impression
        # The NOTIFICATION heading ends the findings section.
        assert pick(fx.REPORTS["findings_only"], mode) == "Lungs are clear. Heart size is normal."
        assert pick(fx.REPORTS["neither"], mode) == ""
    joint = " FINDINGS AND IMPRESSION:  Clear lungs.\n"
    assert pick(joint, "findings+impression") == pick(joint, "findings") == "Clear lungs."
    with pytest.raises(ValueError, match="report_section 'summary'"):
        pick("", "summary")


def test_mimic_records_labels_texts_splits_and_skips(mimic_manual, tmp_path, caplog):
    manual, levels = mimic_manual
    config = mimic_cxr.MimicCxr.builder_configs["64px_findings_impression"]
    with caplog.at_level(logging.INFO, logger=rc.__name__):
        builder = _build(mimic_cxr.MimicCxr, config, tmp_path, manual)
    records = _records(builder)
    assert set(records) == set(MIMIC_EXPECTED)
    for split, expected in MIMIC_EXPECTED.items():
        assert set(records[split]) == set(expected), split  # lateral views filtered out
        for dicom, (study, subject, view, report, cells) in expected.items():
            r = records[split][dicom]
            assert (r["study_id"].decode(), r["subject_id"].decode(), r["view"].decode()) == (
                study, subject, view)
            assert r["report"].decode() == report
            labels, missing = _vectors(cells)
            np.testing.assert_array_equal(r["labels"], labels, err_msg=dicom)
            np.testing.assert_array_equal(r["missing"], missing, err_msg=dicom)
            _check_image(r["image"], levels[dicom], 64)
    fresh = mimic_cxr.MimicCxr(config=config, data_dir=tmp_path)
    assert fresh.info.metadata["dropped"] == MIMIC_DROPPED
    assert fresh.info.metadata["class_names"] == list(rc.CHEXPERT_CLASSES)
    summary = [m for m in caplog.messages if "mimic_cxr/64px_findings_impression train" in m]
    assert summary and "kept 3 records; dropped 5" in summary[0] and "image_corrupt=1" in summary[0]


def test_mimic_custom_config_size_and_section(mimic_manual, tmp_path):
    manual, levels = mimic_manual
    config = mimic_cxr.MimicCxrConfig(image_size=32, report_section="impression")
    assert config.name == "32px_impression"
    records = _records(_build(mimic_cxr.MimicCxr, config, tmp_path, manual))
    train = records["train"]
    assert train["d01-pa"]["report"].decode() == IMPRESSION
    assert train["d08-ap"]["report"].decode() == "Lungs are clear. Heart size is normal."
    _check_image(train["d03-ap"]["image"], levels["d03-ap"], 32)
    views = mimic_cxr.MimicCxrConfig(image_size=32, views=("PA", "AP", "LATERAL", "LL"))
    records = _records(_build(mimic_cxr.MimicCxr, views, tmp_path, manual))
    assert set(records["train"]) == {"d01-pa", "d02-lat", "d03-ap", "d08-ap"}
    assert set(records["test"]) == {"d10-ap", "d11-ll"}


def test_mimic_rebuild_is_idempotent(mimic_manual, tmp_path):
    manual, _ = mimic_manual
    config = mimic_cxr.MimicCxrConfig(image_size=16)
    first = _build(mimic_cxr.MimicCxr, config, tmp_path, manual)
    before = _records(first)
    order = [r["id"] for r in first.as_data_source(split="train")]
    again = _build(mimic_cxr.MimicCxr, config, tmp_path, manual,
                   mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)  # regenerates
    after = _records(again)
    assert [r["id"] for r in again.as_data_source(split="train")] == order
    for split in before:
        assert before[split].keys() == after[split].keys()
        for key, record in before[split].items():
            for name, value in record.items():
                np.testing.assert_array_equal(value, after[split][key][name], err_msg=name)
    # Counts are per build, not accumulated over rebuilds.
    assert mimic_cxr.MimicCxr(config=config, data_dir=tmp_path).info.metadata["dropped"] == \
        MIMIC_DROPPED


def test_mimic_build_past_the_shuffle_buffer_in_bounded_shards(mimic_manual, tmp_path,
                                                              monkeypatch):
    """A GeneratorBasedBuilder would spill its first record through TensorFlow (absent)."""
    monkeypatch.setattr(tfds_shuffle, "MAX_MEM_BUFFER_SIZE", 1)
    monkeypatch.setattr(rc, "MAX_SHARD_RECORDS", 2)
    manual, levels = mimic_manual
    config = mimic_cxr.MimicCxrConfig(image_size=16)
    records = _records(_build(mimic_cxr.MimicCxr, config, tmp_path, manual))
    fresh = mimic_cxr.MimicCxr(config=config, data_dir=tmp_path)
    # Train plans 7 images (d02 is lateral) in CSV order: [d01 d03] [d04 d05] [d06 d07] [d08];
    # the middle two shards lose every image to report and image faults, and d08 shares its
    # study (and report) with the shard before it.
    assert fresh.info.splits["train"].shard_lengths == [2, 0, 0, 1]
    assert [r["id"].decode() for r in fresh.as_data_source(split="train")] == [
        "d01-pa", "d03-ap", "d08-ap"]
    assert {s: set(r) for s, r in records.items()} == {
        s: set(e) for s, e in MIMIC_EXPECTED.items()}
    for split, expected in MIMIC_EXPECTED.items():
        for dicom, (_, _, _, report, _) in expected.items():
            assert records[split][dicom]["report"].decode() == report
            _check_image(records[split][dicom]["image"], levels[dicom], 16)
    assert fresh.info.metadata["dropped"] == MIMIC_DROPPED


@pytest.mark.parametrize("remove, named", [
    (None, "mimic-cxr-2.0.0-split.csv.gz"),   # manual directory absent altogether
    ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv.gz"),
    ("mimic-cxr-reports", "mimic-cxr-reports/files"),
])
def test_mimic_missing_manual_file_is_named(mimic_manual, tmp_path, remove, named):
    manual = tmp_path / "manual"
    if remove is not None:
        shutil.copytree(mimic_manual[0], manual)
        target = manual / remove
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    builder = mimic_cxr.MimicCxr(config=mimic_cxr.MimicCxrConfig(image_size=16),
                                 data_dir=tmp_path / "data")
    with pytest.raises(FileNotFoundError, match=f"required file '{named}' not found"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual))
    assert not builder.data_path.exists()


def test_mimic_bad_label_fails_before_writing(mimic_manual, tmp_path):
    manual = tmp_path / "manual"
    shutil.copytree(mimic_manual[0], manual)
    path = manual / mimic_cxr.CHEXPERT_CSV
    with gzip.open(path, "rt") as f:
        text = f.read()
    with gzip.open(path, "wt") as f:
        f.write(text.replace("10000032,53189527,,,,,,,,,1.0", "10000032,53189527,,,,,,,,,yes"))
    builder = mimic_cxr.MimicCxr(config=mimic_cxr.MimicCxrConfig(image_size=16),
                                 data_dir=tmp_path / "data")
    with pytest.raises(ValueError, match="study_id 53189527: label 'No Finding' has value 'yes'"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual))
    assert not builder.data_path.exists()


@pytest.mark.parametrize("variant", ["CheXpert-v1.0-small", "CheXpert-v1.0"])
def test_chexpert_records_and_skips(tmp_path, variant):
    manual = tmp_path / "manual"
    levels = fx.make_chexpert_tree(manual, variant)
    config = chexpert.ChexpertCxr.builder_configs["64px"]
    records = _records(_build(chexpert.ChexpertCxr, config, tmp_path / "data", manual))
    expected = {
        "train": {
            "train/patient00001/study1/view1_frontal.jpg":
                ("patient00001/study1", "patient00001", "AP",
                 {"No Finding": 1, "Support Devices": 1}),
            "train/patient00002/study2/view1_frontal.jpg":
                ("patient00002/study2", "patient00002", "PA",
                 {"Cardiomegaly": -1, "Lung Opacity": 1, "Edema": 0}),
        },
        "validation": {
            "valid/patient64541/study1/view1_frontal.jpg":
                ("patient64541/study1", "patient64541", "AP",
                 {c: 1 if c == "Cardiomegaly" else 0 for c in rc.CHEXPERT_CLASSES}),
        },
    }
    assert set(records) == set(expected)
    for split, want in expected.items():
        assert set(records[split]) == set(want), split
        for key, (study, subject, view, cells) in want.items():
            r = records[split][key]
            assert (r["study_id"].decode(), r["subject_id"].decode(), r["view"].decode(),
                    r["report"].decode()) == (study, subject, view, "")
            labels, missing = _vectors(cells)
            np.testing.assert_array_equal(r["labels"], labels, err_msg=key)
            np.testing.assert_array_equal(r["missing"], missing, err_msg=key)
            _check_image(r["image"], levels[key], 64)
    meta = chexpert.ChexpertCxr(config=config, data_dir=tmp_path / "data").info.metadata
    assert meta["dropped"] == {
        "train": {"image_corrupt": 1, "image_missing": 1, "view_excluded": 1},
        "validation": {"view_excluded": 1},
    }


def test_chexpert_missing_manual_file_is_named(chexpert_manual, tmp_path):
    builder = chexpert.ChexpertCxr(config=chexpert.ChexpertCxrConfig(image_size=16),
                                   data_dir=tmp_path / "data")
    with pytest.raises(FileNotFoundError,
                       match="required file 'CheXpert-v1.0-small/train.csv' not found"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=tmp_path / "absent"))
    manual = tmp_path / "manual"
    shutil.copytree(chexpert_manual[0], manual)
    (manual / "CheXpert-v1.0-small" / "valid.csv").unlink()
    with pytest.raises(FileNotFoundError,
                       match="required file 'CheXpert-v1.0-small/valid.csv' not found"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual))


def test_csv_missing_column_is_named(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("Path,Sex,Age\nx.jpg,Male,40\n")
    with pytest.raises(ValueError, match=r"train.csv: missing column\(s\) \['Frontal/Lateral'"):
        list(rc.iter_csv(path, chexpert.COLUMNS))


def test_cli_prepare_builds_chexpert(chexpert_manual, tmp_path, capsys):
    code = cli.main(["data", "prepare", "chexpert_cxr", "--manual-dir", str(chexpert_manual[0]),
                     "--data-dir", str(tmp_path), "--size", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "chexpert_cxr/16px train: 2 records" in out
    assert "chexpert_cxr/16px validation: 1 records" in out


def test_mimic_experiment_config_is_read_by_every_stage(tmp_path):
    """experiments/mimic_cxr.py holds what each stage reads (shapes only: nothing is trained)."""
    import jax
    import jax.numpy as jnp

    from daug_jax import tower_inputs
    from daug_jax import train as ttrain
    from daug_jax.models import two_tower
    from daug_jax.diffusion import train as dtrain
    from daug_jax.heatmaps import parse_targets

    config = load_config(str(pathlib.Path(__file__).parents[1] / "experiments" / "mimic_cxr.py"))
    data = ml_collections.ConfigDict(dict(data_dir=str(tmp_path),
                                          report_section=config.data.report_section))
    builder = registry.make_builder(config.data.name, data, config.data.image_size)
    assert isinstance(builder, mimic_cxr.MimicCxr)
    assert builder.builder_config.name in mimic_cxr.MimicCxr.builder_configs  # a predefined one
    assert builder.builder_config.report_section == config.data.report_section
    with pytest.raises(ValueError, match="unknown dataset 'chexpert'"):
        registry.make_builder("chexpert", data, 224)
    size = config.data.image_size
    assert size == 256 and config.data.train_split == "train+validation"
    # The diffusion side: UNet and classifier at the dataset's size.
    x, t = jnp.zeros((1, size, size, 1)), jnp.zeros((1,), jnp.int32)
    for module in (dtrain.make_unet(config), dtrain.make_classifier(config, 14)):
        variables = jax.eval_shape(module.init, jax.random.key(0), x, t)
        assert jax.eval_shape(module.apply, variables, x, t).shape[0] == 1
    assert dtrain.trained_max_level(config) == 500  # classifier.max_level, within [0, T)
    # One heatmap channel, towards "No Finding" (the authors' DAug channel).
    targets = parse_targets(config.heatmaps.targets, rc.CHEXPERT_CLASSES)
    assert [t.spec for t in targets] == ["No Finding"]
    assert config.model.vision.in_channels == 1 + len(targets) == 2
    # The towers: ResNet-50 on [x0, h], BERT from scratch at the authors' text length.
    model = two_tower.build_two_tower(config.model, two_tower.text_shape(config.model.text, 30_000))
    ids = jnp.zeros((1, config.model.text.max_length), jnp.int32)
    cls = jnp.zeros((14, config.model.text.max_length), jnp.int32)
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 2)), ids, ids, cls,
                   cls)
    assert tower_inputs.class_columns(config.model.class_names, rc.CHEXPERT_CLASSES) == list(range(14))
    _, schedule = ttrain.make_optimizer(config.train)
    assert float(schedule(10)) == pytest.approx(2e-5) and config.train.weight_decay == 0.01
    assert tower_inputs.uses_reports(config) and config.train.clip_weight == 0.8
