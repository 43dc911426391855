"""TFDS builder for MIMIC-CXR-JPG 2.0.0 with its free-text reports (``mimic_cxr``).

Images, CheXpert labels and the official split come from MIMIC-CXR-JPG; the reports come from
MIMIC-CXR (``mimic-cxr-reports.zip``); both are credentialed PhysioNet downloads, placed by hand
(see ``MimicCxr.MANUAL_DOWNLOAD_INSTRUCTIONS``) and built with ``daug-jax data prepare mimic_cxr
--manual-dir DIR``.  One record per image: frontal views (PA, AP) by default, each paired with its
study's report, in the order of the split CSV; splits train, validation, test.  Features: see
`daug_jax.data.real_common`.

Report text (``report_section``), in order of preference; a study whose report has neither
FINDINGS nor IMPRESSION is dropped (counted as ``report_no_sections``):

    "findings"             FINDINGS, else IMPRESSION
    "impression"           IMPRESSION, else FINDINGS
    "findings+impression"  both joined, else whichever exists
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re

import tensorflow_datasets as tfds

from daug_jax.data import real_common as rc

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"
IMAGE_DIR = "files"
REPORT_DIR = "mimic-cxr-reports/files"
REQUIRED = (SPLIT_CSV, METADATA_CSV, CHEXPERT_CSV, IMAGE_DIR, REPORT_DIR)

SPLITS = {"train": "train", "validate": "validation", "test": "test"}  # MIMIC name -> TFDS name
REPORT_SECTIONS = ("findings", "impression", "findings+impression")

# A section heading: an upper-case phrase ending in ':' at the start of a line, e.g.
# "FINDINGS:", "IMPRESSION:", "FINDINGS AND IMPRESSION:", "PA AND LATERAL VIEWS OF THE CHEST:".
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z ,&/()-]*?)[ \t]*:", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """Splits a MIMIC-CXR report at its upper-case headings -> ``{"FINDINGS": "...", ...}``:
    bodies run to the next heading, whitespace collapsed; text before the first heading (the
    "FINAL REPORT" banner) is not a section; a repeated heading is concatenated."""
    matches = list(_HEADING.finditer(text))
    sections: dict[str, str] = {}
    for m, nxt in zip(matches, matches[1:] + [None]):
        body = " ".join(text[m.end():nxt.start() if nxt else len(text)].split())
        name = " ".join(m.group(1).split())
        sections[name] = f"{sections[name]} {body}".strip() if name in sections else body
    return sections


def select_report(text: str, report_section: str) -> str:
    """The report text used for training under ``report_section`` (one of REPORT_SECTIONS, see
    module docstring); "" when the report has neither section."""
    if report_section not in REPORT_SECTIONS:
        raise ValueError(f"report_section {report_section!r} is not one of {REPORT_SECTIONS}")
    sections = report_sections(text)
    both = sections.get("FINDINGS AND IMPRESSION", "")
    findings = sections.get("FINDINGS", "") or both
    impression = sections.get("IMPRESSION", "") or both
    if report_section == "findings":
        return findings or impression
    if report_section == "impression":
        return impression or findings
    return " ".join(dict.fromkeys(s for s in (findings, impression) if s))  # dedups `both`


def image_path(subject_id: str, study_id: str, dicom_id: str) -> str:
    """``files/p10/p10000032/s50414267/<dicom_id>.jpg`` (relative to the manual directory)."""
    return f"{IMAGE_DIR}/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def report_path(subject_id: str, study_id: str) -> str:
    """``mimic-cxr-reports/files/p10/p10000032/s50414267.txt``."""
    return f"{REPORT_DIR}/p{subject_id[:2]}/p{subject_id}/s{study_id}.txt"


@dataclasses.dataclass(eq=False)  # like tfds.core.BuilderConfig (not frozen)
class MimicCxrConfig(tfds.core.BuilderConfig):
    """Image size, report text and kept views; the config name is derived from them."""

    name: str = ""
    image_size: int = 224
    report_section: str = "findings+impression"
    views: tuple[str, ...] = ("PA", "AP")  # DICOM ViewPosition values kept

    def __post_init__(self):
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.report_section not in REPORT_SECTIONS:
            raise ValueError(
                f"report_section {self.report_section!r} is not one of {REPORT_SECTIONS}")
        if not self.name:
            name = f"{self.image_size}px_{self.report_section.replace('+', '_')}"
            if tuple(self.views) != ("PA", "AP"):
                name += "_" + "-".join(re.sub(r"\W", "", v) for v in self.views)
            self.name = name


class MimicCxr(rc.DropCountingBuilder):
    """MIMIC-CXR-JPG radiographs with report sections and CheXpert labels."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [MimicCxrConfig(image_size=224), MimicCxrConfig(image_size=64),
                       MimicCxrConfig(image_size=256)]  # 256: the paper's size
    DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Needs a credentialed PhysioNet account (https://physionet.org).  Into the manual directory put
    (the layout of physionet.org/files/mimic-cxr-jpg/2.0.0/ plus the unzipped reports):

      {SPLIT_CSV}
      {METADATA_CSV}
      {CHEXPERT_CSV}
      {IMAGE_DIR}/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg ...
      {REPORT_DIR}/p10/p10000032/s50414267.txt ...

    The first four come from MIMIC-CXR-JPG 2.0.0.  The reports are mimic-cxr-reports.zip from
    MIMIC-CXR 2.0.0 (physionet.org/content/mimic-cxr/2.0.0/): unzip it into a folder named
    mimic-cxr-reports, so that its files/ folder becomes mimic-cxr-reports/files/.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=rc.features(config.image_size),
            metadata=tfds.core.MetadataDict(
                class_names=list(rc.CHEXPERT_CLASSES), report_section=config.report_section,
                views=list(config.views)),
            homepage="https://physionet.org/content/mimic-cxr-jpg/2.0.0/",
        )

    def _shard_iterators_per_split(self, dl_manager):
        root = rc.require_files(dl_manager, self.name, REQUIRED)
        by_split = collections.defaultdict(list)  # split -> [(dicom_id, study_id, subject_id)]
        for row in rc.iter_csv(root / SPLIT_CSV, ("dicom_id", "study_id", "subject_id", "split")):
            if row["split"] not in SPLITS:
                raise ValueError(f"{SPLIT_CSV}: dicom_id {row['dicom_id']} has split "
                                 f"{row['split']!r}; expected one of {list(SPLITS)}")
            by_split[SPLITS[row["split"]]].append(
                (row["dicom_id"], row["study_id"], row["subject_id"]))
        positions = {r["dicom_id"]: r["ViewPosition"].strip()
                     for r in rc.iter_csv(root / METADATA_CSV, ("dicom_id", "ViewPosition"))}
        # Every label is parsed before any record is written: a malformed file fails at once.
        labels = {r["study_id"]: rc.encode_labels(r, f"{CHEXPERT_CSV} study_id {r['study_id']}")
                  for r in rc.iter_csv(root / CHEXPERT_CSV,
                                       ("subject_id", "study_id", *rc.CHEXPERT_CLASSES))}
        self._drops = rc.new_drop_counts(self.info, SPLITS.values())
        record_bytes = rc.real_record_bytes(self.builder_config.image_size)
        return {split: [functools.partial(self._generate_shard, root, split, items)
                        for items in rc.shard(self._plan(split, by_split[split], positions,
                                                         labels), record_bytes)]
                for split in SPLITS.values()}

    def _plan(self, split, rows, positions, labels) -> list[tuple]:
        """The images that pass the CSV-only checks, in CSV order, as (dicom_id, study_id,
        subject_id, view, (labels, missing)); the others are counted as dropped."""
        views, drops, seen, planned = self.builder_config.views, self._drops[split], set(), []
        for dicom, study, subject in rows:
            reason = (rc.DUPLICATE if dicom in seen
                      else rc.METADATA_MISSING if dicom not in positions
                      else rc.VIEW_EXCLUDED if positions[dicom] not in views
                      else rc.LABELS_MISSING if study not in labels else None)
            seen.add(dicom)
            if reason:
                drops[reason] += 1
            else:
                planned.append((dicom, study, subject, positions[dicom], labels[study]))
        return planned

    def _generate_shard(self, root, split, items):
        """One shard's records: reads the reports, decodes the images (either may drop one)."""
        config, drops = self.builder_config, self._drops[split]
        # study_id -> text (a report serves several images), per shard: memory stays bounded.
        reports: dict[str, str | None] = {}

        def with_reports():
            for item in items:
                _, study, subject = item[:3]
                if study not in reports:  # "" without a usable section, None if absent
                    path = root / report_path(subject, study)
                    text = path.read_bytes().decode("utf-8", "replace") if path.exists() else None
                    reports[study] = None if text is None else select_report(
                        text, config.report_section)
                if reports[study] is None:
                    drops[rc.REPORT_MISSING] += 1
                elif not reports[study]:
                    drops[rc.REPORT_NO_SECTIONS] += 1
                else:
                    yield item

        def path_of(item):
            return root / image_path(subject_id=item[2], study_id=item[1], dicom_id=item[0])

        for (dicom, study, subject, view, (labels, missing)), image, reason in rc.load_images(
                with_reports(), path_of, config.image_size):
            if reason:
                drops[reason] += 1
                continue
            yield dicom, {"image": image, "report": reports[study], "labels": labels,
                          "missing": missing, "id": dicom, "study_id": study,
                          "subject_id": subject, "view": view}

