"""Loading experiment configs (``experiments/<name>.py`` defines ``get_config() -> ConfigDict``),
applying ``key.sub=value`` overrides, and checking every switch in one place (`validate`)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import os

import ml_collections


def load_config(name_or_path: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Loads ``experiments.<name>`` or a ``.py`` file path, applies ``a.b=value`` overrides and
    validates the result (`validate`).  ``name:arg`` calls ``get_config(arg)`` (e.g.
    ``demo:quick``)."""
    config = read_config(name_or_path, overrides)
    validate(config)
    return config


def read_config(name_or_path: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """`load_config` without the validation: for settings read before JAX may start (its
    device-count check would start it)."""
    name_or_path, _, arg = name_or_path.partition(":")
    if name_or_path.endswith(".py"):
        if not os.path.exists(name_or_path):
            raise FileNotFoundError(f"config file not found: {name_or_path}")
        spec = importlib.util.spec_from_file_location("_daug_config", name_or_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(f"experiments.{name_or_path}")
        except ModuleNotFoundError as err:
            raise ValueError(f"unknown config {name_or_path!r} "
                             f"(no experiments/{name_or_path}.py)") from err
    config = module.get_config(arg) if arg else module.get_config()
    apply_overrides(config, overrides or [])
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Applies ``["train.steps=100", "data.name='x'"]`` in place; values read as Python literals."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # bare strings need no quotes
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node:
                raise KeyError(f"override {item!r}: config has no field {part!r}")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"override {item!r}: config has no field {key!r}")
        node[leaf] = value


# ----------------------------------------------------------------------------- validation
def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Leaf name -> (check, what it must be).  Keys are checked wherever they occur in a config.
_RULES = {
    **{k: (lambda v: _count(v) and v >= 1, "a positive integer") for k in (
        "steps", "batch_size", "save_every", "checkpoint_every", "log_every", "num_steps",
        "shard_size", "image_size", "num_train", "num_images", "cases_per_class", "pool_size",
        "ch", "num_res_blocks", "norm_groups", "num_heads", "vocab_size", "hidden_size",
        "num_layers", "intermediate_size", "max_length", "embed_dim", "input_threads")},
    **{k: (_count, "an integer >= 0") for k in (
        "warmup", "warmup_steps", "num_validation", "num_test", "seed", "level",
        "member_chunk")},
    **{k: (lambda v: _number(v) and v > 0, "a positive number") for k in (
        "lr", "learning_rate", "grad_clip")},
    **{k: (lambda v: _number(v) and v >= 0, "a number >= 0") for k in (
        "weight_decay", "scale", "smooth_sigma")},
    **{k: (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]") for k in (
        "clip_weight", "dropout", "ema_decay", "label_dropout")},
    "percentile": (lambda v: _number(v) and 0 < v <= 100, "a number in (0, 100]"),
    "sweep_scales": (lambda v: all(_number(s) and s >= 0 for s in v), "numbers >= 0"),
    "sweep_levels": (lambda v: len(v) > 0 and all(_count(s) for s in v), "integers >= 0"),
    "sweep_moves": (lambda v: len(v) > 0 and all(_count(s) and s >= 1 for s in v),
                    "positive integers"),
    "train_split": (lambda v: isinstance(v, str) and all(p.strip() for p in v.split("+")),
                    "a split name or a union such as 'train+validation'"),
    # Switches with named values (model.vision.kind, data.label_policy, ...) are checked in
    # `_validate_switches`, against the tuples their modules define.
    "path": (lambda v: isinstance(v, str), "a directory path ('' for none)"),
    **{k: (lambda v: isinstance(v, bool), "True or False") for k in (
        "remat", "learn_logit_scale", "class_cond")},
    "logit_scale_init": (_number, "a finite number (the log of the initial CLIP logit scale)"),
}


def _leaves(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            yield from _leaves(value, path + ".")
        else:
            yield path, key, value


def _one_of(values: tuple) -> str:
    """("a", "b", "c") -> "'a', 'b' or 'c'"."""
    return " or ".join(filter(None, [", ".join(map(repr, values[:-1])), repr(values[-1])]))


def _section(config, *path):
    """``config[path[0]][path[1]]...``, None where a stage's config lacks a part of the path."""
    for key in path:
        if config is None or key not in config:
            return None
        config = config[key]
    return config


# What a heatmap is measured against (``heatmaps.reference``, `heatmaps.Translation`): the film
# itself ("x0": the map holds the guidance's change plus the DDIM inversion error) or its
# unguided DDIM reconstruction ("reconstruction": the inversion error cancels, the map holds what
# the guidance changed; one more decode per film).  Defined here, where it is checked: the
# heatmaps module imports the trainers, which load configs.
REFERENCES = ("x0", "reconstruction")


def _validate_switches(config: ml_collections.ConfigDict) -> None:
    """Named-value switches against the tuples their modules define, wherever a stage's config
    sits (the demo's towers under ``towers``), and the heatmap count the image tower's channel
    mode allows (`vision.check_channels`)."""
    # Imported here, not at the top: `daug-jax data prepare` imports this module, and does not
    # pay for importing the towers.
    from daug_jax import losses
    from daug_jax.diffusion import sampling  # lazy for the reason above
    from daug_jax.models import two_tower, vision  # the towers: lazy for the reason above

    switches = {"vision.kind": two_tower.VISION_KINDS, "text.kind": two_tower.TEXT_KINDS,
                "vision.channels": vision.CHANNELS, "vision.fill": two_tower.FILLS,
                "model.prompts": losses.PROMPT_FORMS, "label_policy": losses.LABEL_POLICIES,
                "heatmaps.reference": REFERENCES, "heatmaps.guidance": sampling.GUIDANCE_FORMS}
    for path, _, value in _leaves(config):
        for suffix, valid in switches.items():  # a switch's key is the end of a value's path
            if f".{path}".endswith(f".{suffix}") and value is not None and value not in valid:
                raise ValueError(f"config {path} = {value!r}: must be {_one_of(valid)}")
    channels = _section(config, "model", "vision", "channels")
    in_channels = _section(config, "model", "vision", "in_channels")
    if channels is not None and in_channels is not None:
        vision.check_channels(channels, int(in_channels))


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key of the first invalid value (see `_RULES`), and checks
    what ties keys together: the UNet's image size, the encode level against T and the
    classifier's trained level, train batch sizes against the device count."""
    for path, key, value in _leaves(config):
        rule = _RULES.get(key)
        if rule is not None and value is not None and not rule[0](value):
            raise ValueError(f"config {path} = {value!r}: must be {rule[1]}")
    _validate_switches(config)
    image_size, unet = _section(config, "data", "image_size"), _section(config, "unet")
    if unet is not None and image_size:
        factor = 2 ** (len(unet.channel_mult) - 1)
        if image_size % factor:
            raise ValueError(f"config data.image_size = {image_size}: the UNet's "
                             f"{len(unet.channel_mult)} levels need a multiple of {factor}")
    level = _section(config, "heatmaps", "level")
    num_steps = _section(config, "diffusion", "num_steps")
    if level is not None and isinstance(num_steps, int):
        top = num_steps - 1
        trained = _section(config, "classifier", "max_level")
        if level > top or (trained is not None and level > trained):
            raise ValueError(f"config heatmaps.level = {level}: must be <= T - 1 = {top} and <= "
                             f"the classifier's trained level classifier.max_level = {trained}")
    # Not at the top: `read_config` serves settings that must be read before JAX is imported.
    import jax

    devices = jax.device_count()
    for section in ("train", "unet_train", "classifier_train"):
        size = _section(config, section, "batch_size")
        if size is not None and size % devices:
            raise ValueError(f"config {section}.batch_size = {size}: must be divisible by the "
                             f"{devices} devices of the data mesh")
