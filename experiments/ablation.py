"""The paper's two ablation settings, each DAug channels (on/off) x hybrid loss (on/off).

Same architecture and budget in every run (experiments/towers.py); only the content of the
extra image channels and the weight w of ``L = w · L_image-text + (1 − w) · L_image-class``
change.  Each setting compares its single-term loss with the hybrid one, as the authors do:

    classification   single term: class term only (w = 0)   hybrid: w = 0.7
    retrieval        single term: CLIP loss only (w = 1)     hybrid: w = 0.8

and inside each setting the variants

    baseline     the film repeated into the extra channels, single-term loss
    daug         [x0, DAug heatmap],                          single-term loss
    hybrid       the film repeated into the extra channels, hybrid loss
    daug_hybrid  [x0, DAug heatmap],                          hybrid loss

    daug-jax train --config ablation --workdir runs/daug_hybrid   # one variant alone
"""

import ml_collections

from daug_jax.ablation import VARIANTS
from experiments import towers

# The clip weight w of each setting's single-term loss and of its hybrid (the authors'
# configs/abl/*.yaml); `daug_jax.ablation.members` crosses them with the 2x2 design and seeds.
SETTINGS = {
    "classification": {"single": 0.0, "hybrid": 0.7},
    "retrieval": {"single": 1.0, "hybrid": 0.8},
}


def variant_config(name: str, base: ml_collections.ConfigDict | None = None,
                   setting: str = "retrieval") -> ml_collections.ConfigDict:
    """The towers config of one variant of one setting (``base`` defaults to experiments/towers.py)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected one of {list(VARIANTS)}")
    if setting not in SETTINGS:
        raise ValueError(f"unknown ablation setting {setting!r}; expected one of {list(SETTINGS)}")
    config = ml_collections.ConfigDict((base or towers.get_config()).to_dict())
    fill, loss = VARIANTS[name]
    config.model.vision.fill = fill
    config.train.clip_weight = SETTINGS[setting][loss]
    return config


def get_config() -> ml_collections.ConfigDict:
    return variant_config("daug_hybrid")
