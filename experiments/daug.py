"""Ablation variant `daug` (see experiments/ablation.py).

    daug-jax train --config daug --workdir runs/daug --set data.heatmaps_dir=runs/heatmaps
"""

from experiments.ablation import variant_config


def get_config():
    return variant_config("daug")
