"""Lays out 1,000 real NIH ChestX-ray14 films as the manual directory of the ``nih_cxr14`` builder.

Films: ``NIH1000/`` of https://github.com/dinbe0527/kcr2019d1, 1,000 NIH PNGs downsampled to
64 x 64 (RGB or RGBA, gray in every channel), each named by its NIH Image Index.  Labels and
boxes: NIH's own ``Data_Entry_2017_v2020.csv.gz`` and ``BBox_List_2017.csv.gz`` as shipped in
torchxrayvision's ``data/`` folder.  Boxes stay on the 1024 grid: the builder maps them from it.

Splits are drawn by patient, never by the repository's train/valid/test folders (those put some
patients in two splits): Patient ID % 10 in {1, 2} -> test_list.txt (~20 % of the patients), the
rest -> train_val_list.txt, of which the builder sends Patient ID % 10 == 0 to validation.

    python scripts/nih1000_manual_dir.py --films /tmp/kcr2019d1/NIH1000 \\
        --labels .venv/lib/python3.11/site-packages/torchxrayvision/data --out /tmp/nih_manual
"""

import argparse
import collections
import gzip
import os
import pathlib
import shutil

from daug_jax.data.nih import TEST_LIST, TRAIN_VAL_LIST, VALIDATION_MODULUS

ENTRY = "Data_Entry_2017_v2020.csv.gz"
BOXES = "BBox_List_2017.csv.gz"
TEST_RESIDUES = (1, 2)   # Patient ID % 10 -> test


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Temp name, then rename: an interrupted run never leaves a half file the builder reads."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def filtered_csv(path: pathlib.Path, keep) -> tuple[bytes, dict[str, list[str]]]:
    """NIH's header line plus the lines of the kept films, copied verbatim (the files have no
    quoting, so the first comma ends the index); returns the gzip bytes and index -> cells."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        header, *lines = f.read().splitlines()
    rows = [line for line in lines if line.split(",", 1)[0] in keep]
    text = "\n".join([header, *rows]) + "\n"
    cells = collections.defaultdict(list)
    for line in rows:
        cells[line.split(",", 1)[0]].append(line.split(","))
    return gzip.compress(text.encode("utf-8"), mtime=0), cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--films", type=pathlib.Path, required=True, help="extracted NIH1000/")
    parser.add_argument("--labels", type=pathlib.Path, required=True,
                        help="folder holding NIH's data entry and box list (gzipped)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="manual directory")
    args = parser.parse_args()

    films: dict[str, pathlib.Path] = {}
    for path in sorted(args.films.rglob("*.png")):
        if path.name in films:
            raise SystemExit(f"{path}: film also at {films[path.name]}")
        films[path.name] = path
    if not films:
        raise SystemExit(f"no PNG under {args.films}")

    entry_gz, entries = filtered_csv(args.labels / ENTRY, films)
    boxes_gz, boxes = filtered_csv(args.labels / BOXES, films)
    for name, path in films.items():
        if len(entries.get(name, ())) != 1:
            raise SystemExit(f"{path}: {len(entries.get(name, ()))} rows in {ENTRY}, expected 1")
    # Column 1 is "Finding Labels", column 3 "Patient ID" (header checked by the builder).
    patient = {name: int(entries[name][0][3]) for name in films}

    images = args.out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, path in films.items():  # unchanged: the builder converts and resizes itself
        shutil.copyfile(path, images / (name + ".tmp"))
        os.replace(images / (name + ".tmp"), images / name)
    write_atomic(args.out / ENTRY, entry_gz)
    write_atomic(args.out / BOXES, boxes_gz)
    test = [n for n in films if patient[n] % 10 in TEST_RESIDUES]
    train_val = [n for n in films if patient[n] % 10 not in TEST_RESIDUES]
    write_atomic(args.out / TRAIN_VAL_LIST, "".join(n + "\n" for n in train_val).encode())
    write_atomic(args.out / TEST_LIST, "".join(n + "\n" for n in test).encode())

    # The splits as the builder will form them (its validation rule, imported).
    splits = {"train": [n for n in train_val if patient[n] % VALIDATION_MODULUS],
              "validation": [n for n in train_val if patient[n] % VALIDATION_MODULUS == 0],
              "test": test}
    print(f"{len(films)} films of {len(set(patient.values()))} patients -> {args.out}")
    for split, names in splits.items():
        finding = sum(entries[n][0][1] != "No Finding" for n in names)
        classes = collections.Counter(row[1] for n in names for row in boxes.get(n, ()))
        print(f"  {split:10s} {len(names):4d} films  {len({patient[n] for n in names}):3d} "
              f"patients  {finding:4d} with a finding  {sum(n in boxes for n in names):2d} "
              f"with a box  {dict(sorted(classes.items()))}")


if __name__ == "__main__":
    main()
