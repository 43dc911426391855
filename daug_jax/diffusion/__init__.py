"""Diffusion stage: noise schedules, the epsilon-UNet, the noise-aware classifier, training.

Guided translation (encode with DDIM, decode with classifier guidance) lives in
`daug_jax.diffusion.sampling`; models are trained and loaded through `daug_jax.diffusion.train`.
"""

from daug_jax.diffusion.classifier import NoiseAwareClassifier
from daug_jax.losses import masked_bce  # the classifier's loss: the towers' label convention
from daug_jax.diffusion.schedule import (SCHEDULES, alphas_cumprod, betas, ddim_step, eps_loss,
                                         q_sample, timestep_grid)
from daug_jax.diffusion.unet import UNet, timestep_embedding

__all__ = [
    "SCHEDULES", "alphas_cumprod", "betas", "ddim_step", "eps_loss", "q_sample", "timestep_grid",
    "UNet", "timestep_embedding", "NoiseAwareClassifier", "masked_bce",
]
