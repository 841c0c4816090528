"""The house has no circle: no module of ``mlx_mtp/`` or ``convert/`` reaches
itself through imports, counting every import (at the top, inside a function,
under ``TYPE_CHECKING``), read from the source with :mod:`ast`.

A package's ``__init__`` importing its own submodules is not a circle back
from them (a submodule importing a sibling goes through the package).
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mlx_mtp", "convert")


def modules() -> Dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: Dict[str, Path]) -> Set[str]:
    """The project modules ``name`` imports, anywhere in its source."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".")
            base = base if node.level else node.module
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # a package is imported on the way to its submodules: not an arrow back
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def circles(graph: Dict[str, Set[str]]) -> List[Set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[Set[str]] = []

    def visit(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph() -> Dict[str, Set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """Relative (one and two levels up), absolute, from a package, inside a
    function and under TYPE_CHECKING: each is an arrow; a package's own
    ``__init__`` is not one."""
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    source = {
        "pkg/__init__.py": "",
        "pkg/a.py": "",
        "pkg/b.py": "import pkg.a\n",
        "pkg/sub/__init__.py": "from .c import x\n",
        "pkg/sub/c.py": "from ..a import y\n\ndef f():\n    from pkg import b\n",
        "pkg/sub/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n",
    }
    for name, text in source.items():
        (tmp_path / name).write_text(text)
    known = {name[:-3].replace("/__init__", "").replace("/", "."): tmp_path / name for name in source}
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert graph == {
        "pkg": set(),
        "pkg.a": set(),
        "pkg.b": {"pkg.a"},
        "pkg.sub": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.a", "pkg.b"},
        "pkg.sub.d": {"pkg.sub.c"},
    }
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert circles(graph) == []


def test_no_circle_in_the_house():
    found = [sorted(c) for c in circles(import_graph())]
    assert not found, f"import circles: {found}"
