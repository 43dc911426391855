"""The diffusion networks: the epsilon-prediction UNet (DDPM / guided-diffusion layout, NHWC),
the noise-aware classifier built from its down path, and their building blocks.

    x [B, H, W, C] in [-1, 1], t [B] int
      -> stem conv -> down path: per level, `num_res_blocks` ResBlocks (+ attention at chosen
         resolutions), then a stride-2 conv; every output is kept as a skip
      -> middle: ResBlock, attention, ResBlock
      -> up path: per level, `num_res_blocks + 1` ResBlocks on [h, skip] concatenations, then
         nearest-neighbour upsampling + conv
      -> GroupNorm, SiLU, zero-initialised conv -> eps [B, H, W, C]

Every ResBlock receives the timestep embedding (sinusoidal features -> 2-layer MLP).  The output
convolutions of residual branches start at zero so a fresh network is the identity plus a small
perturbation (stable early training, as in guided-diffusion).

The classifier p_phi(y | x_t, t) that guides DDIM decoding is the same down path, then a
ResBlock, GroupNorm, SiLU, global average pooling and a linear head: one logit per class, read
through a sigmoid (the findings are not exclusive).  It is trained on noised images, so that its
gradient is meaningful at every level the decoder visits.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
# The labels of a class-conditional UNet (``unet.class_cond``): the film's healthy / diseased side
# ("No Finding" or its absence), and the null label that conditions on nothing.
NULL_LABEL, HEALTHY, DISEASED = 0, 1, 2


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
    """Transformer-style sinusoidal features of integer levels.  t: [B] -> [B, dim] float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _groups(channels: int, max_groups: int) -> int:
    """Largest group count <= max_groups dividing ``channels`` (narrow nets have few channels)."""
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


def _norm(channels: int, groups: int, dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=_groups(channels, groups), dtype=dtype, name=name)


def _conv(features: int, dtype: Dtype, *, kernel: int = 3, stride: int = 1, zero: bool = False,
          name: str | None = None) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), dtype=dtype, name=name,
                   kernel_init=nn.initializers.zeros if zero else nn.linear.default_kernel_init)


class TimeEmbedding(nn.Module):
    """t: [B] int -> [B, dim]: sinusoidal features of width ``dim // 4`` through an MLP."""
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        h = timestep_embedding(t, self.dim // 4)
        h = nn.Dense(self.dim, dtype=self.dtype)(h)
        return nn.Dense(self.dim, dtype=self.dtype)(nn.silu(h))


class ResBlock(nn.Module):
    """x: [B, H, W, Cin], temb: [B, D] -> [B, H, W, out_ch]; temb joins after the first conv."""
    out_ch: int
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        h = _conv(self.out_ch, self.dtype)(nn.silu(_norm(x.shape[-1], self.groups, self.dtype)(x)))
        h = h + nn.Dense(self.out_ch, dtype=self.dtype)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(_norm(self.out_ch, self.groups, self.dtype)(h))
        h = _conv(self.out_ch, self.dtype, zero=True)(h)
        if x.shape[-1] != self.out_ch:
            x = _conv(self.out_ch, self.dtype, kernel=1, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Global multi-head self-attention over the H*W positions.  x: [B, H, W, C] -> same shape."""
    num_heads: int = 1
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"attention: {c} channels not divisible by {self.num_heads} heads")
        h = _norm(c, self.groups, self.dtype)(x).reshape(b, hgt * wid, c)
        qkv = nn.DenseGeneral((3, self.num_heads, c // self.num_heads), dtype=self.dtype)(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]          # [B, HW, heads, d]
        h = nn.dot_product_attention(q, k, v, dtype=self.dtype)   # softmax over HW keys
        h = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype,
                            kernel_init=nn.initializers.zeros)(h)
        return x + h.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: [B, H, W, C] -> [B, H/2, W/2, C]."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(x.shape[-1], self.dtype, stride=2)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], self.dtype)(x)


def down_path(module: nn.Module, h: jax.Array, temb: jax.Array) -> tuple[jax.Array, list]:
    """The encoder half the UNet and the classifier share, called inside ``module``'s compact
    ``__call__`` (its blocks are ``module``'s submodules, named in creation order).

    module: a `UNet` or `NoiseAwareClassifier`; h: [B, H, W, ch] after the stem; temb: [B, 4 ch].
    Returns (h [B, H / 2^(L-1), W / 2^(L-1), ch * channel_mult[-1]], skips: every intermediate
    activation, for the UNet's up path).
    """
    g, dt = module.norm_groups, module.dtype
    skips = [h]
    for level, mult in enumerate(module.channel_mult):
        for _ in range(module.num_res_blocks):
            h = ResBlock(module.ch * mult, g, dt)(h, temb)
            if h.shape[1] in module.attention_resolutions:
                h = AttentionBlock(module.num_heads, g, dt)(h)
            skips.append(h)
        if level != len(module.channel_mult) - 1:
            h = Downsample(dt)(h)
            skips.append(h)
    return h, skips


class UNet(nn.Module):
    """Epsilon predictor ``eps_theta(x_t, t)``.

    Attributes:
      ch: width of the first level; level i has ``ch * channel_mult[i]`` channels.
      channel_mult: one multiplier per resolution level (each extra level halves H and W).
      num_res_blocks: ResBlocks per level on the way down (one more on the way up).
      attention_resolutions: spatial sizes (e.g. (8,)) that get self-attention; the middle block
        has attention whenever this is non-empty.
      num_heads, norm_groups: attention heads and the GroupNorm group cap.
      out_channels: output channels (default: the input's).
      num_labels: 0, or the number of class labels the model is conditioned on (``unet.class_cond``:
        `HEALTHY` and `DISEASED`): a label embedding joins the timestep embedding, and label 0
        (`NULL_LABEL`) adds nothing, so a conditional model also runs unconditioned.
      dtype: compute dtype (e.g. bfloat16 on accelerators); parameters and output are float32.
    """
    ch: int = 32
    channel_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: Sequence[int] = ()
    num_heads: int = 1
    norm_groups: int = 32
    out_channels: int | None = None
    num_labels: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, y=None):
        """x: [B, H, W, C] float32 in [-1, 1]; t: [B] int levels; y: [B] int labels in
        [0, num_labels] (None: `NULL_LABEL`; ignored without ``num_labels``)
        -> eps [B, H, W, C_out] float32."""
        chex.assert_rank(x, 4)
        chex.assert_shape(t, (x.shape[0],))
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"UNet: image size {x.shape[1:3]} must be divisible by {factor} "
                             f"({len(self.channel_mult)} resolution levels)")
        out_ch = self.out_channels or x.shape[-1]
        g, dt = self.norm_groups, self.dtype
        temb = TimeEmbedding(4 * self.ch, dtype=dt)(t)
        if self.num_labels and y is not None:
            chex.assert_shape(y, (x.shape[0],))
            label = nn.Embed(self.num_labels + 1, 4 * self.ch, name="label_embed")(y)
            temb = temb + jnp.where((y > NULL_LABEL)[:, None], label, 0.0).astype(temb.dtype)

        h, skips = down_path(self, _conv(self.ch, dt)(x.astype(dt)), temb)

        h = ResBlock(h.shape[-1], g, dt)(h, temb)
        if self.attention_resolutions:
            h = AttentionBlock(self.num_heads, g, dt)(h)
        h = ResBlock(h.shape[-1], g, dt)(h, temb)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = ResBlock(self.ch * mult, g, dt)(jnp.concatenate([h, skips.pop()], -1), temb)
                if h.shape[1] in self.attention_resolutions:
                    h = AttentionBlock(self.num_heads, g, dt)(h)
            if level != 0:
                h = Upsample(dt)(h)

        h = nn.silu(_norm(h.shape[-1], g, dt)(h))
        return _conv(out_ch, dt, zero=True)(h).astype(jnp.float32)


class NoiseAwareClassifier(nn.Module):
    """Timestep-conditioned multi-label classifier; attributes as `UNet`'s, plus ``num_classes``."""
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
        """x (noised): [B, H, W, C] float32 in [-1, 1]; t: [B] int -> [B, num_classes] float32."""
        chex.assert_rank(x, 4)
        chex.assert_shape(t, (x.shape[0],))
        g, dt = self.norm_groups, self.dtype
        temb = TimeEmbedding(4 * self.ch, dtype=dt)(t)
        h, _ = down_path(self, _conv(self.ch, dt)(x.astype(dt)), temb)
        h = ResBlock(h.shape[-1], g, dt)(h, temb)
        h = nn.silu(_norm(h.shape[-1], g, dt)(h))
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))              # [B, C_last]
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(h)
