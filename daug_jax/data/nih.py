"""TFDS builder for NIH ChestX-ray14 with its radiologist boxes (``nih_cxr14``).

112,120 frontal films (PNG, 1024 x 1024) of 30,805 patients, 14 findings text-mined from the
reports plus "No Finding", and 984 hand-drawn boxes (8 findings) on 880 films.  One record per
film, in the order of the split lists:

    image    uint8 [S, S, 1]   grayscale, resized to the config's S x S
    labels   int8  [15]        1 / 0 per CLASS_NAMES ("No Finding" is a class of its own)
    boxes    bool  [15, S, S]  the film's boxes of each class as masks at S x S (zlib on disk:
                               almost all False, and 15 S x S planes would dwarf the pixels)
    has_box  bool  [15]        the film has a box of that class
    id       text              the image index, e.g. "00013118_008.png"
    report   text              "" (the dataset ships no reports)

Splits: ``test`` is the official test_list.txt; train_val_list.txt is divided by patient, those
whose Patient ID is a multiple of `VALIDATION_MODULUS` (~10 % of the films) to ``validation``, the
rest to ``train``.  Films listed but absent, unreadable, listed twice or without a data-entry row
are skipped and counted in ``info.metadata["dropped"]`` (see `real_common`).

Box grid.  ``BBox_List_2017.csv`` gives ``[x, y, w, h]`` in pixels of the distributed 1024 x 1024
PNGs, not of the original acquisition whose size the data entry lists (every real box fits in
1024 x 1024 and puts the Cardiomegaly boxes over the heart only on that grid: tests/test_nih.py).
Boxes are therefore mapped from the nominal 1024 grid (`BOX_GRID`) to S x S, never from the PNG's
own size, so downsampled copies of the PNGs (256 px ones are common) give the same masks.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os

import numpy as np
import tensorflow_datasets as tfds

from daug_jax.data import real_common as rc

# The findings in the data entry's spelling and order of the dataset paper, then "No Finding".
CLASS_NAMES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia", "No Finding",
)
BOX_ALIASES = {"Infiltrate": "Infiltration"}  # the box list's spelling -> the data entry's

# Looked for in this order: the 2020 revision of the data entry (fixed ages), then the original.
DATA_ENTRY_CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz",
                   "Data_Entry_2017.csv", "Data_Entry_2017.csv.gz")
BBOX_CSVS = ("BBox_List_2017.csv", "BBox_List_2017.csv.gz")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
IMAGE_DIRS = ("images", "images_*/images")  # one folder, or the twelve archives' folders
# Header cells as written: the headers were split at the commas inside "[x,y,w,h]".
ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
BOX_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")

BOX_GRID = 1024          # pixel grid of the box coordinates (module docstring)
VALIDATION_MODULUS = 10  # Patient ID % 10 == 0 -> validation (ids are sequential: an even spread)
SPLITS = ("train", "validation", "test")


def encode_findings(text: str, where: str = "") -> np.ndarray:
    """A "Finding Labels" cell ("Cardiomegaly|Effusion", "No Finding") -> int8 [15] in {0, 1}."""
    labels = np.zeros(len(CLASS_NAMES), np.int8)
    for name in text.split("|"):
        name = name.strip()
        if name not in CLASS_NAMES:
            raise ValueError(f"{where}: unknown finding {name!r}; expected {CLASS_NAMES}")
        labels[CLASS_NAMES.index(name)] = 1
    return labels


def _cover(start: float, length: float, size: int) -> np.ndarray:
    """bool [size]: the pixels of an S-pixel axis whose centres lie in [start, start + length)
    of the box grid; a box thinner than a pixel keeps the pixel holding its centre, so that a
    film with a box never gets an empty mask."""
    centres = (np.arange(size) + 0.5) * (BOX_GRID / size)
    inside = (centres >= start) & (centres < start + length)
    if not inside.any():
        inside[int(np.clip((start + length / 2) * size / BOX_GRID, 0, size - 1))] = True
    return inside


def box_mask(x: float, y: float, w: float, h: float, size: int) -> np.ndarray:
    """bool [size, size]: the box ``[x, y, w, h]`` (1024 grid) as a mask at size x size."""
    return np.outer(_cover(y, h, size), _cover(x, w, size))


def read_boxes(path: os.PathLike) -> dict[str, list[tuple[int, float, float, float, float]]]:
    """image index -> [(class index, x, y, w, h)] from the box list."""
    boxes: dict[str, list] = {}
    for row in rc.iter_csv(path, BOX_COLUMNS):
        name = row["Finding Label"].strip()
        name = BOX_ALIASES.get(name, name)
        if name not in CLASS_NAMES:
            raise ValueError(f"{path}: {row['Image Index']} has a box of unknown class {name!r}")
        boxes.setdefault(row["Image Index"].strip(), []).append(
            (CLASS_NAMES.index(name), *(float(row[c]) for c in BOX_COLUMNS[2:])))
    return boxes


def index_images(root: os.PathLike) -> dict[str, str]:
    """PNG file name -> path, over every image folder present (the name is the image index)."""
    found, root = {}, glob.escape(os.fspath(root))
    for pattern in IMAGE_DIRS:
        for path in sorted(glob.glob(os.path.join(root, pattern, "*.png"))):
            found.setdefault(os.path.basename(path), path)
    return found


@dataclasses.dataclass(eq=False)  # like tfds.core.BuilderConfig (not frozen)
class NihCxr14Config(tfds.core.BuilderConfig):
    """Image size; the config name is derived from it."""

    name: str = ""
    image_size: int = 224

    def __post_init__(self):
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not self.name:
            self.name = f"{self.image_size}px"


class NihCxr14(rc.DropCountingBuilder):
    """NIH ChestX-ray14 films with 15 labels and per-class box masks (no reports)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [NihCxr14Config(image_size=224), NihCxr14Config(image_size=256),
                       NihCxr14Config(image_size=64)]
    DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download NIH ChestX-ray14 from the NIH Clinical Center's box folder,
    https://nihcc.app.box.com/v/ChestXray-NIHCC, into the manual directory:

      Data_Entry_2017_v2020.csv   (or the older Data_Entry_2017.csv; either may be gzipped)
      BBox_List_2017.csv          (may be gzipped)
      train_val_list.txt
      test_list.txt
      images_001.tar.gz ... images_012.tar.gz, extracted

    Each archive extracts to images/; the PNGs may also sit in images_001/images/ ...
    images_012/images/ (the layout of other mirrors).  Every folder present is indexed by file
    name, so any mix works.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        size, n = self.builder_config.image_size, len(CLASS_NAMES)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8),
                "labels": tfds.features.Tensor(shape=(n,), dtype=np.int8),
                "boxes": tfds.features.Tensor(shape=(n, size, size), dtype=np.bool_,
                                              encoding="zlib"),
                "has_box": tfds.features.Tensor(shape=(n,), dtype=np.bool_),
                "id": tfds.features.Text(),
                "report": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(
                class_names=list(CLASS_NAMES), box_grid=BOX_GRID,
                validation_rule=f"train_val patients with Patient ID % {VALIDATION_MODULUS} == 0"),
            homepage="https://nihcc.app.box.com/v/ChestXray-NIHCC",
        )

    def _shard_iterators_per_split(self, dl_manager):
        entry_csv = rc.first_present(dl_manager, DATA_ENTRY_CSVS)
        bbox_csv = rc.first_present(dl_manager, BBOX_CSVS)
        root = rc.require_files(dl_manager, self.name,
                                [entry_csv, bbox_csv, TRAIN_VAL_LIST, TEST_LIST])
        # Every label and box is parsed before any record is written: a bad file fails at once.
        entries = {r["Image Index"].strip(): (int(r["Patient ID"]), encode_findings(
                       r["Finding Labels"], f"{entry_csv} {r['Image Index']}"))
                   for r in rc.iter_csv(root / entry_csv, ENTRY_COLUMNS)}
        boxes = read_boxes(root / bbox_csv)
        images = index_images(root)
        self._drops = rc.new_drop_counts(self.info, SPLITS)
        planned = self._plan(root, entries, boxes, images)
        size, n = self.builder_config.image_size, len(CLASS_NAMES)
        record_bytes = size * size * (1 + n) + 2 * n + rc.TEXT_BYTES
        return {split: [functools.partial(self._generate_shard, split, items)
                        for items in rc.shard(planned[split], record_bytes)]
                for split in SPLITS}

    def _plan(self, root, entries, boxes, images) -> dict[str, list[tuple]]:
        """split -> [(image index, path, labels, boxes)] in list order; the films that fail a
        check needing no file read are counted as dropped.  An image listed twice (also in
        both lists) keeps its first listing."""
        planned: dict[str, list] = {split: [] for split in SPLITS}
        seen: set[str] = set()
        for list_name in (TRAIN_VAL_LIST, TEST_LIST):
            with open(root / list_name, encoding="utf-8") as f:
                listed = [line.strip() for line in f if line.strip()]
            for index in listed:
                entry = entries.get(index)
                split = "test" if list_name == TEST_LIST else (
                    "validation" if entry and entry[0] % VALIDATION_MODULUS == 0 else "train")
                reason = (rc.DUPLICATE if index in seen
                          else rc.METADATA_MISSING if entry is None
                          else rc.IMAGE_MISSING if index not in images else None)
                seen.add(index)
                if reason:
                    self._drops[split][reason] += 1
                else:
                    planned[split].append((index, images[index], entry[1],
                                           tuple(boxes.get(index, ()))))
        return planned

    def _generate_shard(self, split, items):
        """One shard's records; an image that cannot be decoded is counted as dropped."""
        size, drops = self.builder_config.image_size, self._drops[split]
        for (index, _, labels, film_boxes), image, reason in rc.load_images(
                items, lambda item: item[1], size):
            if reason:
                drops[reason] += 1
                continue
            masks = np.zeros((len(CLASS_NAMES), size, size), np.bool_)
            for c, x, y, w, h in film_boxes:
                masks[c] |= box_mask(x, y, w, h, size)
            yield index, {"image": image, "labels": labels, "boxes": masks,
                          "has_box": masks.any(axis=(1, 2)), "id": index, "report": ""}
