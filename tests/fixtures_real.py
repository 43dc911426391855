"""On-disk trees in the exact formats of MIMIC-CXR-JPG (+ reports) and CheXpert v1.0.

Real JPEG files (written by Pillow), gzipped CSVs with the original headers and column order,
reports in MIMIC's free-text layout.

`make_mimic_tree` / `make_chexpert_tree` write a few hand-made films with every fault the builders
must survive: a lateral view, a truncated JPEG, an image listed but absent, a report absent, a
report without FINDINGS/IMPRESSION, a study without labels.  Every image is a flat grey level
with a bright top-left quadrant, so a reader can check both the grey level (which image it is)
and the orientation after resizing.

`make_mimic_synthetic_tree` / `make_chexpert_synthetic_tree` write any number of films of the
synthetic benchmark (`daug_jax.data.synthetic`, so a finding is visible and its labels and
report are known) in the same layouts, with a few lateral films and subjects with several
studies.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import pathlib
import re
import textwrap

import numpy as np
from PIL import Image

from daug_jax.data import synthetic

BRIGHT = 240          # top-left quadrant of every fixture image
IMAGE_HW = (40, 48)   # non-square, like real radiographs

MIMIC_LABEL_COLUMNS = (  # mimic-cxr-2.0.0-chexpert.csv.gz column order (alphabetical)
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices")
MIMIC_METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")
CHEXPERT_COLUMNS = (
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices")

_HEADER = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 \n INDICATION:  ___F with cough and fever.  Evaluate for pneumonia.
 \n TECHNIQUE:  Chest PA and lateral
 \n COMPARISON:  ___
 \n"""
REPORTS = {
    "both": _HEADER + """ FINDINGS:
 \n Moderate right pleural effusion.  The cardiac
 silhouette is normal.  No pneumothorax.
 \n IMPRESSION:
 \n Right pleural effusion.
""",
    "impression_only": """                                 FINAL REPORT
 INDICATION:  ___M with chest pain.
 \n IMPRESSION:  No acute cardiopulmonary process.
""",
    "findings_only": _HEADER + """ FINDINGS:
 \n Lungs are clear.  Heart size is normal.
 \n NOTIFICATION:  Discussed with Dr. ___ by phone.
""",
    "neither": _HEADER + " Portable AP chest radiograph was obtained.\n",
}

# (subject_id, study_id, MIMIC split, report key or None = file absent,
#  labels {class: cell} or None = no row in the label file,
#  images [(dicom_id, ViewPosition, "ok" | "truncated" | "absent")])
MIMIC_STUDIES = [
    ("10000032", "50414267", "train", "both",
     {"Pleural Effusion": "1.0", "Cardiomegaly": "-1.0", "Edema": "0.0", "No Finding": ""},
     [("d01-pa", "PA", "ok"), ("d02-lat", "LATERAL", "ok")]),
    ("10000032", "53189527", "train", "impression_only", {"No Finding": "1.0"},
     [("d03-ap", "AP", "ok")]),
    ("10000764", "57375967", "train", "neither", {"Atelectasis": "1.0"}, [("d04-pa", "PA", "ok")]),
    ("10000764", "50000004", "train", None, {"Edema": "1.0"}, [("d05-pa", "PA", "ok")]),
    ("11000001", "50000005", "train", "findings_only",
     {"No Finding": "1.0", "Support Devices": "0.0"},
     [("d06-pa", "PA", "truncated"), ("d07-pa", "PA", "absent"), ("d08-ap", "AP", "ok")]),
    ("12000002", "50000006", "validate", "both", {"Pneumothorax": "-1.0", "Fracture": "1.0"},
     [("d09-pa", "PA", "ok")]),
    ("13000003", "50000007", "test", "both", {"Lung Opacity": "1.0", "Pneumonia": "-1.0"},
     [("d10-ap", "AP", "ok"), ("d11-ll", "LL", "ok")]),
    ("13000003", "50000008", "test", "both", None, [("d12-pa", "PA", "ok")]),
]

# (Path relative to the manual dir without the variant folder, Frontal/Lateral, AP/PA,
#  labels {class: cell}, "ok" | "truncated" | "absent")
CHEXPERT_ROWS = {
    "train.csv": [
        ("train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP",
         {"No Finding": "1.0", "Support Devices": "1.0"}, "ok"),
        ("train/patient00001/study1/view2_lateral.jpg", "Lateral", "",
         {"No Finding": "1.0", "Support Devices": "1.0"}, "ok"),
        ("train/patient00002/study2/view1_frontal.jpg", "Frontal", "PA",
         {"Cardiomegaly": "-1.0", "Lung Opacity": "1.0", "Edema": "0.0"}, "ok"),
        ("train/patient00002/study1/view1_frontal.jpg", "Frontal", "AP",
         {"Pleural Effusion": "1.0"}, "absent"),
        ("train/patient00003/study1/view1_frontal.jpg", "Frontal", "PA",
         {"Pneumothorax": "1.0"}, "truncated"),
    ],
    "valid.csv": [
        ("valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP",
         {c: "0.0" for c in CHEXPERT_COLUMNS[5:]} | {"Cardiomegaly": "1.0"}, "ok"),
        ("valid/patient64541/study1/view2_lateral.jpg", "Lateral", "",
         {c: "0.0" for c in CHEXPERT_COLUMNS[5:]} | {"Cardiomegaly": "1.0"}, "ok"),
    ],
}


def grey_level(index: int) -> int:
    """The flat grey level of the index-th fixture image (distinct per image, far from BRIGHT)."""
    return 20 + 12 * index


def write_jpeg(path: pathlib.Path, value: int, kind: str = "ok") -> None:
    """A [40, 48] grey JPEG with a BRIGHT top-left quadrant; "truncated" keeps half the bytes."""
    if kind == "absent":
        return
    h, w = IMAGE_HW
    pixels = np.full((h, w), value, np.uint8)
    pixels[: h // 2, : w // 2] = BRIGHT
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2] if kind == "truncated" else data)


def _write_csv(path: pathlib.Path, columns, rows, gz: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    if gz:
        with gzip.open(path, "wt", newline="") as f:
            f.write(text.getvalue())
    else:
        path.write_text(text.getvalue())


def _write_mimic_csvs(root: pathlib.Path, split_rows, meta_rows, label_rows) -> None:
    """The split, metadata and CheXpert-label CSVs of MIMIC-CXR-JPG, gzipped."""
    _write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ("dicom_id", "study_id", "subject_id",
                                                      "split"), split_rows, gz=True)
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_METADATA_COLUMNS, meta_rows,
               gz=True)
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ("subject_id", "study_id",
                                                         *MIMIC_LABEL_COLUMNS), label_rows,
               gz=True)


def make_mimic_tree(root: pathlib.Path) -> dict[str, int]:
    """Writes the MIMIC-CXR-JPG + reports fixture under ``root``; returns {dicom_id: grey level}."""
    split_rows, meta_rows, label_rows, levels = [], [], [], {}
    for subject, study, split, report, labels, images in MIMIC_STUDIES:
        if labels is not None:
            label_rows.append([subject, study] + [labels.get(c, "") for c in MIMIC_LABEL_COLUMNS])
        if report is not None:
            path = root / f"mimic-cxr-reports/files/p{subject[:2]}/p{subject}/s{study}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(REPORTS[report])
        for dicom, view, kind in images:
            levels[dicom] = grey_level(len(levels))
            write_jpeg(root / f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg",
                       levels[dicom], kind)
            split_rows.append([dicom, study, subject, split])
            meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, "3056", "2544",
                              "21800506", "213014.531", "CHEST (PA AND LAT)", "postero-anterior",
                              "Erect"])
    _write_mimic_csvs(root, split_rows, meta_rows, label_rows)
    return levels


def make_chexpert_tree(root: pathlib.Path, variant: str = "CheXpert-v1.0-small") -> dict[str, int]:
    """Writes the CheXpert fixture under ``root/variant``; returns {id: grey level}."""
    levels = {}
    for csv_name, rows in CHEXPERT_ROWS.items():
        csv_rows = []
        for rel, frontal, ap_pa, labels, kind in rows:
            levels[rel] = grey_level(len(levels))
            write_jpeg(root / variant / rel, levels[rel], kind)
            csv_rows.append([f"{variant}/{rel}", "Female", "68", frontal, ap_pa]
                            + [labels.get(c, "") for c in CHEXPERT_COLUMNS[5:]])
        _write_csv(root / variant / csv_name, CHEXPERT_COLUMNS, csv_rows, gz=False)
    return levels


# ----------------------------------------------------------------------------- synthetic films
_CHUNK = 256  # films rendered per call
MIMIC_SPLITS = {"train": "train", "validation": "validate", "test": "test"}  # TFDS -> MIMIC name
_VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}


def _films(num: int, image_size: int, seed: int):
    """Yields (uint8 [S, S] pixels, int8 [7] labels, report) of synthetic records 0 .. num-1."""
    for start in range(0, num, _CHUNK):
        data = synthetic.generate(min(_CHUNK, num - start), image_size=image_size, seed=seed,
                                  start=start)
        pixels = np.round(data["image"][..., 0] * 255.0).astype(np.uint8)
        for j in range(len(pixels)):
            yield pixels[j], data["labels"][j], str(data["report"][j])


def _jpeg(path: pathlib.Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path, format="JPEG", quality=95)


def report_parts(report: str) -> tuple[str, str]:
    """(findings, impression) of a synthetic report, whitespace collapsed."""
    m = re.search(r"(?is)findings:\s*(.*?)\s*impression:\s*(.*)", report)
    return " ".join(m.group(1).split()), " ".join(m.group(2).split())


def mimic_report(findings: str, impression: str) -> str:
    """MIMIC-CXR free text: banner, history sections, then FINDINGS and IMPRESSION, wrapped."""
    def wrap(text):  # no break at hyphens: "3.2-cm" must read back whole
        return textwrap.fill(text, 72, initial_indent=" ", subsequent_indent=" ",
                             break_on_hyphens=False, break_long_words=False)
    return f"{_HEADER} FINDINGS:\n \n{wrap(findings)}\n \n IMPRESSION:\n \n{wrap(impression)}\n"


def label_cells(labels: np.ndarray, fill: str = "") -> dict[str, str]:
    """CheXpert cells of synthetic labels: the synthetic classes as 1.0 / 0.0 / -1.0, the other
    CheXpert classes ``fill``; "No Finding" 0 is written as ``fill`` too (the labeller never
    writes 0.0 there), so with ``fill=""`` it is blank."""
    cells = {c: fill for c in CHEXPERT_COLUMNS[5:]}
    for name, value in zip(synthetic.CLASS_NAMES, labels):
        if not (name == "No Finding" and value == 0):
            cells[name] = f"{float(value):.1f}"
    return cells


def _studies(rng, num: int):
    """(patient number, study number within the patient) of ``num`` studies in order; about a
    fifth of the patients come back for a second or third study."""
    patient, count = -1, 3
    for _ in range(num):
        if count < 3 and rng.random() < 0.25:
            count += 1
        else:
            patient, count = patient + 1, 1
        yield patient, count


def _dicom_id(seed: int, index: int, view: str) -> str:
    """A MIMIC-style dicom id (five dash-separated groups of 8 hex digits)."""
    h = hashlib.sha1(f"{seed}/{index}/{view}".encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def make_mimic_synthetic_tree(root: pathlib.Path, *, num_train: int, num_validation: int,
                              num_test: int, image_size: int = 64, seed: int = 0) -> dict:
    """Writes a MIMIC-CXR-JPG + reports tree of synthetic films under ``root``.

    One frontal film (PA or AP) per study, ``num_<split>`` studies per split; every 7th study
    (the 4th, 11th, ...) also has a LATERAL film (the frontal one mirrored), which the builder's
    default views drop.  Film i of the benchmark ``seed`` (train first, then validation, test)
    gives the pixels, the CheXpert label row (`label_cells`, blank elsewhere) and the report.

    Returns {"num_frontal": {split: n}, "num_lateral": {split: n}, "records": {split: {dicom_id:
    {"index", "study_id", "subject_id", "view", "labels" (synthetic int8 [7]), "cells",
    "report" (FINDINGS + IMPRESSION as the builder selects them)}}}} with the frontal films in
    CSV order; splits are TFDS names.
    """
    rng = np.random.default_rng([seed, 1])
    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    films = _films(sum(counts.values()), image_size, seed)
    split_rows, meta_rows, label_rows, index, first = [], [], [], 0, 0
    out = {"num_frontal": dict(counts), "num_lateral": {}, "records": {}}
    for split, num in counts.items():
        out["records"][split], out["num_lateral"][split] = {}, 0
        studies = list(_studies(rng, num))
        for patient, _ in studies:
            pixels, labels, report = next(films)
            subject = f"1{(first + patient) % 10}{first + patient:06d}"  # folders p10 .. p19
            study = f"5{index:07d}"
            cells = label_cells(labels)
            label_rows.append([subject, study] + [cells[c] for c in MIMIC_LABEL_COLUMNS])
            findings, impression = report_parts(report)
            rel = f"p{subject[:2]}/p{subject}/s{study}"
            path = root / f"mimic-cxr-reports/files/{rel}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(mimic_report(findings, impression))
            views = ["PA" if rng.random() < 0.6 else "AP"]
            if len(out["records"][split]) % 7 == 3:
                views.append("LATERAL")
                out["num_lateral"][split] += 1
            for view in views:
                dicom = _dicom_id(seed, index, view)
                _jpeg(root / f"files/{rel}/{dicom}.jpg",
                      pixels[:, ::-1] if view == "LATERAL" else pixels)
                split_rows.append([dicom, study, subject, MIMIC_SPLITS[split]])
                meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view,
                                  str(image_size), str(image_size), "21800506", "213014.531",
                                  "CHEST (PA AND LAT)", _VIEW_MEANING[view], "Erect"])
            out["records"][split][_dicom_id(seed, index, views[0])] = dict(
                index=index, study_id=study, subject_id=subject, view=views[0], labels=labels,
                cells=cells, report=f"{findings} {impression}")
            index += 1
        first += studies[-1][0] + 1 if studies else 0  # no patient is in two splits
    _write_mimic_csvs(root, split_rows, meta_rows, label_rows)
    return out


def make_chexpert_synthetic_tree(root: pathlib.Path, *, num_train: int, num_validation: int,
                                 image_size: int = 64, seed: int = 0,
                                 variant: str = "CheXpert-v1.0-small") -> dict:
    """Writes a CheXpert tree of synthetic films under ``root/variant``.

    Like `make_mimic_synthetic_tree`: ``num_<split>`` frontal films (AP or PA), one per study,
    every 7th study with a Lateral film too.  train.csv leaves the non-synthetic classes blank;
    valid.csv fills them with 0.0, as the real valid.csv has no blank cell.

    Returns {"num_frontal": {split: n}, "num_lateral": {split: n}, "records": {split: {id:
    {"index", "study_id", "subject_id", "view", "labels", "cells"}}}}, ids being the CSV paths
    without the variant folder, frontal films in CSV order.
    """
    rng = np.random.default_rng([seed, 2])
    counts = {"train": num_train, "validation": num_validation}
    films = _films(sum(counts.values()), image_size, seed)
    out = {"num_frontal": dict(counts), "num_lateral": {}, "records": {}}
    index = 0
    for split, num in counts.items():
        folder, first = ("train", 1) if split == "train" else ("valid", 64541)
        rows, out["records"][split], out["num_lateral"][split] = [], {}, 0
        for patient, study_no in _studies(rng, num):
            pixels, labels, _ = next(films)
            cells = label_cells(labels, fill="" if split == "train" else "0.0")
            subject = f"patient{first + patient:05d}"
            study = f"{subject}/study{study_no}"
            sex, age = ("Female", "Male")[patient % 2], str(18 + patient * 37 % 70 + study_no)
            frontal = f"{folder}/{study}/view1_frontal.jpg"
            ap_pa = "AP" if rng.random() < 0.6 else "PA"
            films_of_study = [(frontal, "Frontal", ap_pa, pixels)]
            if len(out["records"][split]) % 7 == 3:
                films_of_study.append((f"{folder}/{study}/view2_lateral.jpg", "Lateral", "",
                                       pixels[:, ::-1]))
                out["num_lateral"][split] += 1
            for rel, frontal_lateral, view, film in films_of_study:
                _jpeg(root / variant / rel, film)
                rows.append([f"{variant}/{rel}", sex, age, frontal_lateral, view]
                            + [cells[c] for c in CHEXPERT_COLUMNS[5:]])
            out["records"][split][frontal] = dict(index=index, study_id=study, subject_id=subject,
                                                  view=ap_pa, labels=labels, cells=cells)
            index += 1
        _write_csv(root / variant / f"{folder}.csv", CHEXPERT_COLUMNS, rows, gz=False)
    return out
