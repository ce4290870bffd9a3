"""The library's import rules (docs/ARCHITECTURE.md, "Layers"): each sub-package imports only its own layer
or lower ones, and no module imports another that (directly or not) imports it back. Imports inside
functions count; type-only imports under ``if TYPE_CHECKING:`` are never executed and do not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import adapterfmt

PACKAGE = Path(adapterfmt.__file__).parent
LAYERS = {
    "errors": 0, "threads": 0, "tiny": 0, "_version": 0,
    "plugin": 1,
    "format": 2,
    "deltas": 3, "kernels": 3,
    "verbs": 4,
    "authoring": 5, "hub": 5,
    "demo": 6,
}
"""Layer of each top-level module or sub-package; the package root (``__init__``, the public API) and the
``conformance`` alias sit above all of them."""
TOP = {"adapterfmt", "adapterfmt.conformance"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[1:2] and parts[1] in ("plugins", "cli", "spec"):  # separate trees mapped into the namespace
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The adapterfmt modules ``module`` imports (anywhere in the file, except type-only imports)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "adapterfmt")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "adapterfmt":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m != module}


def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: {t for t in imports(m, p, known) if t in known} for m, p in mods.items()}


def layer(module: str) -> int | None:
    if module in TOP:
        return None
    return LAYERS[module.split(".")[1]]


def test_every_module_has_a_layer():
    missing = sorted(m for m in _modules() if m not in TOP and m.split(".")[1] not in LAYERS)
    assert not missing, f"modules outside every layer: {missing}"


def test_no_upward_imports():
    upward = []
    for src, targets in graph().items():
        ls = layer(src)
        for t in targets:
            lt = layer(t)
            if ls is not None and (lt is None or lt > ls):
                upward.append(f"{src} (layer {ls}) imports {t} (layer {lt if lt is not None else 'top'})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_circles():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize("package", sorted(k for k in LAYERS if (PACKAGE / k).is_dir()))
def test_each_layer_package_says_what_it_holds_and_may_import(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
    assert "May import" in doc, f"adapterfmt/{package}/__init__.py docstring must say what it may import"
