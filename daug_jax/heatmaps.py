"""DAug heatmap channels: where a guided translation changes an image, one channel per target.

For an image ``x0`` and a target (towards a class, or towards its absence):

    x_L = encode(x0)                          # DDIM up to level L, unguided
    x_c = decode(x_L, guidance towards c)     # DDIM back down, classifier-guided
    h_c = |x_c - x0|, smoothed                # raw heatmap, image units
    channel_c = clip(h_c / scale_constant, 0, 1)

``scale_constant`` is ONE number for the whole dataset (a high percentile of raw values over a
calibration batch): dividing each map by its own maximum would turn "the classifier found nothing
to change" into a full-contrast map of noise.  The encoder later reads ``[x0, channel_1, ...]``.

Targets are written as a class name (towards presence, e.g. "Pleural Effusion"), ``no:<class>``
(towards absence) or "No Finding", which guides towards the classifier's "No Finding", i.e.
towards a healthy image: its heatmap is an anomaly map.  The guidance reads the target's logit
through a sigmoid, as the classifier is trained, or the softmax over all logits, as the authors'
code does (``heatmaps.guidance``); a class-conditional UNet (``unet.class_cond``) also decodes
conditioned on the target's side, healthy (towards "No Finding" or a class's absence) or
diseased, while the encode stays unconditioned.

`Translation` is the one translation path (its DDIM pieces: `daug_jax.diffusion.sampling`): the
heatmap job and the benchmark compile `Translation.heatmaps` with fixed targets (`make_heatmap_fn`),
the localization check jits its pieces.  Datasets of heatmaps and the CLI: `daug_jax.heatmap_job`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from daug_jax import parallel
from daug_jax.data import registry
from daug_jax.data.registry import NO_FINDING
from daug_jax.diffusion import sampling, train
from daug_jax.diffusion.sampling import Guidance
from daug_jax.diffusion.schedule import alphas_cumprod
from daug_jax.diffusion.unet import DISEASED, HEALTHY


# ----------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Target:
    """One heatmap channel: ``spec`` as written, the guided class, the direction (+1 / -1) and
    the side a class-conditional UNet decodes on: healthy towards "No Finding" and towards a
    class's absence, diseased towards a class."""
    spec: str
    class_name: str
    index: int
    direction: float

    @property
    def label(self) -> int:
        return HEALTHY if self.class_name == NO_FINDING or self.direction < 0 else DISEASED


def parse_targets(targets: str | Sequence[str], class_names: Sequence[str]) -> tuple[Target, ...]:
    """``"Pleural Effusion,no:Cardiomegaly,No Finding"`` -> Targets (class names case-insensitive);
    "No Finding" is the presence of the classifier's "No Finding" class (towards healthy), which a
    classifier without that class rejects like any unknown class."""
    specs = [s.strip() for s in (targets.split(",") if isinstance(targets, str) else targets)]
    if not specs or any(not s for s in specs):
        raise ValueError(f"heatmap targets must be non-empty class names, got {targets!r}")
    lower = {name.lower(): i for i, name in enumerate(class_names)}
    parsed = []
    for spec in specs:
        absent = spec.lower().startswith("no:")
        name = spec[3:].strip() if absent else spec
        if name.lower() not in lower:
            raise ValueError(
                f"unknown class {name!r} in heatmap target {spec!r}; valid classes: "
                f"{', '.join(class_names)} (prefix 'no:' to translate towards absence)")
        index = lower[name.lower()]
        canonical = ("no:" if absent else "") + class_names[index]
        if any(t.spec == canonical for t in parsed):
            raise ValueError(f"heatmap target {canonical!r} given twice in {targets!r}")
        parsed.append(Target(canonical, class_names[index], index, -1.0 if absent else 1.0))
    return tuple(parsed)


# ----------------------------------------------------------------------------- heatmap math
def blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """``[size, size] float64`` Gaussian smoothing along one axis with mirrored borders:
    ``blur @ v`` equals ``scipy.ndimage.gaussian_filter1d(v, sigma, mode="reflect")``; a 2-D blur
    is ``B_h @ h @ B_w.T``, a pair of small matmuls that run well on any accelerator."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    cols = (np.arange(size)[:, None] + offsets[None, :]) % (2 * size)  # mirror: period 2 * size
    cols = np.where(cols >= size, 2 * size - 1 - cols, cols)
    out = np.zeros((size, size))
    np.add.at(out, (np.arange(size)[:, None], cols), weights)  # row i: weights onto cols[i]
    return out


def raw_heatmap(x0: jax.Array, translated: jax.Array, smooth_sigma: float = 0.0) -> jax.Array:
    """|translated - x0| averaged over channels, optionally Gaussian-smoothed (sigma in pixels):
    x0, translated [B, H, W, C] -> [B, H, W] float32, in image units ([-1, 1] model space)."""
    chex.assert_equal_shape([x0, translated])
    heat = jnp.mean(jnp.abs(translated.astype(jnp.float32) - x0.astype(jnp.float32)), axis=-1)
    if smooth_sigma > 0:
        b_h = jnp.asarray(blur_matrix(heat.shape[1], smooth_sigma), jnp.float32)
        b_w = jnp.asarray(blur_matrix(heat.shape[2], smooth_sigma), jnp.float32)
        heat = jnp.einsum("ij,bjk,lk->bil", b_h, heat, b_w, precision=jax.lax.Precision.HIGHEST)
    return heat


def calibrate_scale(raw: Any, percentile: float = 99.0) -> float:
    """The dataset-level scale constant: ``percentile`` of all raw heatmap values of a batch."""
    value = float(np.percentile(np.asarray(raw, np.float64), percentile))
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"cannot calibrate heatmaps: the {percentile}th percentile of the raw "
                         f"values is {value} (did the translations change nothing?)")
    return value


def scale_heatmaps(raw: Any, scale_constant: float) -> np.ndarray:
    """Raw heatmaps -> [0, 1] with the FIXED dataset constant (never per image): same shape."""
    if not scale_constant > 0:
        raise ValueError(f"scale_constant must be positive, got {scale_constant}")
    return np.clip(np.asarray(raw, np.float32) / np.float32(scale_constant), 0.0, 1.0)


def check_images(x: Any, image_shape: Sequence[int] | None) -> np.ndarray:
    """Raises a clear error for images the models cannot translate, else returns ``x`` as float32
    numpy.  x: [B, H, W, C] in [-1, 1]; image_shape: the diffusion model's (H, W, C)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {list(x.shape)}")
    if image_shape is not None:
        (h, w, c), got = tuple(image_shape), x.shape
        if got[3] != c:
            raise ValueError(f"images have {got[3]} channels, the diffusion model was trained on "
                             f"{c} (expected [B, {h}, {w}, {c}], got {list(got)})")
        if got[1:3] != (h, w):
            raise ValueError(f"images are {got[1]}x{got[2]}, the diffusion model was trained on "
                             f"{h}x{w} (expected [B, {h}, {w}, {c}], got {list(got)})")
    flat = x.reshape(x.shape[0], -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        raise ValueError(f"image {int(np.argmax(bad))} of the batch has NaN or infinite pixels")
    out = (flat < -1.0 - 1e-3).any(axis=1) | (flat > 1.0 + 1e-3).any(axis=1)
    if out.any():
        i = int(np.argmax(out))
        raise ValueError(f"image {i} has pixels in [{flat[i].min():.3g}, {flat[i].max():.3g}]; "
                         f"expected [-1, 1] (see to_model_space)")
    return x


# ----------------------------------------------------------------------------- models
def module_fn(module, params) -> Partial:
    """``fn(*inputs) = module.apply({"params": params}, *inputs)`` as a pytree, so that jit takes
    the parameters as arguments (not compiled constants)."""
    return Partial(lambda p, *inputs: module.apply({"params": p}, *inputs), params)


@dataclasses.dataclass(frozen=True)
class TranslationModels:
    """The epsilon-UNet and noise-aware classifier as closures, with what they were trained on."""
    eps_fn: Partial                 # (x [B, H, W, C], t [B], y [B] labels) -> eps [B, H, W, C]
    logit_fn: Partial               # (x, t) -> logits [B, K]
    alpha_bar: np.ndarray           # [T] float64
    image_shape: tuple[int, ...]    # (H, W, C)
    class_names: tuple[str, ...]    # orders the classifier's logits
    config: Any                     # the diffusion model's config
    max_level: int | None = None    # the classifier's highest trained level (None: untrained)

    @property
    def class_cond(self) -> bool:
        """Whether the UNet is conditioned on the film's side (``unet.class_cond``)."""
        return self.config is not None and bool(self.config.unet.class_cond)


def add_model_args(parser, out: str) -> None:
    """The translation commands' arguments (``heatmaps``, ``localize``): the two models'
    workdirs, ``--out``, ``--config`` / ``--set`` and the data's (`registry.add_data_args`)."""
    parser.add_argument("--diffusion", default="runs/diffusion", help="diffusion workdir")
    parser.add_argument("--classifier", default="runs/classifier", help="classifier workdir")
    parser.add_argument("--out", default=out)
    parser.add_argument("--config", default="heatmaps", help="experiments/<name>.py or a .py path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    registry.add_data_args(parser)


def load_models(diffusion_dir: str, classifier_dir: str) -> TranslationModels:
    """Loads both trained models and checks that they belong together."""
    # This process's devices only: translation is per image, so the processes of a heatmap job
    # work independently (each on its own shards) and never wait on one another.
    local = parallel.make_mesh(jax.local_devices())
    unet, unet_params, dcfg = train.load_diffusion(diffusion_dir, local)
    clf, clf_params, ccfg = train.load_classifier(classifier_dir, local)
    if tuple(dcfg.image_shape) != tuple(ccfg.image_shape):
        raise ValueError(f"the diffusion model ({diffusion_dir}) was trained on images of shape "
                         f"{tuple(dcfg.image_shape)}, the classifier ({classifier_dir}) on "
                         f"{tuple(ccfg.image_shape)}")
    for key in ("schedule", "num_steps"):
        if dcfg.diffusion[key] != ccfg.diffusion[key]:
            raise ValueError(f"noise schedule mismatch: diffusion.{key} = {dcfg.diffusion[key]!r} "
                             f"({diffusion_dir}) vs {ccfg.diffusion[key]!r} ({classifier_dir})")
    alpha_bar = alphas_cumprod(dcfg.diffusion.schedule, dcfg.diffusion.num_steps)
    return TranslationModels(module_fn(unet, unet_params), module_fn(clf, clf_params), alpha_bar,
                             tuple(dcfg.image_shape), tuple(ccfg.class_names), dcfg,
                             train.trained_max_level(ccfg))


def init_models(config: Any, image_shape: Sequence[int], class_names: Sequence[str],
                key: jax.Array) -> TranslationModels:
    """Freshly initialised models of a diffusion config (benchmarks: same cost as trained ones)."""
    unet, clf = train.make_unet(config), train.make_classifier(config, len(class_names))
    k_unet, k_clf = jax.random.split(key)
    x, t = jnp.zeros((1, *image_shape), jnp.float32), jnp.zeros((1,), jnp.int32)
    alpha_bar = alphas_cumprod(config.diffusion.schedule, config.diffusion.num_steps)
    return TranslationModels(module_fn(unet, unet.init(k_unet, x, t, t)["params"]),
                             module_fn(clf, clf.init(k_clf, x, t)["params"]), alpha_bar,
                             tuple(image_shape), tuple(class_names), config)


# ----------------------------------------------------------------------------- the translation
@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, jit takes methods
class Translation:
    """The one translation path: DDIM encode to level L, guided DDIM decodes, heatmaps.  Models
    enter as closures (`TranslationModels.eps_fn`, ``logit_fn``), arguments of every method, so
    that jit takes their parameters as inputs."""
    alpha_bar: np.ndarray   # [T] float64
    grid: np.ndarray        # [S + 1] int32 DDIM levels, 0 .. L (`sampling.ddim_grid`)
    smooth_sigma: float     # Gaussian sigma of the maps in pixels (0: none)
    reference: str          # what a map is measured against (`config.REFERENCES`)
    unroll: int | bool      # how far the step loops unroll
    guidance: str           # how the classifier steers (`sampling.GUIDANCE_FORMS`)

    def encode(self, eps_fn, x0: jax.Array) -> jax.Array:
        """x0 [B, H, W, C] -> x_L [B, H, W, C], unguided DDIM up the grid."""
        return sampling.ddim_encode(eps_fn, x0, self.alpha_bar, self.grid, unroll=self.unroll)

    def reconstruct(self, eps_fn, x_L: jax.Array) -> jax.Array:
        """x_L -> the unguided DDIM decode [B, H, W, C]: the film as the inversion returns it."""
        return sampling.ddim_decode(eps_fn, x_L, self.alpha_bar, self.grid, unroll=self.unroll)

    def decode(self, eps_fn, logit_fn, x_L, base, guidance: Guidance):
        """x_L, base [B, H, W, C]; guidance: one target, or one per row (`Guidance`) ->
        (translated x_c [B, H, W, C], raw heatmap |x_c - base| [B, H, W])."""
        x_c = sampling.guided_ddim_decode(eps_fn, logit_fn, x_L, self.alpha_bar, self.grid,
                                          guidance, form=self.guidance, unroll=self.unroll)
        return x_c, raw_heatmap(base, x_c, self.smooth_sigma)

    def heatmaps(self, eps_fn, logit_fn, x0, guidance: Guidance):
        """x0 [B, H, W, C]; guidance with index, direction, label [K] (K targets) ->
        (translated [K, B, H, W, C], raw [B, H, W, K]); one encode, K decodes (and one
        reconstruction, see `config.REFERENCES`)."""
        x_L = self.encode(eps_fn, x0)
        base = x0 if self.reference == "x0" else self.reconstruct(eps_fn, x_L)
        translated, raw = jax.vmap(lambda i, d, y: self.decode(
            eps_fn, logit_fn, x_L, base, Guidance(i, d, guidance.scale, y)))(
                *map(jnp.asarray, (guidance.index, guidance.direction, guidance.label)))
        return translated, jnp.moveaxis(raw, 0, -1)  # raw: [K, B, H, W] -> [B, H, W, K]


def make_translation(models: TranslationModels, settings: Any, level: int | None = None,
                     num_steps: int | None = None) -> Translation:
    """The translation of ``models`` with a config's ``heatmaps`` settings (``smooth_sigma``,
    ``reference``, ``unroll``, ``guidance``) to encode level ``level`` (default
    ``settings.level``, at most the classifier's trained ``max_level``) in ``num_steps`` DDIM
    moves each way (default ``settings.num_steps``)."""
    level = int(settings["level"] if level is None else level)
    num_steps = int(settings["num_steps"] if num_steps is None else num_steps)
    if models.max_level is not None and level > models.max_level:
        # Above it the classifier's gradient comes from inputs it never saw: guidance by noise.
        raise ValueError(f"heatmap encode level L = {level} is above the classifier's trained "
                         f"levels (classifier.max_level = {models.max_level}); use a level <= "
                         f"{models.max_level} or train the classifier up to {level}")
    alpha_bar = np.asarray(models.alpha_bar, np.float64)
    grid = sampling.ddim_grid(len(alpha_bar), level, num_steps)
    return Translation(alpha_bar, grid, float(settings["smooth_sigma"]),
                       str(settings["reference"]), settings["unroll"], str(settings["guidance"]))


@dataclasses.dataclass(frozen=True)
class HeatmapFn:
    """``heatmap_fn(x)``: `Translation.heatmaps` compiled with the targets and scale fixed, on a
    checked x [B, H, W, C] float32 in [-1, 1] -> (translated [K, B, H, W, C], raw [B, H, W, K])."""
    models: TranslationModels
    targets: tuple[Target, ...]
    translation: Translation
    scale: float
    program: Callable   # jitted (eps_fn, logit_fn, x) -> (translated, raw)

    def __call__(self, x: Any) -> tuple[jax.Array, jax.Array]:
        x = check_images(x, self.models.image_shape)
        devices = jax.local_devices()
        if len(devices) > 1 and len(x) % len(devices) == 0:
            # Split the batch over this host's accelerators; jit partitions the program to match.
            x = jax.device_put(x, parallel.data_sharding(parallel.make_mesh(devices)))
        return self.program(self.models.eps_fn, self.models.logit_fn, x)

    def settings(self) -> dict:
        """What produced the heatmaps (stored with a dataset)."""
        t, shape = self.translation, self.models.image_shape
        return {"targets": [target.spec for target in self.targets], "level": int(t.grid[-1]),
                "num_steps": len(t.grid) - 1, "guidance_scale": float(self.scale),
                "smooth_sigma": float(t.smooth_sigma), "reference": t.reference,
                "guidance": t.guidance, "image_shape": None if shape is None else list(shape)}


def make_heatmap_fn(models: TranslationModels, targets: str | Sequence[str],
                    translation: Translation, scale: float) -> HeatmapFn:
    """The compiled heatmap function (see `HeatmapFn`) of ``models`` for ``targets``
    (`parse_targets`) along ``translation`` (`make_translation`) at guidance ``scale``."""
    parsed = parse_targets(targets, models.class_names)
    guidance = Guidance(np.array([t.index for t in parsed], np.int32),
                        np.array([t.direction for t in parsed], np.float32), float(scale),
                        np.array([t.label for t in parsed], np.int32))
    program = jax.jit(functools.partial(translation.heatmaps, guidance=guidance))
    return HeatmapFn(models, parsed, translation, float(scale), program)
