"""Loading experiment configs: ``experiments/<name>.py`` defines ``get_config() -> ConfigDict``.

The CLI only loads a config, applies ``key.sub=value`` overrides and calls library functions.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import os

import ml_collections


def load_config(name_or_path: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Loads ``experiments.<name>`` or a ``.py`` file path and applies ``a.b=value`` overrides."""
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
            raise ValueError(f"unknown config {name_or_path!r} (no experiments/{name_or_path}.py)") from err
    config = module.get_config()
    apply_overrides(config, overrides or [])
    validate(config)
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Applies ``["train.steps=100", "data.name='x'"]`` in place; values parsed as Python literals."""
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
def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Leaf name -> (check, what it must be).  Keys are checked wherever they occur in a config.
_RULES = {
    **{k: (_positive_int, "a positive integer") for k in (
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
        "clip_weight", "dropout", "ema_decay")},
    "percentile": (lambda v: _number(v) and 0 < v <= 100, "a number in (0, 100]"),
    "sweep_scales": (lambda v: all(_number(s) and s >= 0 for s in v), "numbers >= 0"),
    "sweep_levels": (lambda v: len(v) > 0 and all(_count(s) for s in v), "integers >= 0"),
    "train_split": (lambda v: isinstance(v, str) and all(p.strip() for p in v.split("+")),
                    "a split name or a union such as 'train+validation'"),
    "label_policy": (lambda v: v in ("ignore", "ones", "zeros"), "'ignore', 'ones' or 'zeros'"),
    "prompts": (lambda v: v in ("single", "paired"), "'single' or 'paired'"),
    "reference": (lambda v: v in ("x0", "reconstruction"), "'x0' or 'reconstruction'"),
    # Tower backbones (model.vision.kind: resnet | clip; model.text.kind: bert | clip, checked
    # per tower in `validate`) and the image tower's heatmap channel mode.
    "kind": (lambda v: v in ("resnet", "bert", "clip"), "'resnet' or 'clip' (vision), "
             "'bert' or 'clip' (text)"),
    "channels": (lambda v: v in ("stack", "replace", "add"), "'stack', 'replace' or 'add'"),
    "path": (lambda v: isinstance(v, str), "a directory path ('' for none)"),
    **{k: (lambda v: isinstance(v, bool), "True or False") for k in (
        "remat", "learn_logit_scale")},
    "logit_scale_init": (_number, "a finite number (the log of the initial CLIP logit scale)"),
}


def _leaves(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            yield from _leaves(value, path + ".")
        else:
            yield path, key, value


def _validate_towers(config: ml_collections.ConfigDict) -> None:
    """Each tower's kind, and the heatmap count the image tower's channel mode allows."""
    model = config.get("model", None) or {}
    for tower, kinds in (("vision", ("resnet", "clip")), ("text", ("bert", "clip"))):
        kind = (model.get(tower, None) or {}).get("kind", None)
        if kind is not None and kind not in kinds:
            raise ValueError(f"config model.{tower}.kind = {kind!r}: must be "
                             f"{' or '.join(map(repr, kinds))}")
    vision = model.get("vision", None) or {}
    if vision.get("channels", None) is not None and vision.get("in_channels", None) is not None:
        from daug_jax.models.backbones import check_channels

        check_channels(vision["channels"], int(vision["in_channels"]))


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key of the first invalid value (see `_RULES`), and checks
    what ties keys together: the UNet's image size, the encode level against T and the
    classifier's trained level, train batch sizes against the device count."""
    for path, key, value in _leaves(config):
        rule = _RULES.get(key)
        if rule is not None and value is not None and not rule[0](value):
            raise ValueError(f"config {path} = {value!r}: must be {rule[1]}")
    _validate_towers(config)
    data, unet = config.get("data", {}), config.get("unet", None)
    if unet is not None and data.get("image_size"):
        factor = 2 ** (len(unet.channel_mult) - 1)
        if data.image_size % factor:
            raise ValueError(f"config data.image_size = {data.image_size}: the UNet's "
                             f"{len(unet.channel_mult)} levels need a multiple of {factor}")
    level = config.get("heatmaps", {}).get("level", None)
    num_steps = config.get("diffusion", {}).get("num_steps", None)
    if level is not None and isinstance(num_steps, int):
        top = num_steps - 1
        trained = config.get("classifier", {}).get("max_level", None)
        if level > top or (trained is not None and level > trained):
            raise ValueError(f"config heatmaps.level = {level}: must be <= T - 1 = {top} and <= "
                             f"the classifier's trained level classifier.max_level = {trained}")
    import jax

    devices = jax.device_count()
    for section in ("train", "unet_train", "classifier_train"):
        size = config.get(section, {}).get("batch_size", None)
        if size is not None and size % devices:
            raise ValueError(f"config {section}.batch_size = {size}: must be divisible by the "
                             f"{devices} devices of the data mesh")
