"""Imports flow one way, and no module imports itself in a circle, lazy imports (inside functions) included: read from the
source with `ast`, so that an import a function makes only when it runs counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("danceopd", "danceopd_cli", "trainer", "router", "services", "experiments")
# Who may import whom (by top-level package; danceopd.testing counts as its own layer): the library knows nothing above it
ALLOWED = {
    "danceopd": {"danceopd"},
    "services": {"danceopd", "services"},
    "router": {"danceopd", "services", "router"},
    "trainer": {"danceopd", "services", "router", "trainer"},
    "danceopd.testing": {"danceopd", "danceopd.testing"},
    "experiments": {"danceopd", "services", "router", "trainer", "experiments"},
    "danceopd_cli": set(PACKAGES) | {"danceopd.testing"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def imports_of(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules that `name` imports anywhere in its source (a `from pkg import mod` of a submodule counts as
    the submodule)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import danceopd.models.base` is that module; a name inside a module: the module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def layer(module: str) -> str:
    return "danceopd.testing" if module.startswith("danceopd.testing") else module.split(".")[0]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(m, f, known) for m, f in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of modules with more than one member (Tarjan), as a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    import sys

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_itself_in_a_circle_lazy_imports_included():
    found = cycles(graph())
    assert found == [], "import cycles (lazy imports count): " + "; ".join(" -> ".join(c) for c in found)


def test_imports_flow_one_way():
    """The library (danceopd) depends on nothing of ours; services on it; the router on services' contracts; the trainer on
    all three; the test fixtures (danceopd.testing) on the library only, and only the CLI, benchmarks, scripts and tests
    import them."""
    wrong = sorted(f"{m} imports {t}" for m, targets in graph().items() for t in targets if layer(t) not in ALLOWED[layer(m)])
    assert wrong == []


def test_the_checker_sees_lazy_imports_and_cycles(tmp_path):
    """The checker itself: an import inside a function counts, and a circle through it is found."""
    known = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    known["a"].write_text("def f():\n    from b import g\n")
    known["b"].write_text("import a\n")
    g = {m: imports_of(m, f, known) for m, f in known.items()}
    assert g == {"a": {"b"}, "b": {"a"}} and cycles(g) == [["a", "b"]]
