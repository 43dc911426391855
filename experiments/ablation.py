"""The paper's 2x2 ablation: DAug channels (on/off) x hybrid loss (on/off).

Same architecture and budget in all four runs (experiments/towers.py); only the content of the
extra image channels and the weight of the image-class term change:

    baseline     image repeated into the extra channels, CLIP loss
    daug         [x0, DAug heatmaps],                     CLIP loss
    hybrid       image repeated into the extra channels, hybrid loss
    daug_hybrid  [x0, DAug heatmaps],                     hybrid loss
"""

import ml_collections

from experiments import towers

VARIANTS = {
    "baseline": dict(fill="repeat", clip_weight=1.0),
    "daug": dict(fill="heatmaps", clip_weight=1.0),
    "hybrid": dict(fill="repeat", clip_weight=0.5),
    "daug_hybrid": dict(fill="heatmaps", clip_weight=0.5),
}


def variant_config(name: str, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """The towers config of one variant (``base`` defaults to experiments/towers.py)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected one of {list(VARIANTS)}")
    config = ml_collections.ConfigDict((base or towers.get_config()).to_dict())
    config.model.vision.fill = VARIANTS[name]["fill"]
    config.train.clip_weight = VARIANTS[name]["clip_weight"]
    return config


def get_config() -> ml_collections.ConfigDict:
    return variant_config("daug_hybrid")
