"""Hugging Face CLIP checkpoints -> Flax parameter trees, and position-embedding resampling.

Our CLIP modules (`daug_jax.models.clip`) use Hugging Face's module names, so a parameter path
maps to a tensor name mechanically:

    ("vision_model", "encoder", "layers_0", "self_attn", "q_proj", "kernel")
        -> "vision_model.encoder.layers.0.self_attn.q_proj.weight"      (transposed: [in, out])

Where the tower differs from the checkpoint the tensor is fitted: the image position grid is
resampled bicubically (`resample_image_posemb`), the text positions linearly
(`resample_text_posemb`), and a 3-channel patch kernel is adapted to the tower's channel count
with `vision.adapt_stem_kernel`.  NumPy only: no torch, no network.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file

from daug_jax.models.vision import adapt_stem_kernel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
# OpenAI CLIP's pixel statistics: CLIPImageProcessor's defaults when a checkpoint has no
# preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- resampling
def _cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] weights of torch's ``interpolate(mode="bicubic", align_corners=False)``.

    Keys' cubic kernel with a = -0.75 (torch's, not PIL's -0.5), source coordinate
    (i + 0.5)·n_in/n_out − 0.5 left unclamped, the four taps clamped to the border.
    """
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    t = src - base

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    m = np.zeros((n_out, n_in))
    for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
        np.add.at(m, (np.arange(n_out), np.clip(base + offset, 0, n_in - 1).astype(int)), w)
    return m


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of linear interpolation with half-pixel centres (torch's
    ``interpolate(mode="linear", align_corners=False)``): ends held, not extrapolated."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    t = src - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - t)
    np.add.at(m, (np.arange(n_out), np.minimum(lo + 1, n_in - 1)), t)
    return m


def resample_image_posemb(posemb: Any, new_grid: int) -> np.ndarray:
    """posemb [1 + g·g, D] (class token first, then the g x g grid row by row) -> [1 + n·n, D].

    The grid is resampled to ``new_grid`` = n with torch's bicubic kernel (what Hugging Face's
    ``interpolate_pos_encoding`` applies, so features agree with it); the class token's
    position is kept as is.  Computed in float64, returned float32.
    """
    posemb = np.asarray(posemb, np.float64)
    g = math.isqrt(posemb.shape[0] - 1)
    if posemb.ndim != 2 or g * g != posemb.shape[0] - 1:
        raise ValueError(f"image position embeddings must be [1 + g*g, D], got {posemb.shape}")
    if new_grid < 1:
        raise ValueError(f"new_grid must be >= 1, got {new_grid}")
    w = _cubic_matrix(g, new_grid)
    grid = np.einsum("ia,jb,abd->ijd", w, w, posemb[1:].reshape(g, g, -1))
    return np.concatenate([posemb[:1], grid.reshape(new_grid * new_grid, -1)]).astype(np.float32)


def resample_text_posemb(posemb: Any, new_length: int) -> np.ndarray:
    """posemb [L, D] -> [new_length, D] float32.

    Longer: linear interpolation (the authors' 77 -> 154).  Shorter or equal: the first rows,
    which is exactly what the checkpoint computes for a text of that length.
    """
    posemb = np.asarray(posemb, np.float32)
    if new_length <= posemb.shape[0]:
        return posemb[:new_length]
    w = _linear_matrix(posemb.shape[0], new_length)
    return (w @ posemb.astype(np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------- files
def require_files(path: str, names: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE)) -> str:
    """``path`` as a string; FileNotFoundError naming the directory or the first missing file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP checkpoint directory not found: {path}")
    for name in names:
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"CLIP checkpoint {path} has no {name}")
    return path


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of ``<path>/model.safetensors`` as NumPy (name -> array)."""
    return load_file(os.path.join(require_files(path, (WEIGHTS_FILE,)), WEIGHTS_FILE))


def pixel_stats(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(image_mean, image_std), 3 floats each, from ``preprocessor_config.json`` when present."""
    file = os.path.join(os.fspath(path), PREPROCESSOR_FILE)
    if not os.path.isfile(file):
        return CLIP_MEAN, CLIP_STD
    with open(file) as f:
        cfg = json.load(f)
    mean, std = cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{file}: image_mean and image_std must have 3 entries each")
    return tuple(map(float, mean)), tuple(map(float, std))


# ----------------------------------------------------------------------------- parameters
def hf_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> the Hugging Face tensor name (see the module docstring)."""
    *modules, leaf = path
    modules = [m.replace("layers_", "layers.") if m.startswith("layers_") else m for m in modules]
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join([*modules, leaf])


def _to_flax(leaf: str, tensor: np.ndarray) -> np.ndarray:
    """torch layout -> Flax for our leaf name: a Linear weight [out, in] -> kernel [in, out];
    a Conv weight [out, in, kh, kw] -> kernel [kh, kw, in, out]; everything else as is."""
    if leaf == "kernel":
        return tensor.T if tensor.ndim == 2 else tensor.transpose(2, 3, 1, 0)
    return tensor


def _fit(name: str, value: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    """The checkpoint's ``value`` fitted to the tower's parameter ``shape``."""
    if value.shape == shape:
        return value
    if name.endswith("vision_model.embeddings.position_embedding.weight"):
        return resample_image_posemb(value, math.isqrt(shape[0] - 1))
    if name.endswith("text_model.embeddings.position_embedding.weight"):
        return resample_text_posemb(value, shape[0])
    if name.endswith("patch_embedding.weight") and value.shape[:2] + value.shape[3:] == \
            shape[:2] + shape[3:]:
        if value.shape[2] != 3:
            raise ValueError(
                f"{where}: the patch embedding takes {value.shape[2]} input channels (a stem "
                f"already adapted from RGB), but this image tower reads {shape[2]}: the heatmap "
                f"count (model.vision.in_channels = 1 + heatmaps, model.vision.channels) must "
                f"give {value.shape[2]}")
        return adapt_stem_kernel(value, shape[2])
    raise ValueError(f"{where}: tensor {name!r} has shape {value.shape} (as Flax), "
                     f"the model expects {shape}")


def load_tree(tensors: dict[str, np.ndarray], expected: Any, where: str = "checkpoint") -> dict:
    """The parameter tree shaped like ``expected`` (arrays or ShapeDtypeStructs, HF-named
    modules such as {"vision_model": ..., "visual_projection": ...}) filled from ``tensors``.

    Returns float32 NumPy leaves.  KeyError names a missing tensor, ValueError a shape that
    cannot be fitted; ``where`` (the checkpoint path) starts each message.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
    out = []
    for path, leaf in leaves:
        keys = tuple(k.key for k in path)
        name = hf_name(keys)
        if name not in tensors:
            raise KeyError(f"{where}: tensor {name!r} not found in {WEIGHTS_FILE}")
        value = _to_flax(keys[-1], np.asarray(tensors[name], np.float32))
        out.append(_fit(name, value, tuple(leaf.shape), where))
    return jax.tree_util.tree_unflatten(treedef, out)
