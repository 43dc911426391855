"""TFDS builder for the built-in synthetic chest X-ray benchmark (``synthetic_cxr``).

Stored as array_record (random access, no TensorFlow needed; pixels uint8, masks and sites bool),
records in index order, shard by shard.  Read back by name through `daug_jax.data.registry` or:

    builder = SyntheticCxr(config=SyntheticCxrConfig(image_size=64, num_train=2000), data_dir=d)
    builder.download_and_prepare()
    train = builder.as_data_source(split="train")      # train[i] -> dict of numpy arrays
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds

from daug_jax.data import real_common as rc
from daug_jax.data import synthetic
from daug_jax.lock import workdir_lock

SPLITS = ("train", "validation", "test")
_CHUNK = 256  # records generated per call; record i depends only on (seed, i)


@dataclasses.dataclass(eq=False)  # tfds.core.BuilderConfig is not frozen, so neither is this
class SyntheticCxrConfig(tfds.core.BuilderConfig):
    """Size, count and seed of the benchmark; the config name is derived from them."""

    name: str = ""
    image_size: int = 64
    num_train: int = 2000
    num_validation: int = 500
    num_test: int = 500
    seed: int = 0

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        for split in SPLITS:
            if getattr(self, f"num_{split}") < 0:
                raise ValueError(f"num_{split} must be >= 0")
        if not self.name:
            self.name = (f"{self.image_size}px_{self.num_train}_{self.num_validation}_"
                         f"{self.num_test}_seed{self.seed}")

    def split_seed(self, split: str) -> int:
        """Distinct generator seed per split (no record is shared between splits)."""
        return self.seed * len(SPLITS) + SPLITS.index(split)


class SyntheticCxr(rc.ArrayRecordBuilder):
    """Procedural chest radiographs with reports, CheXpert-style labels, lesion and site masks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        SyntheticCxrConfig(image_size=64),
        SyntheticCxrConfig(image_size=32),
    ]
    DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name

    def _info(self) -> tfds.core.DatasetInfo:
        size, n_cls = self.builder_config.image_size, len(synthetic.CLASS_NAMES)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8),
                "report": tfds.features.Text(),
                "labels": tfds.features.Tensor(shape=(n_cls,), dtype=np.int8),
                "masks": tfds.features.Tensor(shape=(n_cls, size, size), dtype=np.bool_),
                "sites": tfds.features.Tensor(shape=(n_cls, size, size), dtype=np.bool_),
            }),
            metadata=tfds.core.MetadataDict(class_names=list(synthetic.CLASS_NAMES)),
            license="Apache-2.0",
        )

    def _shard_iterators_per_split(self, dl_manager):
        del dl_manager  # nothing to download: the data is generated
        config, size = self.builder_config, self.builder_config.image_size
        # Raw example bytes: pixels, then a mask and a site map per class (the bulk at 224 px).
        record_bytes = size * size * (1 + 2 * len(synthetic.CLASS_NAMES)) + rc.TEXT_BYTES
        return {split: [functools.partial(self._generate_shard, split, indices)
                        for indices in rc.shard(range(getattr(config, f"num_{split}")),
                                                record_bytes)]
                for split in SPLITS}

    def _generate_shard(self, split: str, indices: range):
        """Records ``indices`` of ``split``, in index order (record i depends only on seed, i)."""
        config, seed = self.builder_config, self.builder_config.split_seed(split)
        for start in range(indices.start, indices.stop, _CHUNK):
            data = synthetic.generate(min(_CHUNK, indices.stop - start),
                                      image_size=config.image_size, seed=seed, start=start)
            data["image"] = np.round(data["image"] * 255.0).astype(np.uint8)
            for j in range(len(data["id"])):
                yield data["id"][j], {k: v[j] for k, v in data.items()}  # keys = the features


def main(command: str, argv: list[str]) -> int:
    """``daug-jax data build --data-dir DIR [--size 64 --num-train N ... --seed S]``."""
    parser = argparse.ArgumentParser(prog=f"daug-jax {command}",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="runs/tfds")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-validation", type=int, default=500)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    builder = SyntheticCxr(config=SyntheticCxrConfig(
        image_size=args.size, num_train=args.num_train, num_validation=args.num_validation,
        num_test=args.num_test, seed=args.seed), data_dir=args.data_dir)
    with workdir_lock(args.data_dir, what=command):  # two builds would mix their files
        builder.download_and_prepare()
    for split in (s for s in SPLITS if s in builder.info.splits):  # empty splits are left out
        print(f"synthetic_cxr/{builder.builder_config.name} {split}: "
              f"{len(builder.as_data_source(split=split))} records in {builder.data_dir}")
    return 0
