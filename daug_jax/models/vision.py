"""The image tower: a ResNet on ``[x0, h_c1, h_c2, ...]`` stacked along the channel axis.

DAug feeds the encoder the X-ray plus one heatmap channel per translation target, so the only
architectural change from an ImageNet ResNet is the number of input channels of the stem.
With two targets that is three channels and a pretrained RGB stem fits as is; for any other
count `adapt_stem_kernel` converts a pretrained 3-channel stem.

    images [B, H, W, C] -> stem conv (+ pool) -> stages of residual blocks -> mean over H, W
      -> Dense(embed_dim) -> [B, embed_dim]      (L2 normalisation lives in the two-tower model)

Normalisation is "group" (GroupNorm; no batch statistics, so nothing but parameters to carry
under jit and data parallelism) or "batch" (BatchNorm with a ``batch_stats`` collection: apply
with ``train=True, mutable=["batch_stats"]`` to update the running averages, ``train=False`` to
use them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Architecture of the backbone (hashable, so it can be a Linen module field).

    block: "basic" (two 3x3 convs, ResNet-18/34) or "bottleneck" (1x1-3x3-1x1 with 4x
      expansion, ResNet-50+). widths: channels of each stage (the bottleneck's inner width).
    stem: ``stem_kernel`` x ``stem_kernel`` conv with stride ``stem_stride`` and an optional
      3x3/2 max pool; the ImageNet stem (7, 2, pool) divides the resolution by 4, too much for
      32-64 px inputs, which use a 3x3/1 stem instead.
    norm_groups: GroupNorm groups (reduced to gcd(groups, channels) for narrow layers).
    """
    block: str = "basic"
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_pool: bool = True
    norm_groups: int = 32

    def __post_init__(self):
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"unknown ResNet block {self.block!r}; valid: 'basic', 'bottleneck'")
        if len(self.stage_sizes) != len(self.widths) or not self.stage_sizes:
            raise ValueError(
                f"stage_sizes {self.stage_sizes} and widths {self.widths} must be non-empty "
                "and of equal length")


PRESETS: dict[str, ResNetConfig] = {
    # CPU size for 32-64 px: three stages at full, 1/2 and 1/4 resolution.
    "tiny": ResNetConfig(block="basic", stage_sizes=(1, 1, 1), widths=(16, 32, 64),
                         stem_width=16, stem_kernel=3, stem_stride=1, stem_pool=False,
                         norm_groups=8),
    "resnet18": ResNetConfig(block="basic", stage_sizes=(2, 2, 2, 2)),
    "resnet34": ResNetConfig(block="basic", stage_sizes=(3, 4, 6, 3)),
    "resnet50": ResNetConfig(block="bottleneck", stage_sizes=(3, 4, 6, 3)),
}


def resnet_config(preset: str = "tiny", **overrides: Any) -> ResNetConfig:
    """A preset (``tiny``, ``resnet18``, ``resnet34``, ``resnet50``) with fields replaced."""
    if preset not in PRESETS:
        raise ValueError(f"unknown ResNet preset {preset!r}; valid: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ResNetConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ResNet config fields {unknown}; valid: {sorted(fields)}")
    # Config files give lists; the dataclass must stay hashable.
    overrides = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items()}
    return dataclasses.replace(PRESETS[preset], **overrides)


def adapt_stem_kernel(kernel: Any, in_channels: int) -> np.ndarray:
    """Converts a pretrained RGB stem kernel to ``in_channels`` input channels.

    kernel: [kh, kw, 3, F] -> [kh, kw, in_channels, F] float32.
    Rule: for ``in_channels == 3`` the kernel is returned unchanged; otherwise every input
    channel gets the mean of the three RGB filters scaled by 3 / in_channels.  The sum over
    input channels is then the RGB sum, so an image whose channels are all equal (a grey
    X-ray repeated, or heatmaps equal to the image) gives exactly the pretrained stem
    activation: the pretrained statistics downstream still hold at initialisation.
    """
    kernel = np.asarray(kernel, np.float32)
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"stem kernel must be [kh, kw, 3, F], got shape {kernel.shape}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if in_channels == 3:
        return kernel
    mean = kernel.mean(axis=2, keepdims=True)
    return np.repeat(mean, in_channels, axis=2) * (3.0 / in_channels)


def _norm_factory(kind: str, groups: int, train: bool, dtype: Any) -> Callable[..., nn.Module]:
    """``norm(channels, zero_init=False, name=None)`` -> a GroupNorm or BatchNorm module."""
    if kind not in ("group", "batch"):
        raise ValueError(f"unknown normalisation {kind!r}; valid: 'group', 'batch'")

    def norm(channels: int, zero_init: bool = False, name: str | None = None) -> nn.Module:
        # Zero-initialised last scale of a block: each residual branch starts as identity,
        # which keeps deep stacks trainable from the first step.
        scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
        if kind == "batch":
            # No axis_name: under jit with a NamedSharding the global batch is one array, so
            # the batch mean is already over all devices (XLA inserts the all-reduce);
            # axis_name is only needed inside pmap/shard_map where each device sees a shard.
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                dtype=dtype, scale_init=scale_init, name=name)
        return nn.GroupNorm(num_groups=math.gcd(groups, channels), epsilon=1e-5, dtype=dtype,
                            scale_init=scale_init, name=name)
    return norm


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str | None = None) -> nn.Conv:
    # Symmetric padding k // 2 (not "SAME", which pads stride-2 convs asymmetrically) so that
    # torchvision-layout pretrained kernels see the same windows.
    return nn.Conv(features, (kernel, kernel), (stride, stride),
                   padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False, dtype=dtype,
                   kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                   name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convs; x: [B, H, W, Cin] -> [B, H/s, W/s, features]."""
    features: int
    strides: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = _conv(self.features, 3, self.strides, self.dtype, name="conv1")(x)
        y = nn.relu(self.norm(self.features, name="norm1")(y))
        y = _conv(self.features, 3, 1, self.dtype, name="conv2")(y)
        y = self.norm(self.features, zero_init=True, name="norm2")(y)
        if x.shape != y.shape:
            x = _conv(self.features, 1, self.strides, self.dtype, name="proj_conv")(x)
            x = self.norm(self.features, name="proj_norm")(x)
        return nn.relu(x + y)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (4x); x: [B, H, W, Cin] -> [B, H/s, W/s, 4 * features]."""
    features: int
    strides: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        out = 4 * self.features
        y = _conv(self.features, 1, 1, self.dtype, name="conv1")(x)
        y = nn.relu(self.norm(self.features, name="norm1")(y))
        y = _conv(self.features, 3, self.strides, self.dtype, name="conv2")(y)
        y = nn.relu(self.norm(self.features, name="norm2")(y))
        y = _conv(out, 1, 1, self.dtype, name="conv3")(y)
        y = self.norm(out, zero_init=True, name="norm3")(y)
        if x.shape != y.shape:
            x = _conv(out, 1, self.strides, self.dtype, name="proj_conv")(x)
            x = self.norm(out, name="proj_norm")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """x: [B, H, W, C] -> pooled features [B, F] (F = last width, x4 for bottleneck)."""
    config: ResNetConfig
    norm: str = "group"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        cfg = self.config
        norm = _norm_factory(self.norm, cfg.norm_groups, train, self.dtype)
        block = BasicBlock if cfg.block == "basic" else BottleneckBlock
        x = _conv(cfg.stem_width, cfg.stem_kernel, cfg.stem_stride, self.dtype, name="stem_conv")(x)
        x = nn.relu(norm(cfg.stem_width, name="stem_norm")(x))
        if cfg.stem_pool:
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, (depth, width) in enumerate(zip(cfg.stage_sizes, cfg.widths)):
            for j in range(depth):
                strides = 2 if i > 0 and j == 0 else 1
                x = block(width, strides, norm, self.dtype, name=f"stage{i + 1}_block{j + 1}")(x)
        return jnp.mean(x, axis=(1, 2))


class VisionTower(nn.Module):
    """Multi-channel ResNet + linear projection.

    images: [B, H, W, in_channels] float (channel 0 the X-ray in [0, 1], the rest heatmaps
    or copies of the image) -> [B, embed_dim] float32, not normalised.
    ``dtype`` is the compute dtype (e.g. bfloat16); parameters stay float32.
    """
    in_channels: int
    embed_dim: int
    resnet: ResNetConfig = PRESETS["tiny"]
    norm: str = "group"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        chex.assert_rank(images, 4)
        if images.shape[-1] != self.in_channels:
            raise ValueError(
                f"image tower expects {self.in_channels} input channels (1 image + "
                f"{self.in_channels - 1} extra), got {images.shape[-1]} "
                f"(input shape {tuple(images.shape)} as [B, H, W, C])")
        features = ResNet(self.resnet, self.norm, self.dtype, name="backbone")(
            images.astype(self.dtype), train=train)
        emb = nn.Dense(self.embed_dim, dtype=self.dtype, name="proj")(features)
        return emb.astype(jnp.float32)


def build_vision_tower(config: Any, embed_dim: int) -> VisionTower:
    """`VisionTower` from a config dict: ``{preset, in_channels, norm, dtype, resnet: {...}}``.

    ``resnet`` (optional) overrides fields of the preset, e.g. ``{"widths": (8, 16)}``.
    """
    cfg = dict(config)
    overrides = dict(cfg.get("resnet", None) or {})
    return VisionTower(
        in_channels=int(cfg["in_channels"]), embed_dim=int(embed_dim),
        resnet=resnet_config(cfg.get("preset", "tiny"), **overrides),
        norm=cfg.get("norm", "group"), dtype=jnp.dtype(cfg.get("dtype", "float32")))

