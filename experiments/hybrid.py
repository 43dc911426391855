"""Ablation variant `hybrid` (see experiments/ablation.py).

    daug-jax train --config hybrid --workdir runs/hybrid
"""

from experiments.ablation import variant_config


def get_config():
    return variant_config("hybrid")
