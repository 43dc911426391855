"""NIH ChestX-ray14 and CheXpert manual-download trees built from REAL metadata rows.

The label files come from the PyPI package torchxrayvision (``torchxrayvision/data/``), found
with `importlib.util.find_spec` and read as plain files: importing the package would import
torch.  Rows are copied line by line, so the trimmed CSVs keep the real headers and their quirks
(``OriginalImage[Width,Height]`` split into two header cells, ``Bbox [x,y,w,h],,,`` with three
empty header cells).  The images do not ship: small PNGs / JPEGs are generated at the listed
names, each a flat grey level of its own (which film it is) with its boxes drawn bright (where
they are), so a reader can check both.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import pathlib

import numpy as np
from PIL import Image

BOX_LEVEL = 250   # pixels inside a box in the generated NIH films
PNG_SIZE = 64     # the generated films: far from the 1024 grid the boxes refer to
TEST_RULE = 3     # fixture's official test list: patients with Patient ID % 3 == 0


def txv_data() -> pathlib.Path | None:
    """torchxrayvision's data folder, or None when the package is not installed."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"


def read_lines(path: pathlib.Path) -> tuple[str, list[str]]:
    """(header line, data lines) of a (gzipped) CSV, line endings stripped."""
    with gzip.open(path, "rt", newline="", encoding="utf-8") as f:
        lines = f.read().splitlines()
    return lines[0], [line for line in lines[1:] if line]


def grey_level(i: int) -> int:
    """The background of the i-th generated film: distinct neighbours, far from BOX_LEVEL."""
    return 30 + (37 * i) % 150


def write_text(path: pathlib.Path, text: str, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt", newline="", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def write_png(path: pathlib.Path, level: int, boxes, kind: str = "ok") -> None:
    """A PNG_SIZE film of grey ``level`` with ``boxes`` [(x, y, w, h)] (1024 grid) drawn bright;
    ``kind`` "rgba" saves it as RGBA, "truncated" keeps half the file, "absent" writes none."""
    if kind == "absent":
        return
    pixels = np.full((PNG_SIZE, PNG_SIZE), level, np.uint8)
    f = PNG_SIZE / 1024
    for x, y, w, h in boxes:
        pixels[int(y * f):int(np.ceil((y + h) * f)), int(x * f):int(np.ceil((x + w) * f))] = \
            BOX_LEVEL
    im = Image.fromarray(pixels, mode="L")
    buf = io.BytesIO()
    (im.convert("RGBA") if kind == "rgba" else im).save(buf, format="PNG")
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2] if kind == "truncated" else data)


@dataclasses.dataclass
class NihTree:
    """What was written: the real rows kept, the generated films and the split lists."""
    root: pathlib.Path
    entry_csv: str
    bbox_csv: str
    rows: dict[str, str]                # image index -> its data-entry line
    boxes: dict[str, list[str]]         # image index -> its box-list lines
    kinds: dict[str, str]               # image index -> write_png kind
    levels: dict[str, int]              # image index -> background grey level
    train_val: list[str]
    test: list[str]


def pick_rows(data: pathlib.Path, every: int = 251) -> tuple[str, dict[str, str], str,
                                                             dict[str, list[str]]]:
    """Every boxed film, plus all films of the patients whose Patient ID % ``every`` == 0
    (some 450 films of 120 patients, mixed labels, several films a patient)."""
    entry_header, entry_lines = read_lines(data / "Data_Entry_2017_v2020.csv.gz")
    box_header, box_lines = read_lines(data / "BBox_List_2017.csv.gz")
    boxes: dict[str, list[str]] = {}
    for line in box_lines:
        boxes.setdefault(line.split(",", 1)[0], []).append(line)
    rows = {line.split(",", 1)[0]: line for line in entry_lines
            if line.split(",", 1)[0] in boxes or int(line.split(",")[3]) % every == 0}
    return entry_header, rows, box_header, boxes


def _kinds(rows: dict[str, str], boxes: dict[str, list[str]], test: set[str]) -> dict[str, str]:
    """A few films of each split absent, one truncated, a few RGBA; the rest ordinary."""
    kinds = dict.fromkeys(rows, "ok")
    order = sorted(rows)
    groups = {"test": [i for i in order if i in test],
              "validation": [i for i in order if i not in test and _pid(rows[i]) % 10 == 0],
              "train": [i for i in order if i not in test and _pid(rows[i]) % 10 != 0]}
    for members in groups.values():
        for boxed in (True, False):  # a boxed film and an unboxed one, where the split has one
            absent = next((i for i in members if (i in boxes) == boxed), None)
            if absent is not None:
                kinds[absent] = "absent"
    kinds[next(i for i in groups["train"] if kinds[i] == "ok")] = "truncated"
    for i in [i for i in order if kinds[i] == "ok"][5::200]:
        kinds[i] = "rgba"
    return kinds


def _pid(line: str) -> int:
    return int(line.split(",")[3])


def make_nih_tree(root: pathlib.Path, data: pathlib.Path, *, every: int = 251,
                  legacy: bool = False, limit: int | None = None) -> NihTree:
    """Writes the tree under ``root`` (the manual directory).

    Default: the box folder's layout (plain CSVs, PNGs spread over images_001/images/ and
    images_002/images/).  ``legacy``: the older Data_Entry_2017.csv name with its trailing
    empty column (a comma ending every line), both CSVs gzipped, one images/ folder.
    ``limit`` keeps only the first ``limit`` rows (a small tree).
    """
    entry_header, rows, box_header, all_boxes = pick_rows(data, every)
    if limit is not None:
        rows = {i: rows[i] for i in sorted(rows)[:limit]}
    boxes = {i: lines for i, lines in all_boxes.items() if i in rows}
    test = {i for i, line in rows.items() if _pid(line) % TEST_RULE == 0}
    kinds = _kinds(rows, boxes, test)
    order = sorted(rows)
    levels = {index: grey_level(k) for k, index in enumerate(order)}
    for k, index in enumerate(order):
        folder = "images" if legacy else f"images_00{1 + k % 2}/images"
        film_boxes = [tuple(float(v) for v in line.split(",")[2:6])
                      for line in boxes.get(index, [])]
        write_png(root / folder / index, levels[index], film_boxes, kinds[index])
    tail, gz = ("," if legacy else ""), legacy
    entry_csv = ("Data_Entry_2017.csv" if legacy else "Data_Entry_2017_v2020.csv") + \
        (".gz" if gz else "")
    bbox_csv = "BBox_List_2017.csv" + (".gz" if gz else "")
    write_text(root / entry_csv, "".join(f"{line}{tail}\n" for line in
                                         [entry_header, *(rows[i] for i in order)]), gz)
    write_text(root / bbox_csv, "".join(
        f"{line}\n" for line in [box_header, *(b for i in order for b in boxes.get(i, []))]), gz)
    train_val = [i for i in order if i not in test]
    test_list = [i for i in order if i in test]
    write_text(root / "train_val_list.txt", "".join(f"{i}\n" for i in train_val))
    write_text(root / "test_list.txt", "".join(f"{i}\n" for i in test_list))
    return NihTree(root, entry_csv, bbox_csv, {i: rows[i] for i in order}, boxes, kinds, levels,
                   train_val, test_list)


# ----------------------------------------------------------------------------- CheXpert
CHEXPERT_SIZE = (20, 16)  # (h, w) of the generated JPEGs: portrait, like the small variant


def pick_chexpert_rows(data: pathlib.Path, n_train: int = 300,
                       n_valid: int = 40) -> tuple[str, list[str], list[str]]:
    """(header, train lines, valid lines): the first ``n_train`` real rows (frontal and lateral,
    -1.0 and blank cells among them) and the ``n_valid`` rows after them."""
    header, lines = read_lines(data / "chexpert_train.csv.gz")
    return header, lines[:n_train], lines[n_train:n_train + n_valid]


def make_chexpert_tree(root: pathlib.Path, data: pathlib.Path, **kwargs) -> dict:
    """``CheXpert-v1.0-small/{train,valid}.csv`` from real rows and a JPEG at every listed path
    (the k-th film of the tree has background `grey_level(k)`); returns {"header", "train",
    "valid" (lines), "levels" (path -> grey level)}."""
    header, train, valid = pick_chexpert_rows(data, **kwargs)
    levels = {}
    for k, line in enumerate(train + valid):
        path = line.split(",", 1)[0]
        levels[path] = grey_level(k)
        pixels = np.full(CHEXPERT_SIZE, levels[path], np.uint8)
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(target, format="JPEG", quality=95)
    for name, lines in (("train.csv", train), ("valid.csv", valid)):
        write_text(root / "CheXpert-v1.0-small" / name,
                   "".join(f"{line}\n" for line in [header, *lines]))
    return {"header": header, "train": train, "valid": valid, "levels": levels}
