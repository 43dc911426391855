"""Loading experiment configs: ``experiments/<name>.py`` defines ``get_config() -> ConfigDict``.

The CLI only loads a config, applies ``key.sub=value`` overrides and calls library functions.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
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
