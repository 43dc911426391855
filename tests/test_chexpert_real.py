"""The ``chexpert_cxr`` builder on a tree made from real rows of CheXpert's train.csv."""

import csv
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fixtures_nih as fn
from daug_jax.data import chexpert
from daug_jax.data import real_common as rc

DATA = fn.txv_data()
pytestmark = pytest.mark.skipif(DATA is None, reason="torchxrayvision (real label files) absent; "
                                "`pip install --no-deps torchxrayvision`")
SIZE = 16
SPLIT_CSV = {"train": "train", "validation": "valid"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    tree = fn.make_chexpert_tree(root / "manual", DATA)
    builders = {}
    for frontal_only in (True, False):
        config = chexpert.ChexpertCxrConfig(image_size=SIZE, frontal_only=frontal_only)
        builder = chexpert.ChexpertCxr(config=config, data_dir=root / "tfds")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=root / "manual"))
        fresh = chexpert.ChexpertCxr(config=config, data_dir=root / "tfds")
        builders[frontal_only] = (fresh, {s: list(src) for s, src in
                                          fresh.as_data_source().items()})
    return tree, builders


def _rows(tree, split):
    """The fixture's lines of a split parsed on their own, as dicts by header name."""
    text = "\n".join([tree["header"], *tree[SPLIT_CSV[split]]])
    return list(csv.DictReader(io.StringIO(text)))


def test_fixture_rows_are_varied(built):
    tree, _ = built
    rows = _rows(tree, "train") + _rows(tree, "validation")
    cells = [row[c] for row in rows for c in rc.CHEXPERT_CLASSES]
    assert {"1.0", "0.0", "-1.0", ""} <= set(cells)
    views = {(row["Frontal/Lateral"], row["AP/PA"]) for row in rows}
    assert {("Frontal", "AP"), ("Frontal", "PA"), ("Lateral", "")} <= views


@pytest.mark.parametrize("split", ["train", "validation"])
def test_records_agree_with_the_csv_on_every_row(built, split):
    tree, builders = built
    builder, records = builders[True]
    rows = _rows(tree, split)
    frontal = [row for row in rows if row["Frontal/Lateral"] == "Frontal"]
    assert len(frontal) < len(rows)  # laterals among them
    got = records[split]
    assert [r["id"].decode() for r in got] == [
        row["Path"].removeprefix("CheXpert-v1.0-small/") for row in frontal]
    for r, row in zip(got, frontal):
        where = row["Path"]
        for i, name in enumerate(rc.CHEXPERT_CLASSES):
            cell = row[name]
            assert bool(r["missing"][i]) == (cell == ""), (where, name)
            assert r["labels"][i] == (0 if cell == "" else int(float(cell))), (where, name)
        assert r["view"].decode() == row["AP/PA"]
        parts = row["Path"].split("/")
        assert r["subject_id"].decode() == parts[2]
        assert r["study_id"].decode() == "/".join(parts[2:4])
        assert r["report"] == b""
        assert abs(float(r["image"].mean()) - tree["levels"][row["Path"]]) <= 2, where
    laterals = len(rows) - len(frontal)
    assert builder.info.metadata["dropped"][split] == {rc.VIEW_EXCLUDED: laterals}
    assert (np.stack([r["labels"] for r in got]) == -1).any()  # uncertain kept as -1


def test_all_views_keep_the_laterals(built):
    tree, builders = built
    builder, records = builders[False]
    for split in SPLIT_CSV:
        rows = _rows(tree, split)
        assert [r["id"].decode() for r in records[split]] == [
            row["Path"].removeprefix("CheXpert-v1.0-small/") for row in rows]
        views = [r["view"].decode() for r in records[split]]
        assert views == [row["AP/PA"] or row["Frontal/Lateral"] for row in rows]
        assert builder.info.metadata["dropped"][split] == {}


def test_every_real_row_parses():
    """All 223k rows of the real train.csv: the label cells are 1.0, 0.0, -1.0 or blank."""
    n, views = 0, set()
    for row in rc.iter_csv(DATA / "chexpert_train.csv.gz", chexpert.COLUMNS):
        rc.encode_labels(row, row["Path"])
        views.add((row["Frontal/Lateral"], row["AP/PA"]))
        n += 1
    assert n == 223414
    # A few frontal films carry a lateral-decubitus AP/PA value; they are kept as frontal.
    assert views == {("Frontal", "AP"), ("Frontal", "PA"), ("Frontal", "LL"), ("Frontal", "RL"),
                     ("Lateral", "")}
