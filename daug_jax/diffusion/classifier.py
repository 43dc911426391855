"""The noise-aware classifier p_phi(y | x_t, t) that guides DDIM decoding.

Built from the UNet's down path (same ResBlocks, same timestep embedding), then GroupNorm, SiLU,
global average pooling and a linear head: one logit per class, read through a sigmoid (the
findings are not exclusive).  It is trained on noised images so that its gradient
``grad_x log sigmoid(logit_c(x_t, t))`` is meaningful at every level the decoder visits.
"""

from __future__ import annotations

from typing import Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp

from daug_jax.diffusion.unet import Dtype, ResBlock, TimeEmbedding, _conv, _norm, down_path


class NoiseAwareClassifier(nn.Module):
    """Timestep-conditioned multi-label classifier.

    Attributes match `UNet` (``ch``, ``channel_mult``, ``num_res_blocks``,
    ``attention_resolutions``, ``num_heads``, ``norm_groups``, ``dtype``) plus ``num_classes``.
    """
    num_classes: int
    ch: int = 32
    channel_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: Sequence[int] = ()
    num_heads: int = 1
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t):
        """x: [B, H, W, C] float32 in [-1, 1] (noised); t: [B] int -> logits [B, num_classes] float32."""
        chex.assert_rank(x, 4)
        chex.assert_shape(t, (x.shape[0],))
        g, dt = self.norm_groups, self.dtype
        temb = TimeEmbedding(4 * self.ch, dtype=dt)(t)
        h, _ = down_path(self, _conv(self.ch, dt)(x.astype(dt)), temb)
        h = ResBlock(h.shape[-1], g, dt)(h, temb)
        h = nn.silu(_norm(h.shape[-1], g, dt)(h))
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))              # [B, C_last]
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(h)
