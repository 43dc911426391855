"""Which network each tower is, how the image tower reads the heatmap channels, and the
pretrained weights the towers start from.

``model.vision.kind``: "resnet" (`vision.VisionTower`, trained from scratch) or "clip"
(`clip.ClipVisionModel` from the Hugging Face directory ``model.vision.path``, pixels normalised
inside the tower with the checkpoint's mean/std).  ``model.text.kind``: "bert" (`text.TextTower`,
from scratch or from ``model.text.path``) or "clip" (`clip.ClipTextModel` from
``model.text.path``).  CLIP towers keep the checkpoint's projection, so ``model.embed_dim`` must
be its ``projection_dim``.

``model.vision.channels``: the tower input is always ``[x0, h_1 .. h_K]``, in_channels = 1 + K
(`two_tower.assemble_images`); with ``fill = "repeat"`` every h_k is the film itself, so the
baseline of each mode puts the film where the heatmap would go.

    "stack"    one tower on all 1 + K channels; a pretrained 3-channel stem / patch kernel is
               adapted to 1 + K channels by `vision.adapt_stem_kernel` (every channel gets the
               mean RGB filter x 3 / (1 + K))
    "replace"  the authors' "channel" mode: one tower on [h_1, x0, x0], the film in three
               channels with channel 0 replaced by the ONE heatmap (K = 1); the pretrained
               3-channel stem is used unchanged
    "add"      the authors' "add" mode: a tower on [x0, x0, x0] and a second tower of the same
               kind (and checkpoint) on [h_1 .. h_K] (stem adapted to K), embeddings averaged
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax.linen as nn
import jax.numpy as jnp

from daug_jax.models import clip, clip_weights
from daug_jax.models import text as text_lib
from daug_jax.models.vision import VisionTower, build_vision_tower

VISION_KINDS = ("resnet", "clip")
TEXT_KINDS = ("bert", "clip")
CHANNELS = ("stack", "replace", "add")


def check_channels(channels: str, in_channels: int) -> None:
    """ValueError unless ``model.vision.channels`` fits ``in_channels`` = 1 image + K heatmaps."""
    if channels not in CHANNELS:
        raise ValueError(f"unknown model.vision.channels {channels!r}; valid: {', '.join(CHANNELS)}")
    if channels == "replace" and in_channels != 2:
        raise ValueError(f"model.vision.channels is 'replace': ONE heatmap replaces channel 0 of "
                         f"the film, so model.vision.in_channels must be 2, got {in_channels} "
                         f"(1 image + {in_channels - 1} heatmap targets)")
    if channels == "add" and in_channels < 2:
        raise ValueError("model.vision.channels is 'add': the second tower reads the heatmaps, "
                         f"so model.vision.in_channels must be >= 2, got {in_channels}")


class ChannelModes(nn.Module):
    """images [B, H, W, in_channels] (``[x0, h_1 .. h_K]``) -> [B, D] float32 per ``channels``
    ("replace" or "add", see the module docstring; "stack" needs no wrapper).

    make_tower(in_channels, name): a module ``(images [B, H, W, in_channels], train) -> [B, D]``.
    """
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


def _kind(config: Any, valid: tuple[str, ...], default: str, where: str) -> str:
    kind = config.get("kind", default)
    if kind not in valid:
        raise ValueError(f"unknown {where}.kind {kind!r}; valid: {', '.join(valid)}")
    return kind


def _clip_path(config: Any, where: str) -> str:
    path = config.get("path", "")
    if not path:
        raise ValueError(f"{where}.kind is 'clip': set {where}.path to a local Hugging Face CLIP "
                         "checkpoint directory")
    return path


def _check_embed_dim(embed_dim: int, projection_dim: int, path: str) -> None:
    if embed_dim != projection_dim:
        raise ValueError(f"model.embed_dim is {embed_dim} but the CLIP checkpoint {path} projects "
                         f"to {projection_dim}: set model.embed_dim={projection_dim}")


def build_image_tower(config: Any, embed_dim: int) -> nn.Module:
    """The image tower of ``model.vision`` ({kind, channels, in_channels, dtype, ...}):
    ``(images [B, H, W, in_channels], train) -> [B, embed_dim]`` float32, not normalised."""
    kind = _kind(config, VISION_KINDS, "resnet", "model.vision")
    channels, in_channels = config.get("channels", "stack"), int(config["in_channels"])
    check_channels(channels, in_channels)
    if kind == "resnet":
        if channels == "stack":  # the tower of every existing config, unchanged
            return build_vision_tower(config, embed_dim)
        base = build_vision_tower({**dict(config), "in_channels": 3}, embed_dim)

        def make(c: int, name: str | None = None) -> nn.Module:
            return VisionTower(c, base.embed_dim, base.resnet, base.norm, base.dtype, name=name)
    else:
        path = _clip_path(config, "model.vision")
        shape = clip.ClipConfig.from_json(path)
        _check_embed_dim(embed_dim, shape.projection_dim, path)
        mean, std = clip_weights.pixel_stats(path)
        dtype, remat = jnp.dtype(config.get("dtype", "float32")), bool(config.get("remat", False))

        def make(c: int, name: str | None = None) -> nn.Module:  # channels come from the input
            return clip.ClipVisionModel(shape.vision_config, mean, std, dtype, remat, name=name)
    if channels == "stack":
        return make(in_channels)
    return ChannelModes(make, in_channels, channels)


def text_shape(config: Any, vocab_size: int) -> Any:
    """``model.text``'s shape: a `text.BertConfig` (the checkpoint's at ``path``, or the
    from-scratch size) or, for kind "clip", the checkpoint's `clip.ClipTextConfig`."""
    if _kind(config, TEXT_KINDS, "bert", "model.text") == "clip":
        return clip.ClipConfig.from_json(_clip_path(config, "model.text")).text_config
    if config.get("path"):
        return text_lib.BertConfig.from_json(config.path)
    return text_lib.BertConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=config.max_length,
        hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout)


def build_text_tower(config: Any, shape: Any, embed_dim: int) -> nn.Module:
    """The text tower of ``model.text`` with ``shape`` from `text_shape`:
    ``(input_ids [B, L], attention_mask [B, L], deterministic) -> [B, embed_dim]`` float32."""
    dtype = jnp.dtype(config.get("dtype", "float32"))
    if _kind(config, TEXT_KINDS, "bert", "model.text") == "bert":
        return text_lib.TextTower(shape, embed_dim, pooling=config.get("pooling", "cls"),
                                  dtype=dtype)
    _check_embed_dim(embed_dim, shape.projection_dim, config.path)
    return clip.ClipTextModel(shape, int(config.max_length), dtype,
                              bool(config.get("remat", False)))


def _fill_clip(tree: dict, load: Callable[[dict], dict]) -> dict:
    """Every CLIP vision subtree of ``tree`` ({"vision_model", "visual_projection"}) loaded."""
    if "vision_model" in tree:
        return load(tree)
    return {k: _fill_clip(v, load) if isinstance(v, dict) else v for k, v in tree.items()}


def load_pretrained(params: dict, model_config: Any, model: Any) -> dict:
    """``params`` of a `two_tower.TwoTower` with the checkpoint weights of its pretrained towers
    (NumPy float32 leaves), or ``params`` itself when no tower is pretrained.

    Text: ``model.text.path`` (BERT encoder, or the whole CLIP text tower).  Vision, kind
    "clip": every CLIP tower of the image tower ("add" has two) from ``model.vision.path``,
    position grid resampled to the image size and patch kernel adapted to its channels.
    """
    vision, text = model_config["vision"], model_config["text"]
    out = dict(params)
    if text.get("path"):
        if _kind(text, TEXT_KINDS, "bert", "model.text") == "clip":
            out["text_tower"] = clip_weights.load_tree(clip_weights.read_tensors(text.path),
                                                       params["text_tower"], text.path)
        else:
            encoder = text_lib.load_bert_params(text.path, model.text_tower.config)
            out["text_tower"] = {**params["text_tower"], "encoder": encoder}
    if _kind(vision, VISION_KINDS, "resnet", "model.vision") == "clip":
        path = _clip_path(vision, "model.vision")
        tensors = clip_weights.read_tensors(path)
        out["image_tower"] = _fill_clip(params["image_tower"],
                                        lambda tree: clip_weights.load_tree(tensors, tree, path))
    return out if any(out[k] is not params[k] for k in out) else params
