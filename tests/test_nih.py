"""The ``nih_cxr14`` builder on a tree made from the real ChestX-ray14 metadata (fixtures_nih)."""

import csv
import gzip
import math

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import fixtures_nih as fn
from daug_jax.data import nih, registry
from daug_jax.data import real_common as rc

DATA = fn.txv_data()
pytestmark = pytest.mark.skipif(DATA is None, reason="torchxrayvision (real label files) absent; "
                                "`pip install --no-deps torchxrayvision`")
SIZE = 32
C = {name: i for i, name in enumerate(nih.CLASS_NAMES)}
KEPT = ("ok", "rgba")


def _build(manual, data_dir, size=SIZE):
    builder = nih.NihCxr14(config=nih.NihCxr14Config(image_size=size), data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
    return builder


def _records(builder) -> dict[str, list[dict]]:
    """{split: records in order}, read through a fresh builder (what a later job sees)."""
    fresh = type(builder)(config=builder.builder_config, data_dir=builder.data_dir_root)
    return {split: list(src) for split, src in fresh.as_data_source().items()}


def _csv(path):
    """The written CSV parsed on its own: (header cells, rows as lists)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        return next(reader), list(reader)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih")
    tree = fn.make_nih_tree(root / "manual", DATA)
    builder = _build(root / "manual", root / "tfds")
    return tree, builder, _records(builder)


def _pid(index: str) -> int:
    return int(index.split("_")[0])


def _expected_splits(tree) -> dict[str, list[str]]:
    kept = [i for i in tree.train_val if tree.kinds[i] in KEPT]
    return {"train": [i for i in kept if _pid(i) % 10],
            "validation": [i for i in kept if not _pid(i) % 10],
            "test": [i for i in tree.test if tree.kinds[i] in KEPT]}


def test_splits_ids_and_dropped(built):
    tree, builder, records = built
    want = _expected_splits(tree)
    assert {s: [r["id"].decode() for r in rs] for s, rs in records.items()} == want
    assert {s: builder.info.splits[s].num_examples for s in want} == {
        s: len(v) for s, v in want.items()}
    dropped = {}
    for split, members in (("train", [i for i in tree.train_val if _pid(i) % 10]),
                           ("validation", [i for i in tree.train_val if not _pid(i) % 10]),
                           ("test", tree.test)):
        kinds = [tree.kinds[i] for i in members]
        dropped[split] = {k: v for k, v in ((rc.IMAGE_MISSING, kinds.count("absent")),
                                            (rc.IMAGE_CORRUPT, kinds.count("truncated"))) if v}
    fresh = nih.NihCxr14(config=builder.builder_config, data_dir=builder.data_dir_root)
    assert fresh.info.metadata["dropped"] == dropped
    assert dropped["train"] == {rc.IMAGE_MISSING: 2, rc.IMAGE_CORRUPT: 1}
    assert all(r["report"] == b"" for rs in records.values() for r in rs)


def test_labels_agree_with_the_csv_on_every_row(built):
    tree, _, records = built
    header, rows = _csv(tree.root / tree.entry_csv)
    assert header[:2] == ["Image Index", "Finding Labels"] and "OriginalImage[Width" in header
    findings = {row[0]: row[1].split("|") for row in rows}
    seen = 0
    for r in (r for rs in records.values() for r in rs):
        want = np.zeros(len(nih.CLASS_NAMES), np.int8)
        want[[C[name] for name in findings[r["id"].decode()]]] = 1
        assert r["labels"].dtype == np.int8
        np.testing.assert_array_equal(r["labels"], want, err_msg=r["id"].decode())
        seen += 1
    assert seen == sum(kind in KEPT for kind in tree.kinds.values())
    labels = np.stack([r["labels"] for rs in records.values() for r in rs])
    no_finding = labels[:, C["No Finding"]] == 1
    assert no_finding.any() and (labels.sum(1) > 1).any()  # both kinds of film are there
    assert not labels[no_finding, :C["No Finding"]].any()  # "No Finding" stands alone


def _film_boxes(tree, index):
    """[(class index, x, y, w, h)] of a film from the written box list, names mapped by hand."""
    out = []
    for line in tree.boxes.get(index, []):
        name, *values = line.split(",")[1:6]
        out.append((C["Infiltration" if name == "Infiltrate" else name], *map(float, values)))
    return out


def _axis(start, length, size):
    """Covered pixels of one axis: centres (i + 0.5) * 1024 / size in [start, start + length)."""
    first = math.ceil(start * size / 1024 - 0.5)
    last = math.ceil((start + length) * size / 1024 - 0.5)  # exclusive
    if last <= first:  # thinner than a pixel: the pixel holding the centre
        first = min(size - 1, int((start + length / 2) * size / 1024))
        last = first + 1
    return max(first, 0), min(last, size)


def test_boxes_become_masks_at_the_stored_size(built):
    tree, _, records = built
    checked = 0
    for r in (r for rs in records.values() for r in rs):
        index = r["id"].decode()
        film = _film_boxes(tree, index)
        assert r["boxes"].shape == (len(nih.CLASS_NAMES), SIZE, SIZE)
        assert r["boxes"].dtype == np.bool_ and r["has_box"].dtype == np.bool_
        want_has = np.zeros(len(nih.CLASS_NAMES), bool)
        want_has[[c for c, *_ in film]] = True
        np.testing.assert_array_equal(r["has_box"], want_has, err_msg=index)
        assert not r["boxes"][~want_has].any()
        assert (r["labels"][want_has] == 1).all()  # a box is drawn for a finding the film has
        for c, x, y, w, h in film:  # real films have at most one box per class
            (y0, y1), (x0, x1) = _axis(y, h, SIZE), _axis(x, w, SIZE)
            want = np.zeros((SIZE, SIZE), bool)
            want[y0:y1, x0:x1] = True
            np.testing.assert_array_equal(r["boxes"][c], want, err_msg=(index, c))
            # Area fraction of the mask vs the box's (1024 grid): off by at most a pixel a side.
            ws, hs = w * SIZE / 1024, h * SIZE / 1024
            slack = (ws + hs + 1) / SIZE**2
            assert abs(want.mean() - w * h / 1024**2) <= max(slack, 1 / SIZE**2)
            checked += 1
    assert checked == sum(len(tree.boxes[i]) for i in tree.boxes if tree.kinds[i] in KEPT)
    assert checked > 900


def test_infiltrate_boxes_are_infiltration(built):
    tree, _, records = built
    named = {i for i, lines in tree.boxes.items() if tree.kinds[i] in KEPT
             and any(line.split(",")[1] == "Infiltrate" for line in lines)}
    assert len(named) > 100 and "Infiltrate" not in nih.CLASS_NAMES
    with_box = {r["id"].decode() for rs in records.values() for r in rs
                if r["has_box"][C["Infiltration"]]}
    assert with_box == named


def test_images_show_their_film_and_boxes(built):
    tree, _, records = built
    aligned = 0
    for r in (r for rs in records.values() for r in rs):
        index, image = r["id"].decode(), r["image"][..., 0].astype(int)
        assert r["image"].shape == (SIZE, SIZE, 1) and r["image"].dtype == np.uint8
        inside = r["boxes"].any(0)
        grown = inside.copy()  # the masks grown by a pixel: resampling blurs box edges
        grown[1:] |= inside[:-1]; grown[:-1] |= inside[1:]
        grown[:, 1:] |= grown[:, :-1].copy(); grown[:, :-1] |= grown[:, 1:].copy()
        assert abs(np.median(image[~grown]) - tree.levels[index]) <= 2, index
        core = inside.copy()  # the masks shrunk by a pixel: fully inside a drawn box
        core[1:-1, 1:-1] = (inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1]
                            & inside[1:-1, :-2] & inside[1:-1, 2:])
        core[[0, -1]] = False; core[:, [0, -1]] = False
        if core.any():  # the boxes were drawn where the masks are: pixels align
            assert image[core].min() >= fn.BOX_LEVEL - 10, index
            aligned += 1
    assert aligned > 400


def test_validation_is_patient_disjoint_from_train(built):
    _, builder, records = built
    patients = {s: {_pid(r["id"].decode()) for r in rs} for s, rs in records.items()}
    assert patients["validation"] and all(p % 10 == 0 for p in patients["validation"])
    assert not patients["validation"] & patients["train"]
    assert not patients["test"] & (patients["train"] | patients["validation"])
    assert "% 10 == 0" in builder.info.metadata["validation_rule"]


def test_box_coordinates_refer_to_the_1024_png_grid():
    """The evidence in nih.py's docstring, on the full real box list and data entry."""
    _, entries = _csv(DATA / "Data_Entry_2017_v2020.csv.gz")
    size = {row[0]: (int(row[7]), int(row[8])) for row in entries}  # OriginalImage[Width,Height]
    header, rows = _csv(DATA / "BBox_List_2017.csv.gz")
    assert header == ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""]
    assert len(rows) == 984 and len({r[0] for r in rows}) == 880
    boxes = np.array([[float(v) for v in r[2:6]] for r in rows])
    orig = np.array([size[r[0]] for r in rows], float)
    right, bottom = boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]
    assert boxes[:, :2].min() >= 0 and right.max() <= 1024 and bottom.max() <= 1024
    assert right.max() > 1000 and bottom.max() > 1000  # the whole 1024 grid is used ...
    assert (right / orig[:, 0]).max() < 0.65 and (bottom / orig[:, 1]).max() < 0.55  # not orig's
    # ... whatever the original width: small and large acquisitions reach the same extent.
    assert right[orig[:, 0] < 2100].max() > 1000 and right[orig[:, 0] > 2600].max() > 1000
    heart = np.array([r[1] == "Cardiomegaly" for r in rows])
    centre = boxes[heart, 0] + boxes[heart, 2] / 2
    assert 0.45 < centre.mean() / 1024 < 0.65  # the heart is central on the 1024 grid
    assert (centre / orig[heart, 0]).mean() < 0.3  # it would not be on the original grid


def test_every_real_row_parses():
    """The full real data entry and box list through the builder's own parsers."""
    n = 0
    for row in rc.iter_csv(DATA / "Data_Entry_2017_v2020.csv.gz", nih.ENTRY_COLUMNS):
        nih.encode_findings(row["Finding Labels"], row["Image Index"])
        n += 1
    assert n == 112120
    boxes = nih.read_boxes(DATA / "BBox_List_2017.csv.gz")
    assert len(boxes) == 880 and sum(map(len, boxes.values())) == 984
    classes = {nih.CLASS_NAMES[c] for film in boxes.values() for c, *_ in film}
    assert classes == {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass",
                       "Nodule", "Pneumonia", "Pneumothorax"}


def test_box_mask_edges():
    assert nih.box_mask(0, 0, 1024, 1024, 8).all()
    one = nih.box_mask(500, 500, 3, 3, 8)  # far thinner than a pixel: the centre's pixel
    assert one.sum() == 1 and one[3, 3]
    assert nih.box_mask(0, 0, 512, 256, 8).sum() == 4 * 2


def test_legacy_layout_and_registry(tmp_path):
    """Data_Entry_2017.csv (a trailing empty column), gzipped CSVs, one images/ folder; built
    through the registry's `prepare` command and opened by name."""
    tree = fn.make_nih_tree(tmp_path / "manual", DATA, legacy=True, limit=60)
    header, _ = _csv(tree.root / tree.entry_csv)
    assert tree.entry_csv == "Data_Entry_2017.csv.gz" and header[-1] == ""
    assert registry.main("data prepare", ["nih_cxr14", "--manual-dir", str(tree.root),
                                          "--data-dir", str(tmp_path / "tfds"),
                                          "--size", "16"]) == 0
    cfg = ml_collections.ConfigDict(dict(name="nih_cxr14", data_dir=str(tmp_path / "tfds")))
    dataset = registry.open_dataset(cfg, image_size=16)
    assert dataset.class_names == nih.CLASS_NAMES and not dataset.has_reports
    assert dataset.image_shape == (16, 16, 1)
    ids = [r["id"].decode() for s in dataset.splits for r in dataset.source(s)]
    assert sorted(ids) == sorted(i for i, k in tree.kinds.items() if k in KEPT)


def test_missing_files_are_named(tmp_path):
    tree = fn.make_nih_tree(tmp_path / "manual", DATA, limit=40)
    (tree.root / "test_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test_list.txt"):
        _build(tree.root, tmp_path / "tfds")
