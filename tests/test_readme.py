"""The README's hybrid-loss example runs as written, and its reading tour is the real path."""

import ast
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_loss_example_runs(capsys):
    text = README.read_text()
    section = text.split("## The hybrid loss", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split(" ", 1)
    assert np.isfinite(float(printed[0])) and "image_text" in printed[1]


# ----------------------------------------------------------------------------- the reading tour
def _library():
    """{"module:Name": (definition node, its lines)} of every top-level function and class of
    daug_jax, and {"module:Name": the library definitions its body names}."""
    root = README.parent
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in sorted((root / "daug_jax").rglob("*.py"))}
    defs, uses = {}, {}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        imported = {}  # local name -> "module" or "module:Name" of ours
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("daug_jax"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    imported[alias.asname or alias.name] = (
                        sub if sub in files else f"{node.module}:{alias.name}")
        top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            key = f"{module}:{node.name}"
            defs[key] = node.end_lineno - node.lineno + 1
            uses[key] = set()
            for n in ast.walk(node):
                if isinstance(n, ast.Name) and n.id in top:
                    uses[key].add(f"{module}:{n.id}")
                elif isinstance(n, ast.Name) and ":" in imported.get(n.id, ""):
                    uses[key].add(imported[n.id])
                elif (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                      and ":" not in imported.get(n.value.id, ":")):
                    uses[key].add(f"{imported[n.value.id]}:{n.attr}")
    return defs, uses


def _reach(uses, start):
    seen, todo = set(), list(start)
    while todo:
        key = todo.pop()
        if key in uses and key not in seen:
            seen.add(key)
            todo.extend(uses[key])
    return seen


def test_reading_tour_is_the_path_the_commands_take():
    """Every definition the README's tour names exists and is reached from the ``main`` of a
    command (`cli.COMMANDS`) through the definitions the code names; the tour's line count,
    stated in the README, is what following it crosses (the named definitions and everything
    they use, transitively, each once) and stays within 1,200 lines."""
    from daug_jax.cli import COMMANDS

    text = README.read_text().split("### Reading the code", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`daug_jax/([\w/]+)\.py:(\w+)(?:\.\w+)?`", text)
    assert len(named) >= 12
    tour = {"daug_jax." + path.replace("/", ".") + ":" + name for path, name in named}
    defs, uses = _library()
    assert tour <= set(defs), sorted(tour - set(defs))
    from_commands = _reach(uses, {f"{module}:main" for module, _ in COMMANDS.values()})
    assert tour <= from_commands, sorted(tour - from_commands)
    lines = sum(defs[key] for key in _reach(uses, tour))
    stated = re.search(r"crosses \*\*([\d,]+) library lines\*\*", text)
    assert stated and int(stated.group(1).replace(",", "")) == lines, lines
    assert lines <= 1200
