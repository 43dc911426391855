"""TFDS builder for CheXpert v1.0 (full or downsampled "small") (``chexpert_cxr``).

Named ``chexpert_cxr`` because TFDS's own catalogue already registers ``chexpert`` (a builder
that encodes images with TensorFlow).  One record per image, frontal views by default; splits
``train`` (train.csv) and ``validation`` (valid.csv), each in its CSV's order.  Features: see
`daug_jax.data.real_common`.  CheXpert ships no reports (``report`` is ""): train its towers
class-only, ``train.clip_weight=0``; image-report retrieval needs MIMIC-CXR.
"""

from __future__ import annotations

import dataclasses
import functools

import tensorflow_datasets as tfds

from daug_jax.data import real_common as rc

VARIANTS = ("CheXpert-v1.0-small", "CheXpert-v1.0")  # looked for in this order
SPLITS = {"train": "train.csv", "validation": "valid.csv"}
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *rc.CHEXPERT_CLASSES)


@dataclasses.dataclass(eq=False)  # like tfds.core.BuilderConfig (not frozen)
class ChexpertCxrConfig(tfds.core.BuilderConfig):
    """Image size and view filter; the config name is derived from them."""

    name: str = ""
    image_size: int = 224
    frontal_only: bool = True

    def __post_init__(self):
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not self.name:
            self.name = f"{self.image_size}px" + ("" if self.frontal_only else "_all_views")


class ChexpertCxr(rc.DropCountingBuilder):
    """CheXpert radiographs with the 14 labeller observations (no reports)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [ChexpertCxrConfig(image_size=224), ChexpertCxrConfig(image_size=64)]
    DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download CheXpert v1.0 from https://stanfordmlgroup.github.io/competitions/chexpert/ (or the
    Stanford AIMI catalogue), either the downsampled CheXpert-v1.0-small or the full CheXpert-v1.0,
    and extract it so that the manual directory holds the extracted folder itself:

      CheXpert-v1.0-small/train.csv
      CheXpert-v1.0-small/valid.csv
      CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg ...
      CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg ...

    (or the same under CheXpert-v1.0/).  The CSV "Path" column is relative to the manual directory.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=rc.features(self.builder_config.image_size),
            metadata=tfds.core.MetadataDict(
                class_names=list(rc.CHEXPERT_CLASSES),
                frontal_only=self.builder_config.frontal_only),
            homepage="https://stanfordmlgroup.github.io/competitions/chexpert/",
        )

    def _shard_iterators_per_split(self, dl_manager):
        # Whichever variant has a train.csv; if none does, the error names the small one's files.
        variant = rc.first_present(dl_manager, [f"{v}/train.csv" for v in VARIANTS]).split("/")[0]
        root = rc.require_files(dl_manager, self.name,
                                [f"{variant}/{csv_name}" for csv_name in SPLITS.values()])
        self._drops = rc.new_drop_counts(self.info, SPLITS)
        # Every split is planned (and every label parsed) before any record is written.
        planned = {split: self._plan(root, variant, split) for split in SPLITS}
        record_bytes = rc.real_record_bytes(self.builder_config.image_size)
        return {split: [functools.partial(self._generate_shard, root, split, items)
                        for items in rc.shard(planned[split], record_bytes)]
                for split in SPLITS}

    def _plan(self, root, variant, split) -> list[tuple]:
        """The CSV rows that pass the CSV-only checks, in order, as (path, view, (labels,
        missing)); the others are counted as dropped.  No image is read here."""
        config, drops, seen, planned = self.builder_config, self._drops[split], set(), []
        for row in rc.iter_csv(root / variant / SPLITS[split], COLUMNS):
            path = row["Path"]
            label = rc.encode_labels(row, f"{variant}/{SPLITS[split]} Path {path}")
            excluded = config.frontal_only and row["Frontal/Lateral"].strip() != "Frontal"
            reason = rc.DUPLICATE if path in seen else rc.VIEW_EXCLUDED if excluded else None
            seen.add(path)
            if reason:
                drops[reason] += 1
            else:
                view = row["AP/PA"].strip() or row["Frontal/Lateral"].strip()
                planned.append((path, view, label))
        return planned

    def _generate_shard(self, root, split, items):
        """One shard's records; an image that cannot be decoded is counted as dropped."""
        drops = self._drops[split]
        for (path, view, (label, missing)), image, reason in rc.load_images(
                items, lambda item: root / item[0], self.builder_config.image_size):
            if reason:
                drops[reason] += 1
                continue
            parts = path.split("/")  # the id drops the variant folder: small and full agree
            image_id = "/".join(parts[1:])
            yield image_id, {"image": image, "report": "", "labels": label, "missing": missing,
                             "id": image_id, "study_id": "/".join(parts[-3:-1]),
                             "subject_id": parts[-3], "view": view}

