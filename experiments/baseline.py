"""Ablation variant `baseline` (see experiments/ablation.py).

    daug-jax train --config baseline --workdir runs/baseline
"""

from experiments.ablation import variant_config


def get_config():
    return variant_config("baseline")
