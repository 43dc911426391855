"""DAug heatmap channels: where a guided translation changes an image, one channel per target.

For an image ``x0`` and a target (towards a class, or towards its absence):

    x_c = translate(x0)                       # DDIM encode to level L, guided decode (sampling.py)
    h_c = |x_c - x0|, smoothed                # raw heatmap, image units
    channel_c = clip(h_c / scale_constant, 0, 1)

``scale_constant`` is ONE number for the whole dataset (a high percentile of raw values over a
calibration batch): dividing each map by its own maximum would turn "the classifier found nothing
to change" into a full-contrast map of noise.  The encoder later reads ``[x0, channel_1, ...]``.

Targets are written as a class name (towards presence, e.g. "Pleural Effusion"), ``no:<class>``
(towards absence) or "No Finding", which guides towards ``sigmoid(logit_NoFinding)``, i.e. towards
a healthy image: its heatmap is an anomaly map.

`Translation` is the one translation path (encode, K guided decodes, heatmaps), shared by the
heatmap job, the localization check and the benchmark; `make_heatmap_fn` compiles it with fixed
targets into one XLA program (decodes vmapped over targets).  `translate_python_loop` is the same
computation dispatched step by step from Python (a reference for tests and the baseline of
``daug-jax bench heatmaps``).  Writing the heatmaps of a whole dataset, reading them back and the
CLI live in `daug_jax.heatmap_job`.
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
from daug_jax.diffusion import sampling
from daug_jax.diffusion.schedule import alphas_cumprod, ddim_step


# ----------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Target:
    """One heatmap channel: ``spec`` as written, the guided class and the direction (+1 / -1)."""
    spec: str
    class_name: str
    index: int
    direction: float


def parse_targets(targets: str | Sequence[str], class_names: Sequence[str]) -> tuple[Target, ...]:
    """``"Pleural Effusion,no:Cardiomegaly,No Finding"`` -> Targets (class names case-insensitive).

    "No Finding" is the presence of the classifier's "No Finding" class (towards healthy); a
    classifier without that class rejects it like any unknown class.
    """
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
    """``[size, size] float64`` Gaussian smoothing along one axis with mirrored borders.

    ``blur @ v`` equals ``scipy.ndimage.gaussian_filter1d(v, sigma, mode="reflect")``; a 2-D blur
    is ``B_h @ h @ B_w.T``, a pair of small matmuls that run well on any accelerator.
    """
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    cols = (np.arange(size)[:, None] + offsets[None, :]) % (2 * size)  # mirror: period 2 * size
    cols = np.where(cols >= size, 2 * size - 1 - cols, cols)
    out = np.zeros((size, size))
    np.add.at(out, (np.repeat(np.arange(size), offsets.size), cols.ravel()),
              np.tile(weights, size))
    return out


def raw_heatmap(x0: jax.Array, translated: jax.Array, smooth_sigma: float = 0.0) -> jax.Array:
    """|translated - x0| averaged over channels, optionally Gaussian-smoothed (sigma in pixels).

    x0, translated: [B, H, W, C]  ->  [B, H, W] float32, in image units ([-1, 1] model space).
    """
    chex.assert_equal_shape([x0, translated])
    heat = jnp.mean(jnp.abs(translated.astype(jnp.float32) - x0.astype(jnp.float32)), axis=-1)
    if smooth_sigma > 0:
        b_h = jnp.asarray(blur_matrix(heat.shape[1], smooth_sigma), jnp.float32)
        b_w = jnp.asarray(blur_matrix(heat.shape[2], smooth_sigma), jnp.float32)
        heat = jnp.einsum("ij,bjk,lk->bil", b_h, heat, b_w, precision=jax.lax.Precision.HIGHEST)
    return heat


def calibrate_scale(raw: Any, percentile: float = 99.0) -> float:
    """The dataset-level scale constant: ``percentile`` of all raw heatmap values of a batch."""
    raw = np.asarray(raw, np.float64)
    value = float(np.percentile(raw, percentile))
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"cannot calibrate heatmaps: the {percentile}th percentile of the raw "
                         f"values is {value} (did the translations change nothing?)")
    return value


def scale_heatmaps(raw: Any, scale_constant: float) -> np.ndarray:
    """Raw heatmaps -> [0, 1] with the FIXED dataset constant (never per image): same shape."""
    if not scale_constant > 0:
        raise ValueError(f"scale_constant must be positive, got {scale_constant}")
    return np.clip(np.asarray(raw, np.float32) / np.float32(scale_constant), 0.0, 1.0)


def to_model_space(images: Any) -> np.ndarray:
    """Stored pixels -> the models' [-1, 1]: uint8 in [0, 255] or floats in [0, 1]; same shape."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32) * 2.0 - 1.0


def check_images(x: Any, image_shape: Sequence[int] | None) -> np.ndarray:
    """Raises a clear error for images the models cannot translate; returns ``x`` as float32 numpy.

    x: [B, H, W, C] in [-1, 1]; image_shape: (H, W, C) the diffusion model was trained on.
    """
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


# ----------------------------------------------------------------------------- the program
def as_partial(fn: Callable) -> Partial:
    """A model closure as a pytree, so that jit takes its parameters as arguments (not constants).

    ``Partial(apply, params)`` keeps ``params`` as traced leaves; a plain function becomes a
    leafless Partial.
    """
    return fn if isinstance(fn, Partial) else Partial(fn)


def _apply_module(module, params, x, t):
    return module.apply({"params": params}, x, t)


def module_fn(module, params) -> Partial:
    """``fn(x, t) = module.apply({"params": params}, x, t)`` with ``params`` visible to jit."""
    return Partial(functools.partial(_apply_module, module), params)


# What a heatmap is measured against: the film itself ("x0": the map holds the guidance's change
# plus the DDIM inversion error) or its unguided DDIM reconstruction ("reconstruction": the
# inversion error cancels, the map holds what the guidance changed; one more decode per film).
REFERENCES = ("x0", "reconstruction")


def check_reference(reference: str) -> str:
    if reference not in REFERENCES:
        raise ValueError(f"unknown heatmaps.reference {reference!r}; valid: {', '.join(REFERENCES)}")
    return reference


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, jit takes methods
class Translation:
    """The one translation path: DDIM encode to level L, guided DDIM decodes, heatmaps.

    The heatmap job and the benchmark run `heatmaps` (through `HeatmapFn`) as one compiled
    program; the localization check jits the pieces, so that each film is encoded once and
    decoded for several scales and per-film targets.  Models enter as `as_partial` closures.
    """
    alpha_bar: np.ndarray   # [T] float64
    grid: np.ndarray        # [S + 1] int32 DDIM levels, 0 .. L (`sampling.ddim_grid`)
    smooth_sigma: float     # Gaussian sigma of the maps in pixels (0: none)
    unroll: int | bool      # `sampling.default_unroll`

    def encode(self, eps_fn, x0: jax.Array) -> jax.Array:
        """x0 [B, H, W, C] -> x_L [B, H, W, C], unguided DDIM up the grid."""
        return sampling.ddim_encode(eps_fn, x0, self.alpha_bar, self.grid, unroll=self.unroll)

    def reconstruct(self, eps_fn, x_L: jax.Array) -> jax.Array:
        """x_L -> the unguided DDIM decode [B, H, W, C]: the film as the inversion returns it."""
        return sampling.ddim_decode(eps_fn, x_L, self.alpha_bar, self.grid, unroll=self.unroll)

    def decode(self, eps_fn, logit_fn, x_L, base, index, direction, scale):
        """x_L, base [B, H, W, C]; index, direction: scalar or [B] (one target per row), scale
        -> (translated x_c [B, H, W, C], raw heatmap |x_c - base| [B, H, W])."""
        x_c = sampling.guided_ddim_decode(eps_fn, logit_fn, x_L, self.alpha_bar, self.grid,
                                          index, direction, scale, unroll=self.unroll)
        return x_c, raw_heatmap(base, x_c, self.smooth_sigma)

    def heatmaps(self, eps_fn, logit_fn, x0, *, index, direction, scale, reference="x0"):
        """x0 [B, H, W, C]; index, direction: [K] targets -> (translated [K, B, H, W, C], raw
        [B, H, W, K]); one encode, K decodes (and one reconstruction, see `REFERENCES`)."""
        x_L = self.encode(eps_fn, x0)
        base = x0 if reference == "x0" else self.reconstruct(eps_fn, x_L)
        translated, raw = jax.vmap(
            lambda i, d: self.decode(eps_fn, logit_fn, x_L, base, i, d, scale))(
                jnp.asarray(index), jnp.asarray(direction))                 # raw: [K, B, H, W]
        return translated, jnp.moveaxis(raw, 0, -1)


def make_translation(alpha_bar: Any, *, level: int, num_steps: int, smooth_sigma: float = 0.0,
                     max_level: int | None = None) -> Translation:
    """The translation of ``num_steps`` DDIM moves each way to encode ``level`` (checked against
    the classifier's ``max_level``, `check_level`)."""
    check_level(level, max_level)
    alpha_bar = np.asarray(alpha_bar, np.float64)
    return Translation(alpha_bar, sampling.ddim_grid(len(alpha_bar), level, num_steps),
                       float(smooth_sigma), sampling.default_unroll())


@dataclasses.dataclass(frozen=True)
class HeatmapFn:
    """``heatmap_fn(x)``: checked input -> one compiled program -> (translated, raw heatmaps).

    x: [B, H, W, C] float32 in [-1, 1]  ->  translated [K, B, H, W, C], raw [B, H, W, K].
    The program is `Translation.heatmaps` with the targets, the scale and the reference fixed.
    """
    eps_fn: Partial
    logit_fn: Partial
    targets: tuple[Target, ...]
    translation: Translation
    scale: float
    image_shape: tuple[int, ...] | None
    program: Callable   # jitted (eps_fn, logit_fn, x) -> (translated, raw)
    reference: str = "x0"

    alpha_bar = property(lambda self: self.translation.alpha_bar)
    grid = property(lambda self: self.translation.grid)
    smooth_sigma = property(lambda self: self.translation.smooth_sigma)

    def __call__(self, x: Any) -> tuple[jax.Array, jax.Array]:
        x = check_images(x, self.image_shape)
        devices = jax.local_devices()
        if len(devices) > 1 and len(x) % len(devices) == 0:
            # Split the batch over this host's accelerators; jit partitions the program to match.
            x = jax.device_put(x, parallel.data_sharding(parallel.make_mesh(devices)))
        return self.program(self.eps_fn, self.logit_fn, x)

    def settings(self) -> dict:
        """What produced the heatmaps (stored with a dataset)."""
        return {"targets": [t.spec for t in self.targets], "level": int(self.grid[-1]),
                "num_steps": len(self.grid) - 1, "guidance_scale": float(self.scale),
                "smooth_sigma": float(self.smooth_sigma), "reference": self.reference,
                "image_shape": None if self.image_shape is None else list(self.image_shape)}


def make_heatmap_fn(eps_fn: Callable, logit_fn: Callable, alpha_bar: Any,
                    targets: str | Sequence[str], class_names: Sequence[str], *, level: int,
                    num_steps: int, scale: float, smooth_sigma: float = 0.0,
                    image_shape: Sequence[int] | None = None, reference: str = "x0",
                    max_level: int | None = None) -> HeatmapFn:
    """Builds the compiled heatmap function (see `HeatmapFn`).

    eps_fn(x, t) / logit_fn(x, t): model closures (`module_fn` keeps parameters out of the
    compiled constants); alpha_bar: [T]; level: encode level L; num_steps: DDIM moves each way;
    scale: guidance scale; smooth_sigma: Gaussian sigma in pixels (0: none); image_shape: (H, W, C)
    the diffusion model was trained on, checked on every call; reference: see `REFERENCES`;
    max_level: the classifier's highest trained level (`TranslationModels.max_level`), checked.
    """
    parsed = parse_targets(targets, class_names)
    check_reference(reference)
    translation = make_translation(alpha_bar, level=level, num_steps=num_steps,
                                   smooth_sigma=smooth_sigma, max_level=max_level)
    program = jax.jit(functools.partial(
        translation.heatmaps, index=np.array([t.index for t in parsed], np.int32),
        direction=np.array([t.direction for t in parsed], np.float32), scale=float(scale),
        reference=reference))
    return HeatmapFn(as_partial(eps_fn), as_partial(logit_fn), parsed, translation, float(scale),
                     None if image_shape is None else tuple(int(s) for s in image_shape), program,
                     reference)


@jax.jit
def _eps_call(eps_fn, x, t):
    return eps_fn(x, jnp.full((x.shape[0],), t, jnp.int32))


@jax.jit
def _guided_eps_call(eps_fn, logit_fn, x, t, alpha_bar_t, index, direction, scale):
    return sampling.guided_eps(eps_fn, logit_fn, x, t, alpha_bar_t, index, direction, scale)


def translate_python_loop(heatmap_fn: HeatmapFn, x: Any) -> tuple[jax.Array, jax.Array]:
    """The same outputs as ``heatmap_fn(x)``, but each network evaluation is its own jitted call
    and the loops over DDIM steps and targets run in Python (a reference and a benchmark baseline).
    """
    f = heatmap_fn
    x0 = jnp.asarray(check_images(x, f.image_shape))
    t, ab = sampling.grid_levels(f.alpha_bar, f.grid)
    x_L = x0
    for k in range(len(t) - 1):
        x_L = ddim_step(x_L, _eps_call(f.eps_fn, x_L, t[k]), ab[k], ab[k + 1])

    def descend(target=None):
        """Down the grid, guided towards ``target`` (None: unguided, the reconstruction)."""
        x_t = x_L
        for k in range(len(t) - 1, 0, -1):
            eps = (_eps_call(f.eps_fn, x_t, t[k]) if target is None else _guided_eps_call(
                f.eps_fn, f.logit_fn, x_t, t[k], ab[k], target.index, target.direction, f.scale))
            x_t = ddim_step(x_t, eps, ab[k], ab[k - 1])
        return x_t

    translated = jnp.stack([descend(g) for g in f.targets])
    base = x0 if f.reference == "x0" else descend()
    raw = jnp.stack([raw_heatmap(base, x_c, f.smooth_sigma) for x_c in translated], axis=-1)
    return translated, raw


# ----------------------------------------------------------------------------- models
@dataclasses.dataclass(frozen=True)
class TranslationModels:
    """The epsilon-UNet and noise-aware classifier as closures, with what they were trained on."""
    eps_fn: Partial
    logit_fn: Partial
    alpha_bar: np.ndarray           # [T] float64
    image_shape: tuple[int, ...]    # (H, W, C)
    class_names: tuple[str, ...]    # orders the classifier's logits
    config: Any                     # the diffusion model's config
    max_level: int | None = None    # the classifier's highest trained level (None: untrained)


def check_level(level: int, max_level: int | None) -> int:
    """Rejects an encode level above the classifier's trained ``max_level``: its gradient
    there comes from inputs it never saw, and the guidance would steer by noise."""
    if max_level is not None and level > max_level:
        raise ValueError(f"heatmap encode level L = {level} is above the classifier's trained "
                         f"levels (classifier.max_level = {max_level}); use a level <= "
                         f"{max_level} or train the classifier up to {level}")
    return level


def load_models(diffusion_dir: str, classifier_dir: str) -> TranslationModels:
    """Loads both trained models and checks that they belong together."""
    from daug_jax.diffusion import train

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
    from daug_jax.diffusion import train

    unet, clf = train.make_unet(config), train.make_classifier(config, len(class_names))
    k_unet, k_clf = jax.random.split(key)
    x, t = jnp.zeros((1, *image_shape), jnp.float32), jnp.zeros((1,), jnp.int32)
    alpha_bar = alphas_cumprod(config.diffusion.schedule, config.diffusion.num_steps)
    return TranslationModels(module_fn(unet, unet.init(k_unet, x, t)["params"]),
                             module_fn(clf, clf.init(k_clf, x, t)["params"]), alpha_bar,
                             tuple(image_shape), tuple(class_names), config)
