"""PyTorch peer of daug-jax's diffusion side: the epsilon-UNet and noise-aware classifier train
steps and one guided-DDIM heatmap translation, layer for layer as `daug_jax.diffusion.unet` /
`classifier` and `daug_jax.heatmaps` build them.

A compact port (NCHW, the layout PyTorch users write), not `diffusers.UNet2DModel`: diffusers'
blocks differ from ours (two convolutions per down sample, scale-shift norms, attention heads by
channel count), so matching FLOPs would mean configuring around its defaults rather than reading
one file.  The benchmark checks the port: the same parameter count as the Flax model, and
matmul + convolution FLOPs within a few per cent of those of the JAX program.

    x [B, C, H, W] in [-1, 1], t [B] int64  ->  eps [B, C, H, W]          (UNet)
                                            ->  logits [B, num_classes]   (classifier)

Every step runs on fixed inputs; random levels and noise are drawn inside the step as the JAX
step does.  ``config`` is the diffusion config of ``experiments/diffusion.py``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from daug_jax.diffusion.unet import _groups
from peers import PeerStep

EPS = 1e-6  # Flax GroupNorm's epsilon (PyTorch's default is 1e-5)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels, groups), channels, eps=EPS)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], -1), (0, dim % 2))


class TimeEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.fc1, self.fc2 = nn.Linear(dim // 4, dim), nn.Linear(dim, dim)

    def forward(self, t):
        return self.fc2(F.silu(self.fc1(timestep_embedding(t, self.dim // 4))))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch, groups), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads, self.norm = heads, _norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = _zero(nn.Linear(channels, channels))

    def forward(self, x):
        b, c, hgt, wid = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)                          # [B, HW, C]
        q, k, v = self.qkv(h).view(b, hgt * wid, 3, self.heads, c // self.heads).unbind(2)
        h = F.scaled_dot_product_attention(*(a.transpose(1, 2) for a in (q, k, v)))
        h = self.out(h.transpose(1, 2).reshape(b, hgt * wid, c))
        return x + h.transpose(1, 2).reshape(b, c, hgt, wid)


class _Path(nn.Module):
    """The down path shared by the UNet and the classifier (stem, ResBlocks, attention at
    ``attention_resolutions``, stride-2 convs); ``forward`` returns the last activation, every
    skip and the timestep embedding."""

    def __init__(self, cfg: Any, in_ch: int, size: int):
        super().__init__()
        ch, g, heads = int(cfg.ch), int(cfg.norm_groups), int(cfg.num_heads)
        self.temb = TimeEmbedding(4 * ch)
        self.stem = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.blocks, self.widths, width, res = nn.ModuleList(), [ch], ch, size
        mults = tuple(cfg.channel_mult)
        for level, mult in enumerate(mults):
            for _ in range(int(cfg.num_res_blocks)):
                self.blocks.append(ResBlock(width, ch * mult, 4 * ch, g))
                width = ch * mult
                if res in tuple(cfg.attention_resolutions):
                    self.blocks.append(AttentionBlock(width, heads, g))
                self.widths.append(width)
            if level != len(mults) - 1:
                self.blocks.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                self.widths.append(width)
                res //= 2
        self.width, self.res = width, res

    def forward(self, x, t):
        temb = self.temb(t)
        h = self.stem(x)
        skips = [h]
        for block in self.blocks:
            if isinstance(block, ResBlock):
                h = block(h, temb)
                skips.append(h)
            elif isinstance(block, AttentionBlock):
                h = skips[-1] = block(h)   # the skip is the attended activation
            else:
                h = block(h)
                skips.append(h)
        return h, skips, temb


class UNet(nn.Module):
    def __init__(self, cfg: Any, in_ch: int, size: int):
        super().__init__()
        self.down = _Path(cfg, in_ch, size)
        ch, g, heads = int(cfg.ch), int(cfg.norm_groups), int(cfg.num_heads)
        width, widths, res = self.down.width, list(self.down.widths), self.down.res
        attend = tuple(cfg.attention_resolutions)
        self.mid = nn.ModuleList([ResBlock(width, width, 4 * ch, g),
                                  AttentionBlock(width, heads, g) if attend else nn.Identity(),
                                  ResBlock(width, width, 4 * ch, g)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(int(cfg.num_res_blocks) + 1):
                self.up.append(ResBlock(width + widths.pop(), ch * mult, 4 * ch, g))
                width = ch * mult
                if res in attend:
                    self.up.append(AttentionBlock(width, heads, g))
            if level != 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(width, width, 3, padding=1))
                res *= 2
        self.out_norm = _norm(width, g)
        self.out = _zero(nn.Conv2d(width, in_ch, 3, padding=1))

    def forward(self, x, t):
        h, skips, temb = self.down(x, t)
        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], 1), temb) if isinstance(block, ResBlock) else block(h)
        return self.out(F.silu(self.out_norm(h))).float()


class Classifier(nn.Module):
    def __init__(self, cfg: Any, in_ch: int, size: int, num_classes: int):
        super().__init__()
        self.down = _Path(cfg, in_ch, size)
        width, g = self.down.width, int(cfg.norm_groups)
        self.mid = ResBlock(width, width, 4 * int(cfg.ch), g)
        self.norm, self.head = _norm(width, g), nn.Linear(width, num_classes)

    def forward(self, x, t):
        h, _, temb = self.down(x, t)
        h = F.silu(self.norm(self.mid(h, temb)))
        return self.head(h.float().mean((2, 3)))


# ----------------------------------------------------------------------------- steps
def _autocast(cfg: Any, device: str):
    if str(cfg.dtype) == "bfloat16":
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer(model: nn.Module, tcfg: Any) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW after global-norm clipping, linear warm-up then constant (`diffusion.train`)."""
    opt = torch.optim.AdamW(model.parameters(), lr=float(tcfg.learning_rate),
                            weight_decay=float(tcfg.weight_decay), eps=1e-8)
    warmup = max(1, int(tcfg.warmup_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: min(1.0, n / warmup))
    return opt, sched


def _count(fn) -> float:
    """Matmul and convolution FLOPs of ``fn()`` (forward and backward), by PyTorch's counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _nchw(images: np.ndarray, device: str) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(np.moveaxis(images, -1, 1)), device=device)


def _train_step(model, cfg, tcfg, device, loss_of) -> tuple:
    """(step, loss_and_backward): one optimizer step on ``loss_of(model)``, as the JAX steps do:
    gradients clipped to a global norm, AdamW, the schedule advanced."""
    opt, sched = _optimizer(model, tcfg)

    def backward():
        opt.zero_grad(set_to_none=True)
        with _autocast(cfg, device):
            loss = loss_of(model)
        loss.backward()
        return loss

    def step() -> float:
        loss = backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg.grad_clip))
        opt.step()
        sched.step()
        return loss

    return step, backward


def unet_step(config: Any, images: np.ndarray, device: str = "cpu") -> PeerStep:
    """The epsilon-MSE train step with EMA.  images: [B, H, W, C] float32 in [0, 1]."""
    b, size, _, c = images.shape
    model = UNet(config.unet, c, size).to(device)
    ema = [p.detach().clone() for p in model.parameters()]
    x0 = _nchw(images, device) * 2 - 1
    alpha_bar = torch.as_tensor(_alpha_bar(config), dtype=torch.float32, device=device)
    decay = float(config.unet_train.ema_decay)

    def loss_of(net):
        t = torch.randint(0, alpha_bar.shape[0], (b,), device=device)
        noise = torch.randn_like(x0)
        ab = alpha_bar[t][:, None, None, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        return F.mse_loss(net(x_t, t), noise)

    step, backward = _train_step(model, config.unet, config.unet_train, device, loss_of)
    counter = {"n": 0}

    def call() -> float:
        loss = step()
        n = counter["n"]
        counter["n"] += 1
        d = min(decay, (1.0 + n) / (10.0 + n))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1.0 - d)
        return float(loss.item())

    return PeerStep(call, _count(backward), _params(model),
                    f"torch port of the epsilon-UNet ({_describe(config.unet)})")


def classifier_step(config: Any, images: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                    device: str = "cpu") -> PeerStep:
    """The masked-BCE step of the noise-aware classifier; labels, mask: [B, K] float32."""
    b, size, _, c = images.shape
    model = Classifier(config.classifier, c, size, labels.shape[1]).to(device)
    x0 = _nchw(images, device) * 2 - 1
    y, m = (torch.as_tensor(a, device=device) for a in (labels, mask))
    alpha_bar = torch.as_tensor(_alpha_bar(config), dtype=torch.float32, device=device)
    top = config.classifier.max_level
    top = alpha_bar.shape[0] - 1 if top is None else int(top)

    def loss_of(net):
        t = torch.randint(0, top + 1, (b,), device=device)
        ab = alpha_bar[t][:, None, None, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn_like(x0)
        per = F.binary_cross_entropy_with_logits(net(x_t, t).float(), y, reduction="none")
        return (per * m).sum() / m.sum().clamp(min=1)

    step, backward = _train_step(model, config.classifier, config.classifier_train, device,
                                 loss_of)
    return PeerStep(lambda: float(step().item()), _count(backward), _params(model),
                    f"torch port of the noise-aware classifier ({_describe(config.classifier)})")


def translation(config: Any, images: np.ndarray, num_classes: int, index: Sequence[int],
                direction: Sequence[float], grid: np.ndarray, scale: float,
                smooth: np.ndarray | None, device: str = "cpu") -> PeerStep:
    """One heatmap translation: DDIM encode along ``grid``, one guided decode per target with the
    classifier gradient from autograd, |x_c - x0| smoothed.  The K targets share each network
    call (the batch is K x B), as the vmapped JAX program does.

    images: [B, H, W, C] in [-1, 1]; num_classes: the classifier's; index, direction: [K]; grid: [S + 1] levels (`ddim_grid`);
    smooth: [H, H] blur matrix (`heatmaps.blur_matrix`) or None.
    """
    b, size, _, c = images.shape
    k = len(index)
    unet = UNet(config.unet, c, size).to(device).eval()
    clf = Classifier(config.classifier, c, size, num_classes).to(device).eval()
    for p in (*unet.parameters(), *clf.parameters()):
        p.requires_grad_(False)
    x0 = _nchw(images, device)
    ab = torch.as_tensor(_alpha_bar(config)[np.asarray(grid)], dtype=torch.float32, device=device)
    levels = [int(t) for t in grid]
    rows = torch.arange(k * b, device=device)
    idx = torch.as_tensor(np.repeat(index, b), device=device)
    sign = torch.as_tensor(np.repeat(direction, b), dtype=torch.float32, device=device)
    blur = None if smooth is None else torch.as_tensor(smooth, dtype=torch.float32, device=device)

    def ddim(x, eps, a_from, a_to):
        return a_to.sqrt() * (x - (1 - a_from).sqrt() * eps) / a_from.sqrt() + (1 - a_to).sqrt() * eps

    def run() -> torch.Tensor:
        with _autocast(config.unet, device):
            x = x0
            with torch.no_grad():
                for s in range(len(levels) - 1):
                    t = torch.full((b,), levels[s], device=device)
                    x = ddim(x, unet(x, t), ab[s], ab[s + 1])
            x = x.repeat(k, 1, 1, 1)
            for s in range(len(levels) - 1, 0, -1):
                t = torch.full((k * b,), levels[s], device=device)
                with torch.enable_grad():
                    xg = x.detach().requires_grad_(True)
                    logit = clf(xg, t).float()[rows, idx]
                    # backward(), not autograd.grad(): the FLOP counter's hooks reject the latter.
                    F.logsigmoid(sign * logit).sum().backward()
                    grad = xg.grad
                with torch.no_grad():
                    eps = unet(x, t) - scale * (1 - ab[s]).sqrt() * grad
                    x = ddim(x, eps, ab[s], ab[s - 1])
            heat = (x.float() - x0.float().repeat(k, 1, 1, 1)).abs().mean(1)   # [K*B, H, W]
            if blur is not None:
                heat = blur @ heat @ blur.T
            return heat

    return PeerStep(lambda: float(run().sum().item()), _count(run),
                    _params(unet) + _params(clf),
                    f"torch guided-DDIM translation ({len(levels) - 1} moves each way, {k} targets)")


def _alpha_bar(config: Any) -> np.ndarray:
    from daug_jax.diffusion.schedule import alphas_cumprod

    return np.asarray(alphas_cumprod(config.diffusion.schedule, config.diffusion.num_steps))


def _describe(cfg: Any) -> str:
    return (f"ch {cfg.ch} x {tuple(cfg.channel_mult)}, {cfg.num_res_blocks} ResBlock/level, "
            f"attention at {tuple(cfg.attention_resolutions)}, {cfg.dtype}")
