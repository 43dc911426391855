"""Small on-disk trees in the exact formats of MIMIC-CXR-JPG (+ reports) and CheXpert v1.0.

Real JPEG files (written by Pillow), gzipped CSVs with the original headers and column order,
reports in MIMIC's free-text layout.  Each tree includes the faults the builders must survive:
a lateral view, a truncated JPEG, an image listed but absent, a report absent, a report without
FINDINGS/IMPRESSION, a study without labels.

Every image is a flat grey level with a bright top-left quadrant, so a reader can check both the
grey level (which image it is) and the orientation after resizing.
"""

from __future__ import annotations

import csv
import gzip
import io
import pathlib

import numpy as np
from PIL import Image

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
    _write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ("dicom_id", "study_id", "subject_id",
                                                      "split"), split_rows, gz=True)
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_METADATA_COLUMNS, meta_rows,
               gz=True)
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ("subject_id", "study_id",
                                                         *MIMIC_LABEL_COLUMNS), label_rows,
               gz=True)
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
