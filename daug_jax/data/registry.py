"""The dataset registry: dataset name -> TFDS builder, split sources, class names, conventions.

Every stage that reads films names its dataset the same way — ``data.name`` / ``data.data_dir``
in its config, or ``--data NAME --data-dir DIR`` on the command line — and gets it from here:

    dataset = open_dataset(config.data)          # builds synthetic_cxr if it is missing
    source = dataset.source("train")             # random access: source[i] -> dict of arrays
    dataset.class_names, dataset.has_reports, dataset.image_shape

Registered datasets (all array_record, readable without TensorFlow):

    synthetic_cxr   the built-in benchmark (reports, labels, masks, sites); built on demand
    mimic_cxr       MIMIC-CXR-JPG + reports (manual download: ``daug-jax data prepare``)
    chexpert_cxr    CheXpert v1.0 (no reports; manual download)
    nih_cxr14       NIH ChestX-ray14 with its radiologist boxes (no reports; manual download)

Label convention of every dataset: ``labels`` int8 [C] in {1, 0, -1 = uncertain} and, where a
label can be blank, ``missing`` bool [C]; `daug_jax.losses.labels_and_mask` turns both into
targets and a loss mask under ``data.label_policy`` for every consumer alike.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from daug_jax.config import load_config
from daug_jax.data import builders, chexpert, mimic_cxr, nih
from daug_jax.lock import workdir_lock

# The label every registered dataset carries for a film without findings (CheXpert's labeler:
# 1 exactly when no other class is 1 or -1).  Guiding towards it translates a film to healthy.
NO_FINDING = "No Finding"


def _synthetic(cfg: Any, image_size: int):
    config = builders.SyntheticCxrConfig(
        image_size=image_size, num_train=int(cfg.num_train), num_validation=int(cfg.num_validation),
        num_test=int(cfg.num_test), seed=int(cfg.seed))
    return builders.SyntheticCxr(config=config, data_dir=cfg.data_dir)


def _mimic(cfg: Any, image_size: int):
    config = mimic_cxr.MimicCxrConfig(image_size=image_size, report_section=cfg.report_section)
    return mimic_cxr.MimicCxr(config=config, data_dir=cfg.data_dir)


def _chexpert(cfg: Any, image_size: int):
    return chexpert.ChexpertCxr(config=chexpert.ChexpertCxrConfig(image_size=image_size),
                                data_dir=cfg.data_dir)


def _nih(cfg: Any, image_size: int):
    return nih.NihCxr14(config=nih.NihCxr14Config(image_size=image_size), data_dir=cfg.data_dir)


@dataclasses.dataclass(frozen=True)
class Entry:
    """How a registered dataset is made: ``make(data_config, image_size) -> builder``."""
    make: Callable[[Any, int], tfds.core.DatasetBuilder]
    has_reports: bool
    build_on_demand: bool  # generated data: built under data_dir when missing
    localized: bool        # records carry regions to point at ("masks"/"sites", or "boxes")


REGISTRY: dict[str, Entry] = {
    "synthetic_cxr": Entry(_synthetic, has_reports=True, build_on_demand=True, localized=True),
    "mimic_cxr": Entry(_mimic, has_reports=True, build_on_demand=False, localized=False),
    "chexpert_cxr": Entry(_chexpert, has_reports=False, build_on_demand=False, localized=False),
    "nih_cxr14": Entry(_nih, has_reports=False, build_on_demand=False, localized=True),
}
ALIASES = {"synthetic": "synthetic_cxr"}  # the name older configs used


def canonical_name(name: str) -> str:
    """The registered name of ``name`` (or of its alias); unknown names list the known ones."""
    name = ALIASES.get(name, name)
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: "
                         f"{', '.join(sorted(REGISTRY))}")
    return name


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A prepared dataset: its builder and what every stage needs to know about it."""
    name: str
    builder: tfds.core.DatasetBuilder
    entry: Entry

    @property
    def splits(self) -> list[str]:
        return sorted(self.builder.info.splits.keys())

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.builder.info.metadata["class_names"])

    @property
    def has_reports(self) -> bool:
        return self.entry.has_reports

    @property
    def localized(self) -> bool:
        return self.entry.localized

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.builder.info.features["image"].shape)

    def source(self, split: str):
        """Random-access source of ``split`` ("train", or a union such as "train+validation",
        records in that order); an absent split names the splits that exist."""
        for part in split.split("+"):
            if part.strip() not in self.builder.info.splits:
                raise ValueError(f"split {part.strip()!r} is not in {self.name} under "
                                 f"{self.builder.data_dir}; its splits: {', '.join(self.splits)}")
        return self.builder.as_data_source(split=split)


def make_builder(name: str, data_config: Any, image_size: int | None = None):
    """The (not necessarily prepared) builder of ``name`` for ``data_config``."""
    name = canonical_name(name)
    size = int(image_size if image_size is not None else data_config.image_size)
    return REGISTRY[name].make(data_config, size)


def open_dataset(data_config: Any, *, image_size: int | None = None) -> Dataset:
    """The dataset named by ``data_config.name`` under ``data_config.data_dir``, prepared:
    ``synthetic_cxr`` is generated when missing; a real dataset that was never prepared raises
    FileNotFoundError with the ``daug-jax data prepare`` command that prepares it."""
    name = canonical_name(data_config.name)
    entry = REGISTRY[name]
    builder = make_builder(name, data_config, image_size)
    if not builder.is_prepared() and jax.process_count() > 1:
        # Several processes of one job: the first builds, the others wait and read its files.
        if jax.process_index() == 0 and entry.build_on_demand:
            builder.download_and_prepare()
        multihost_utils.sync_global_devices(f"dataset {name} prepared")
        builder = make_builder(name, data_config, image_size)
    if not builder.is_prepared():
        if not entry.build_on_demand:
            root, config = builder._data_dir_root, builder.builder_config
            raise FileNotFoundError(
                f"{name} ({config.name}) is not prepared in {root}; run `daug-jax data prepare "
                f"{name} --manual-dir DIR --data-dir {root} --size {config.image_size}` first")
        builder.download_and_prepare()
    return Dataset(name, builder, entry)


# ----------------------------------------------------------------------------- CLI helpers
def add_data_args(parser) -> None:
    """``--data NAME --data-dir DIR``: override the config's ``data.name`` / ``data.data_dir``."""
    parser.add_argument("--data", metavar="NAME",
                        help=f"dataset name (default: the config's data.name); one of "
                             f"{', '.join(sorted(REGISTRY))}")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="TFDS data directory (default: the config's data.data_dir)")


def apply_data_args(config: Any, args) -> None:
    """Writes ``--data`` / ``--data-dir`` into ``config.data`` (checked against the registry)."""
    if args.data:
        config.data.name = args.data
    if args.data_dir:
        config.data.data_dir = args.data_dir
    config.data.name = canonical_name(config.data.name)


def add_run_args(parser, *, config: str, workdir: str, example: str) -> None:
    """The training commands' arguments: ``--config NAME --workdir DIR --data NAME --data-dir
    DIR --set KEY=VALUE ...`` (``example``: an override shown in the help)."""
    parser.add_argument("--config", default=config, help="experiments/<name>.py or a .py path")
    parser.add_argument("--workdir", default=workdir)
    add_data_args(parser)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"config override, e.g. --set {example} (repeatable)")


def open_run(args) -> tuple[Any, Dataset]:
    """``(config, dataset)`` of a training command's parsed `add_run_args`: the config with its
    overrides and ``--data`` / ``--data-dir`` applied, and its dataset, prepared."""
    config = load_config(args.config, args.set)
    apply_data_args(config, args)
    return config, open_dataset(config.data)


def main(command: str, argv: list[str]) -> int:
    """``daug-jax data prepare {chexpert_cxr,mimic_cxr,nih_cxr14} --manual-dir M --data-dir D``."""
    manual = sorted(n for n, e in REGISTRY.items() if not e.build_on_demand)
    parser = argparse.ArgumentParser(
        prog=f"daug-jax {command}",
        description="Build a real chest X-ray TFDS dataset (array_record) from a manual download.")
    parser.add_argument("dataset", choices=manual)
    parser.add_argument("--manual-dir", required=True,
                        help="directory holding the downloaded files (see the instructions)")
    parser.add_argument("--data-dir", default="runs/tfds")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--report-section", default="findings+impression",
                        choices=["findings", "impression", "findings+impression"],
                        help="mimic_cxr only")
    args = parser.parse_args(argv)
    cfg = ml_collections.ConfigDict(dict(data_dir=args.data_dir,
                                         report_section=args.report_section))
    builder = make_builder(args.dataset, cfg, args.size)
    with workdir_lock(args.data_dir, what=command):  # two builds would mix their files
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir))
    for split, info in builder.info.splits.items():
        dropped = builder.info.metadata.get("dropped", {}).get(split, {})
        print(f"{builder.name}/{builder.builder_config.name} {split}: {info.num_examples} "
              f"records, dropped {dropped or 'none'}, in {builder.data_dir}")
    return 0
