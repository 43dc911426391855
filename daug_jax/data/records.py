"""One split of the dataset named by a ``data`` config, as in-memory records for training.

    data: {name: "synthetic" | "mimic_cxr" | "chexpert_cxr", image_size, num_train, seed,
           data_dir, report_section}

Returns the dict layout of `synthetic.generate` — image float32 [N, H, W, 1] in [0, 1],
labels int8 [N, C], report, id — plus, for the real datasets, ``missing`` bool [N, C] and
``class_names`` (their 14 CheXpert classes), so downstream code reads every dataset alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from daug_jax.data import pipeline

REAL_DATASETS = ("mimic_cxr", "chexpert_cxr")


def load_records(data_config: Any, split: str = "train") -> dict:
    """Records of ``split`` of ``data_config.name`` (first ``num_<split>`` if set)."""
    from daug_jax.data import builders, real_common, synthetic

    name = data_config.get("name", "synthetic")
    size = int(data_config.image_size)
    limit = data_config.get(f"num_{split}", None)
    if name == "synthetic":
        if limit is None:
            raise ValueError(f"data.num_{split} must be set for the synthetic benchmark")
        seed = builders.SyntheticCxrConfig(seed=int(data_config.get("seed", 0))).split_seed(split)
        return synthetic.generate(int(limit), image_size=size, seed=seed)
    if name not in REAL_DATASETS:
        raise ValueError(f"unknown dataset {name!r} in data.name; expected 'synthetic' or one of "
                         f"{REAL_DATASETS}")
    builder = real_common.make_builder(
        name, data_dir=data_config.data_dir, image_size=size,
        report_section=data_config.get("report_section", "findings+impression"))
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{name} is not prepared in {data_config.data_dir}; run `daug-jax data prepare {name} "
            f"--manual-dir DIR --data-dir {data_config.data_dir} --size {size}` first")
    source = builder.as_data_source(split=split)
    n = len(source) if limit is None else min(int(limit), len(source))
    records = pipeline.read(source, range(n))
    records["image"] = records["image"].astype(np.float32) / 255.0
    records["class_names"] = list(real_common.CHEXPERT_CLASSES)
    return records
