"""Ablation variant `daug_hybrid` (see experiments/ablation.py).

    daug-jax train --config daug_hybrid --workdir runs/daug_hybrid --set data.heatmaps_dir=runs/heatmaps
"""

from experiments.ablation import variant_config


def get_config():
    return variant_config("daug_hybrid")
