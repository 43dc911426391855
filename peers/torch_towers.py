"""PyTorch peer of daug-jax's two-tower train step, layer for layer as `daug_jax.models.vision`,
`text`, `two_tower`, `daug_jax.losses` and `daug_jax.train.make_optimizer` build it.

    image [B, C, H, W]          -> ResNet -> mean over H, W -> Linear -> l2-normalise  [B, D]
    report tokens [B, L]        -> BERT -> masked mean (or [CLS]) -> Linear -> l2      [B, D]
    class-prompt tokens [K, L]  -> the same BERT                                       [K, D]
    loss = w * CLIP(image, report) + (1 - w) * masked sigmoid BCE(image, class prompts)

then global-norm clipping and AdamW (weight decay on ndim > 1 parameters only) with the warm-up
cosine schedule.  Only shapes have to match the Flax model, not initial values: the benchmark
checks the port by its parameter count (equal to the Flax model's) and its matmul + convolution
FLOPs (within a few per cent of those of the JAX program).  Supported: ``model.vision.kind``
"resnet" with ``channels`` "stack", ``model.text.kind`` "bert", float32 compute; anything else
raises ValueError.  ``config`` is the towers config of ``experiments/towers.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from daug_jax.models.two_tower import TwoTower as FlaxTwoTower, text_shape
from daug_jax.models.vision import ResNetConfig, resnet_config
from peers import PeerStep


# ----------------------------------------------------------------------------- image tower
def _out(size: tuple[int, int], kernel: int, stride: int) -> tuple[int, int]:
    """Spatial size after a conv (or pool) with symmetric padding kernel // 2."""
    return tuple((s + 2 * (kernel // 2) - kernel) // stride + 1 for s in size)


def _conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Conv2d:
    # Flax's convs pad kernel // 2 on both sides (not "SAME"), without bias.
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)


def _norm(kind: str, groups: int, channels: int) -> nn.Module:
    if kind == "batch":  # Flax momentum 0.9 on the old average = PyTorch momentum 0.1
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
    if kind == "group":  # Flax reduces the groups to gcd(groups, channels) for narrow layers
        return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-5)
    raise ValueError(f"unknown model.vision.norm {kind!r}; valid: 'group', 'batch'")


class Block(nn.Module):
    """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 x4) block: [B, Cin, H, W] -> [B, out, H/s, W/s]

    size: the input's (H, W); the shortcut is projected exactly when Flax's ``x.shape != y.shape``.
    """

    def __init__(self, cfg: ResNetConfig, norm: str, cin: int, width: int, stride: int,
                 size: tuple[int, int]):
        super().__init__()
        if cfg.block == "basic":
            self.out, shapes = width, [(cin, width, 3, stride), (width, width, 3, 1)]
        else:
            self.out = 4 * width
            shapes = [(cin, width, 1, 1), (width, width, 3, stride), (width, self.out, 1, 1)]
        self.convs = nn.ModuleList(_conv(*s) for s in shapes)
        self.norms = nn.ModuleList(_norm(norm, cfg.norm_groups, s[1]) for s in shapes)
        nn.init.zeros_(self.norms[-1].weight)  # each residual branch starts as identity
        self.size = _out(size, 3, stride)
        self.proj = None
        if cin != self.out or self.size != tuple(size):
            self.proj = nn.Sequential(_conv(cin, self.out, 1, stride),
                                      _norm(norm, cfg.norm_groups, self.out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            y = norm(conv(y))
            y = F.relu(y) if i < len(self.convs) - 1 else y
        return F.relu((x if self.proj is None else self.proj(x)) + y)


class VisionTower(nn.Module):
    """ResNet + Linear: images [B, in_channels, H, W] -> [B, embed_dim] (not normalised)."""

    def __init__(self, cfg: ResNetConfig, norm: str, in_channels: int, embed_dim: int,
                 size: tuple[int, int]):
        super().__init__()
        stem = [_conv(in_channels, cfg.stem_width, cfg.stem_kernel, cfg.stem_stride),
                _norm(norm, cfg.norm_groups, cfg.stem_width), nn.ReLU()]
        size = _out(size, cfg.stem_kernel, cfg.stem_stride)
        if cfg.stem_pool:  # Flax pads the 3x3/2 max pool by 1 with -inf, as PyTorch does
            stem.append(nn.MaxPool2d(3, 2, padding=1))
            size = _out(size, 3, 2)
        blocks, width = [], cfg.stem_width
        for i, (depth, features) in enumerate(zip(cfg.stage_sizes, cfg.widths)):
            for j in range(depth):
                blocks.append(Block(cfg, norm, width, features, 2 if i > 0 and j == 0 else 1, size))
                width, size = blocks[-1].out, blocks[-1].size
        self.backbone = nn.Sequential(*stem, *blocks)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(images).mean((2, 3)))


# ----------------------------------------------------------------------------- text tower
class BertLayer(nn.Module):
    """Post-LayerNorm BERT layer: x [B, L, H], keep [B, 1, 1, L] bool -> [B, L, H]."""

    def __init__(self, cfg: Any):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.heads = cfg.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(h, h) for _ in range(3))
        self.attention_output = nn.Linear(h, h)
        self.attention_norm, self.output_norm = nn.LayerNorm(h, eps=eps), nn.LayerNorm(h, eps=eps)
        self.intermediate = nn.Linear(h, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, h)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.attention_dropout = nn.Dropout(cfg.attention_probs_dropout_prob)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, length, h = x.shape
        q, k, v = (lin(x).view(b, length, self.heads, -1).transpose(1, 2)    # [B, n, L, d]
                   for lin in (self.query, self.key, self.value))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])              # [B, n, L, L]
        # The most negative float (not -inf) on padded keys, as the Flax layer does.
        logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        probs = self.attention_dropout(logits.softmax(-1))
        context = (probs @ v).transpose(1, 2).reshape(b, length, h)
        x = self.attention_norm(x + self.dropout(self.attention_output(context)))
        ffn = F.gelu(self.intermediate(x))  # exact (erf) GELU, as jax.nn.gelu(approximate=False)
        return self.output_norm(x + self.dropout(self.output(ffn)))


class TextTower(nn.Module):
    """BERT + pooling + Linear: ids, mask [N, L] int -> [N, embed_dim] (not normalised)."""

    def __init__(self, cfg: Any, embed_dim: int, pooling: str):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"unknown model.text.pooling {pooling!r} (expected 'cls' or 'mean')")
        h, self.pooling = cfg.hidden_size, pooling
        self.word = nn.Embedding(cfg.vocab_size, h)
        self.position = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type = nn.Embedding(cfg.type_vocab_size, h)  # only type 0 is read
        self.norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.proj = nn.Linear(h, embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        # Rows 0..L-1 of the position table and row 0 of the type table: the gathers of the
        # Flax embeddings with arange(L) and zeros, without index tensors.
        x = self.word(ids) + self.position.weight[:length] + self.token_type.weight[0]
        x = self.dropout(self.norm(x))
        keep = (mask > 0)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, keep)
        if self.pooling == "cls":
            return self.proj(x[:, 0])
        weights = mask.to(x.dtype)[..., None]                                  # [N, L, 1]
        return self.proj((x * weights).sum(1) / weights.sum(1).clamp(min=1.0))


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps * eps)


class TwoTower(nn.Module):
    """Both towers and the three learned scalars, initialised as `two_tower.TwoTower`."""

    def __init__(self, vision: VisionTower, text: TextTower, logit_scale_init: float):
        super().__init__()
        self.image_tower, self.text_tower = vision, text
        scalar = lambda v: nn.Parameter(torch.tensor(float(v)))  # noqa: E731  (0-d: not decayed)
        self.log_logit_scale = scalar(logit_scale_init)
        self.log_class_scale = scalar(FlaxTwoTower.class_scale_init)
        self.class_bias = scalar(FlaxTwoTower.class_bias_init)

    def forward(self, images, ids, mask, class_ids, class_mask) -> dict[str, torch.Tensor]:
        # The value is capped at log 100, not the parameter (`TwoTower.scalars`).
        cap = math.log(FlaxTwoTower.max_logit_scale)
        return {"image_emb": l2_normalize(self.image_tower(images)),
                "text_emb": l2_normalize(self.text_tower(ids, mask)),
                "class_emb": l2_normalize(self.text_tower(class_ids, class_mask)),
                "logit_scale": self.log_logit_scale.clamp(max=cap).exp(),
                "class_scale": self.log_class_scale.exp(), "class_bias": self.class_bias}


# ----------------------------------------------------------------------------- loss and step
def hybrid_loss(out: dict, labels: torch.Tensor, mask: torch.Tensor, clip_weight: float,
                prompts: str) -> torch.Tensor:
    """`losses.hybrid_contrastive_loss`; labels, mask [B, C]; class_emb [C, D] or [2C, D]."""
    u, v, w = out["image_emb"], out["text_emb"], out["class_emb"]
    logits = out["logit_scale"] * u @ v.T                                      # [B, B]
    targets = torch.arange(u.shape[0])
    image_text = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    cos = u @ w.T                                                              # [B, K]
    if prompts == "single":
        z = out["class_scale"] * cos + out["class_bias"]
    else:  # paired: rows [absent .. present]; the bias cancels in the pair's softmax
        c = w.shape[0] // 2
        z = out["class_scale"] * (cos[:, c:] - cos[:, :c])
    counted = mask > 0  # masked labels (possibly NaN) touch neither value nor gradient
    per = F.binary_cross_entropy_with_logits(z, torch.where(counted, labels, 0.0), reduction="none")
    image_class = torch.where(counted, per * mask, 0.0).sum() / mask.sum().clamp(min=1.0)
    return clip_weight * image_text + (1.0 - clip_weight) * image_class


def _lr_factor(train: Any):
    """optax.warmup_cosine_decay_schedule(0, lr, warmup, max(steps, warmup + 1)) / lr."""
    warmup = int(train.warmup)
    cosine = max(int(train.steps), warmup + 1) - warmup

    def factor(n: int) -> float:
        if n < warmup:
            return n / warmup
        return 0.5 * (1 + math.cos(math.pi * min(n - warmup, cosine) / cosine))
    return factor


def _check(config: Any) -> None:
    vision, text = config.model.vision, config.model.text
    for key, value, valid in (("model.vision.kind", vision.get("kind", "resnet"), "resnet"),
                              ("model.vision.channels", vision.get("channels", "stack"), "stack"),
                              ("model.text.kind", text.get("kind", "bert"), "bert"),
                              ("model.vision.dtype", vision.get("dtype", "float32"), "float32"),
                              ("model.text.dtype", text.get("dtype", "float32"), "float32")):
        if value != valid:
            raise ValueError(f"the torch towers peer supports {key}={valid!r} only, got {value!r}")


def towers_step(config: Any, arrays: dict[str, np.ndarray],
                class_tokens: tuple[np.ndarray, np.ndarray], vocab_size: int) -> PeerStep:
    """One two-tower train step on the fixed batch ``arrays``, as `train.make_train_step` runs it.

    arrays: image [B, H, W, C] float32 (NHWC), input_ids / attention_mask [B, L] int32,
    labels / label_mask [B, C'] float32; class_tokens: (ids, mask) [K, L] int32 of the class
    prompts; vocab_size: ``len(tokenizer)``.  ``call()`` returns the step's loss (before the
    update).
    """
    _check(config)
    vcfg, tcfg, train = config.model.vision, config.model.text, config.train
    prompts = config.model.get("prompts", "single")
    image = torch.as_tensor(np.ascontiguousarray(np.moveaxis(arrays["image"], -1, 1)),
                            dtype=torch.float32)                               # [B, C, H, W]
    if image.shape[1] != int(vcfg.in_channels):
        raise ValueError(f"image tower expects {vcfg.in_channels} channels, got {image.shape[1]}")
    ids, mask, class_ids, class_mask = (torch.tensor(np.asarray(a), dtype=torch.long) for a in (
        arrays["input_ids"], arrays["attention_mask"], *class_tokens))
    labels, label_mask = (torch.as_tensor(np.asarray(arrays[k], np.float32))
                          for k in ("labels", "label_mask"))
    bert = text_shape(tcfg, vocab_size)
    if max(ids.shape[1], class_ids.shape[1]) > bert.max_position_embeddings:
        raise ValueError(f"sequence length exceeds max_position_embeddings "
                         f"{bert.max_position_embeddings}")
    resnet = resnet_config(vcfg.get("preset", "tiny"), **dict(vcfg.get("resnet", None) or {}))
    embed_dim, norm = int(config.model.embed_dim), vcfg.get("norm", "group")
    model = TwoTower(
        VisionTower(resnet, norm, int(vcfg.in_channels), embed_dim, tuple(image.shape[2:])),
        TextTower(bert, embed_dim, tcfg.get("pooling", "cls")),
        float(config.model.get("logit_scale_init", math.log(1 / 0.07)))).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim > 1], "weight_decay": float(train.weight_decay)},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
        lr=float(train.lr), betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(train))
    clip_weight, grad_clip = float(train.clip_weight), float(train.get("grad_clip", 1.0))
    fixed_scale = not train.get("learn_logit_scale", True)

    def backward() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        out = model(image, ids, mask, class_ids, class_mask)
        loss = hybrid_loss(out, labels, label_mask, clip_weight, prompts)
        loss.backward()
        return loss

    def call() -> float:
        loss = backward()
        if fixed_scale:  # zeroed before clipping: it neither moves nor shares the clipped norm
            model.log_logit_scale.grad.zero_()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        return float(loss.item())

    with FlopCounterMode(display=False) as counter:  # forward + backward, not the optimizer
        backward()
    opt.zero_grad(set_to_none=True)
    name = (f"torch port of daug-jax ResNet-{vcfg.get('preset', 'tiny')} "
            f"(widths {tuple(resnet.widths)}, {norm} norm) + BERT ({bert.num_hidden_layers} x "
            f"{bert.hidden_size}), {prompts} prompts")
    return PeerStep(call, float(counter.get_total_flops()),
                    sum(p.numel() for p in params if p.requires_grad), name)
