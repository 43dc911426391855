"""The library stays readable: names are imported from the module that defines them (no
re-export), config defaults live in the configs, imports sit at the top of a module unless a
comment says why not, signatures stay narrow, and the library never imports ``experiments``.

Read statically with ``ast``; each limit is the one the code was refactored to.
"""

from __future__ import annotations

import ast
import pathlib

from test_imports import ROOT, module_files

LIBRARY = module_files(ROOT, "daug_jax")
MAX_PARAMETERS = 8
MAX_GET_DEFAULTS = 40
MAX_LOCAL_IMPORTS = 30
# 9,000 after the refactor; then `daug-jax experiment` on any registered dataset (what runs
# follows the dataset's reports and regions, the checks before training, two figures).
MAX_LINES = 9200


def _trees():
    for name, path in LIBRARY.items():
        text = path.read_text()
        yield name, path, text, ast.parse(text, str(path))


def _used_names(tree: ast.Module) -> set[str]:
    """Every name read anywhere in ``tree`` (and the first part of every dotted access)."""
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def test_no_module_re_exports_another_module_s_names():
    """An imported name a module never uses is either dead or there for someone else to import
    from the wrong place; a package's ``__init__`` may present its own modules."""
    offenders = []
    for name, path, _, tree in _trees():
        if path.name == "__init__.py":
            continue
        used = _used_names(tree)
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    bound = alias.asname or alias.name
                    if bound != "annotations" and bound not in used:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {bound}")
    assert not offenders, "imported but unused (a re-export?):\n  " + "\n  ".join(offenders)


def test_signatures_are_narrow():
    wide = []
    for _, path, _, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
                count = len(names) + bool(a.vararg) + bool(a.kwarg) - (names[:1] in (["self"],
                                                                                     ["cls"]))
                if count > MAX_PARAMETERS:
                    wide.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({count})")
    assert not wide, f"functions with more than {MAX_PARAMETERS} parameters:\n  " + "\n  ".join(wide)


def test_defaults_live_in_the_configs():
    """``x.get(key, default)`` repeats a default that belongs in ``experiments/`` when ``x`` is
    a config; the few left read JSON metadata, records and tables."""
    calls = [f"{path.relative_to(ROOT)}:{node.lineno}"
             for _, path, _, tree in _trees() for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr == "get" and len(node.args) + len(node.keywords) >= 2]
    assert len(calls) <= MAX_GET_DEFAULTS, calls


def test_local_imports_are_few_and_say_why():
    local, silent = [], []
    for _, path, text, tree in _trees():
        lines = text.splitlines()
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    if where in local:
                        continue
                    local.append(where)
                    said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                    if not said:
                        silent.append(where)
    assert len(local) <= MAX_LOCAL_IMPORTS, local
    assert not silent, "function-local imports without a comment saying why:\n  " + "\n  ".join(silent)


def test_the_library_never_imports_experiments_and_stays_compact():
    imports = [f"{path.relative_to(ROOT)}:{node.lineno}"
               for _, path, _, tree in _trees() for node in ast.walk(tree)
               if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("experiments"))
               or (isinstance(node, ast.Import)
                   and any(a.name.startswith("experiments") for a in node.names))]
    assert not imports, imports
    lines = sum(len(text.splitlines()) for _, _, text, _ in _trees())
    assert lines <= MAX_LINES, lines


def test_the_checks_catch_what_they_look_for(tmp_path, monkeypatch):
    """A module that re-exports and takes nine parameters is caught."""
    import test_code_shape as me

    (tmp_path / "daug_jax").mkdir()
    (tmp_path / "daug_jax" / "__init__.py").write_text("")
    (tmp_path / "daug_jax" / "a.py").write_text("def f(x):\n    return x\n")
    (tmp_path / "daug_jax" / "b.py").write_text(
        "from daug_jax.a import f  # noqa: F401\n\n\ndef g(a, b, c, d, e, f, g, h, i):\n"
        "    return a\n")
    monkeypatch.setattr(me, "LIBRARY", module_files(pathlib.Path(tmp_path), "daug_jax"))
    monkeypatch.setattr(me, "ROOT", pathlib.Path(tmp_path))
    for check, message in ((test_no_module_re_exports_another_module_s_names, "b.py:1 f"),
                           (test_signatures_are_narrow, "g (9)")):
        try:
            check()
        except AssertionError as err:
            assert message in str(err)
        else:
            raise AssertionError(f"{check.__name__} passed on a bad module")


# What the library reads from each section of a config, with no default of its own.
SECTION_KEYS = {
    "train": {"batch_size", "steps", "lr", "warmup", "weight_decay", "grad_clip",
              "learn_logit_scale", "clip_weight", "checkpoint_every", "skip_nonfinite",
              "log_every", "seed", "input_threads", "prng_impl", "member_chunk",
              "compiler_options"},
    "unet_train": {"steps", "batch_size", "learning_rate", "warmup_steps", "weight_decay",
                   "grad_clip", "seed", "save_every", "log_every", "skip_nonfinite",
                   "input_threads", "prng_impl", "ema_decay"},
    "classifier_train": {"steps", "batch_size", "learning_rate", "warmup_steps", "weight_decay",
                         "grad_clip", "seed", "save_every", "log_every", "skip_nonfinite",
                         "input_threads", "prng_impl"},
    "heatmaps": {"targets", "level", "num_steps", "scale", "smooth_sigma", "reference", "unroll",
                 "guidance", "batch_size", "shard_size", "dtype", "calibration", "localization"},
    "unet": {"ch", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
             "norm_groups", "dtype", "class_cond", "label_dropout"},
    "localization": {"cases_per_class", "pool_size", "sweep_scales", "sweep_levels", "sweep_moves",
                     "validation_cases_per_class", "examples_per_class", "batch_size"},
    "data": {"name", "data_dir", "image_size", "train_split", "label_policy", "seed"},
}


def _missing(config, where=""):
    out = []
    for section, keys in SECTION_KEYS.items():
        node = config.get(section, None)
        if node is None or (section == "data" and "name" not in node):
            continue  # the demo's data section is its own (in-memory films)
        out += [f"{where}{section}.{k}" for k in sorted(keys - set(node))]
        if section == "heatmaps" and "localization" in node:
            out += _missing({"localization": node.localization}, f"{where}heatmaps.")
    for sub in ("diffusion", "towers"):  # the demo nests whole stage configs
        if hasattr(config.get(sub, None), "keys") and {"unet", "model"} & set(config[sub]):
            out += _missing(config[sub], f"{where}{sub}.")
    return out


def test_every_experiment_config_carries_what_the_library_reads():
    import pkgutil

    import experiments
    from daug_jax.config import read_config

    names = [m.name for m in pkgutil.iter_modules(experiments.__path__) if m.name != "bench"]
    missing = {name: _missing(read_config(name)) for name in names + ["demo:quick"]}
    assert not any(missing.values()), {k: v for k, v in missing.items() if v}
    config = read_config("demo")
    del config.towers.train["prng_impl"]  # the check can fail
    assert _missing(config) == ["towers.train.prng_impl"]
