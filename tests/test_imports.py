"""The modules of ``daug_jax`` import each other without cycles.

Read statically (``ast``, nothing is imported): every ``import`` and ``from ... import`` at any
depth counts, function-level lazy imports and ``TYPE_CHECKING`` blocks included, since a cycle
through a lazy import is still a cycle in the design.  ``from pkg import name`` is an edge to the
submodule ``pkg.name`` when there is one, else to ``pkg``; importing a submodule is not counted
as importing its parent packages (a package's ``__init__`` may import its own submodules).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def module_files(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """{dotted module name: file} of every module under ``root / package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _target(name: str, modules: dict) -> str | None:
    """The longest prefix of dotted ``name`` that is one of ``modules`` (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def _statements(tree: ast.Module):
    """Every statement of ``tree`` at any depth (imports are statements: no need to visit the
    far more numerous expression nodes)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            stack.extend(getattr(node, field, ()))


def _imports(name: str, path: pathlib.Path, modules: dict):
    """(imported module, line) of every import in module ``name`` of ours."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in _statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield _target(alias.name, modules), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in modules else _target(base, modules)), node.lineno


def import_graph(root: pathlib.Path, package: str) -> dict[str, dict[str, str]]:
    """{module: {imported module: "file:line" of the first such import}}, our modules only."""
    modules = module_files(root, package)
    graph = {}
    for name, path in modules.items():
        edges = graph[name] = {}
        for target, line in sorted(_imports(name, path, modules), key=lambda x: x[1]):
            if target is not None and target != name:
                edges.setdefault(target, f"{path.relative_to(root)}:{line}")
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of ``graph`` with each edge's "file:line", or None."""
    state = {}  # absent: unvisited; 1: on the current path; 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                loop = path[path.index(nxt):] + [nxt]
                return [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(loop, loop[1:])]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_daug_jax_has_no_import_cycles():
    graph = import_graph(ROOT, "daug_jax")
    assert len(graph) > 20 and "daug_jax.data.synthetic" in graph["daug_jax.data.builders"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n  " + "\n  ".join(cycle)


@pytest.mark.parametrize("b_imports_a", [
    "from pkg import a",  # a submodule named in `from package import name`
    "def f():\n    import pkg.a",  # a lazy import
    "def f():\n    from . import a",  # relative
    "from .a import thing",
])
def test_a_cycle_is_found(tmp_path, b_imports_a):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    files = {"__init__.py": "from pkg import sub\n", "b.py": b_imports_a + "\n",
             "a.py": "import numpy\nfrom pkg.sub import c\n", "sub/__init__.py": "",
             "sub/c.py": "from .. import b\n"}
    for name, text in files.items():
        (tmp_path / "pkg" / name).write_text(text)
    cycle = find_cycle(import_graph(tmp_path, "pkg"))
    assert cycle is not None and [edge.split(" (")[0] for edge in cycle] == [
        "pkg.a -> pkg.sub.c", "pkg.sub.c -> pkg.b", "pkg.b -> pkg.a"]
    (tmp_path / "pkg" / "b.py").write_text("import pkg.sub\n")  # the package, not a: no cycle
    assert find_cycle(import_graph(tmp_path, "pkg")) is None
