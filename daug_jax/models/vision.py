"""The image tower: a ResNet on ``[x0, h_c1, h_c2, ...]``, and how a tower reads those channels.

DAug adds one heatmap channel per translation target: only the stem's input channels change.

    images [B, H, W, C] -> stem conv (+ pool) -> stages of residual blocks -> mean over H, W
      -> Dense(embed_dim) -> [B, embed_dim]      (L2 normalisation lives in the two-tower model)

Normalisation: "group" (GroupNorm, parameters only) or "batch" (BatchNorm: ``train=True,
mutable=["batch_stats"]`` updates the running averages, ``train=False`` uses them).

``model.vision.channels``: how a ResNet or CLIP ViT (`ChannelModes`) reads the input, always
``[x0, h_1 .. h_K]`` (in_channels = 1 + K; with ``fill = "repeat"`` every h_k is the film):

    "stack"    one tower on all 1 + K channels (a pretrained stem adapted by `adapt_stem_kernel`)
    "replace"  the authors' "channel" mode: one tower on [h_1, x0, x0], the film x 3 with channel
               0 replaced by the ONE heatmap (K = 1); the pretrained stem is used unchanged
    "add"      the authors' "add" mode: a tower on [x0, x0, x0] and a second of the same kind
               (and checkpoint) on [h_1 .. h_K] (stem adapted to K), embeddings averaged
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
    """Architecture of the backbone (hashable, so it can be a Linen module field): ``block``
    "basic" (ResNet-18/34) or "bottleneck" (ResNet-50+, see `Block`), ``widths`` per stage (the
    bottleneck's inner width), the stem conv and optional 3x3/2 max pool (the ImageNet stem's
    /4 is too much for 32-64 px), GroupNorm groups (capped at gcd(groups, channels)).
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
            raise ValueError(f"stage_sizes {self.stage_sizes} and widths {self.widths} must be "
                             "non-empty and of equal length")


PRESETS: dict[str, ResNetConfig] = {
    # CPU size for 32-64 px: three stages at full, 1/2 and 1/4 resolution.
    "tiny": ResNetConfig(block="basic", stage_sizes=(1, 1, 1), widths=(16, 32, 64), stem_width=16,
                         stem_kernel=3, stem_stride=1, stem_pool=False, norm_groups=8),
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
    """Converts a pretrained RGB stem kernel: [kh, kw, 3, F] -> [kh, kw, in_channels, F] float32.

    Unchanged for 3 channels; otherwise every channel gets the mean RGB filter x 3 / in_channels,
    so an image with all channels equal gives exactly the pretrained stem activation.
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
        # Zero last scale of a block: each residual branch starts as identity (deep stacks train).
        scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
        if kind == "batch":
            # No axis_name: under jit the global batch is one array, its mean over all devices.
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                dtype=dtype, scale_init=scale_init, name=name)
        return nn.GroupNorm(num_groups=math.gcd(groups, channels), epsilon=1e-5, dtype=dtype,
                            scale_init=scale_init, name=name)
    return norm


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str | None = None) -> nn.Conv:
    # Padding k // 2 on both sides as torchvision ("SAME" pads stride-2 convs asymmetrically).
    return nn.Conv(features, (kernel, kernel), (stride, stride),
                   padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False, dtype=dtype,
                   kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                   name=name)


class Block(nn.Module):
    """A residual block, x: [B, H, W, Cin] -> [B, H/s, W/s, C]: "basic" (3x3 (stride), 3x3;
    C = features) or "bottleneck" (1x1, 3x3 (stride), 1x1; C = 4 * features)."""
    kind: str
    features: int
    strides: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        f, s = self.features, self.strides
        if self.kind == "basic":  # (features, kernel, stride) of each conv
            convs = [(f, 3, s), (f, 3, 1)]
        else:
            convs = [(f, 1, 1), (f, 3, s), (4 * f, 1, 1)]
        y = x
        for i, (features, kernel, stride) in enumerate(convs, 1):
            y = _conv(features, kernel, stride, self.dtype, name=f"conv{i}")(y)
            y = self.norm(features, zero_init=i == len(convs), name=f"norm{i}")(y)
            y = nn.relu(y) if i < len(convs) else y
        if x.shape != y.shape:
            x = _conv(y.shape[-1], 1, s, self.dtype, name="proj_conv")(x)
            x = self.norm(y.shape[-1], name="proj_norm")(x)
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
        x = _conv(cfg.stem_width, cfg.stem_kernel, cfg.stem_stride, self.dtype, name="stem_conv")(x)
        x = nn.relu(norm(cfg.stem_width, name="stem_norm")(x))
        if cfg.stem_pool:
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, (depth, width) in enumerate(zip(cfg.stage_sizes, cfg.widths)):
            for j in range(depth):
                strides = 2 if i > 0 and j == 0 else 1
                x = Block(cfg.block, width, strides, norm, self.dtype,
                          name=f"stage{i + 1}_block{j + 1}")(x)
        return jnp.mean(x, axis=(1, 2))


class VisionTower(nn.Module):
    """ResNet + linear projection: images [B, H, W, in_channels] float (channel 0 the X-ray in
    [0, 1]) -> [B, embed_dim] float32, not normalised; parameters float32 whatever ``dtype``."""
    in_channels: int
    embed_dim: int
    resnet: ResNetConfig = PRESETS["tiny"]
    norm: str = "group"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        chex.assert_rank(images, 4)
        if images.shape[-1] != self.in_channels:
            raise ValueError(f"image tower expects {self.in_channels} input channels (1 image + "
                             f"{self.in_channels - 1} extra), got {images.shape[-1]} "
                             f"(input shape {tuple(images.shape)} as [B, H, W, C])")
        features = ResNet(self.resnet, self.norm, self.dtype, name="backbone")(
            images.astype(self.dtype), train=train)
        emb = nn.Dense(self.embed_dim, dtype=self.dtype, name="proj")(features)
        return emb.astype(jnp.float32)


# ----------------------------------------------------------------------------- channel modes
CHANNELS = ("stack", "replace", "add")  # model.vision.channels (see the module docstring)


def check_channels(channels: str, in_channels: int) -> None:
    """ValueError unless ``model.vision.channels`` fits ``in_channels`` = 1 image + K heatmaps."""
    if channels not in CHANNELS:
        raise ValueError(f"unknown model.vision.channels {channels!r}; "
                         f"valid: {', '.join(CHANNELS)}")
    if channels == "replace" and in_channels != 2:
        raise ValueError(f"model.vision.channels is 'replace': ONE heatmap replaces channel 0 of "
                         f"the film, so model.vision.in_channels must be 2, got {in_channels} "
                         f"(1 image + {in_channels - 1} heatmap targets)")
    if channels == "add" and in_channels < 2:
        raise ValueError("model.vision.channels is 'add': the second tower reads the heatmaps, "
                         f"so model.vision.in_channels must be >= 2, got {in_channels}")


class ChannelModes(nn.Module):
    """images [B, H, W, in_channels] (``[x0, h_1 .. h_K]``) -> [B, D] float32 per ``channels``
    ("replace" or "add"; "stack" needs no wrapper).  make_tower(in_channels, name): a module
    ``(images [B, H, W, in_channels], train) -> [B, D]``."""
    make_tower: Callable[[int, str], nn.Module]
    in_channels: int
    channels: str

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        chex.assert_rank(images, 4)
        if images.shape[-1] != self.in_channels:
            raise ValueError(f"image tower expects {self.in_channels} input channels (1 image + "
                             f"{self.in_channels - 1} heatmaps), got {images.shape[-1]}")
        film, maps = images[..., :1], images[..., 1:]
        if self.channels == "replace":
            return self.make_tower(3, "tower")(jnp.concatenate([maps, film, film], -1),
                                               train=train)
        emb = self.make_tower(3, "image")(jnp.repeat(film, 3, axis=-1), train=train)
        emb_maps = self.make_tower(self.in_channels - 1, "heatmap")(maps, train=train)
        return (emb + emb_maps) / 2
