"""The layers: no import cycle anywhere in the package, and the runtime never reaches the exporter or torch.

Every ``import`` statement of every module is read from the source (function-level imports included), so a lazy
import that closes a loop counts as one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folder → the import package it installs as (pyproject's [tool.scikit-build.wheel.packages]).
PACKAGES = {"src/memrerank": "memrerank", "export": "memrerank.export", "runtime": "memrerank.runtime",
            "calibration": "memrerank.calibration", "kernels": "memrerank.kernels"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules of the package that ``name`` imports, resolved to the deepest module that exists."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in GRAPH[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_walk_sees_the_package():
    """Guards the test itself: it finds the modules and the edges it is meant to judge."""
    assert {"memrerank.cli", "memrerank.runtime.reranker", "memrerank.export.pipeline",
            "memrerank.runtime.backends.base"} <= set(MODULES)
    assert "memrerank.manifest" in GRAPH["memrerank.runtime.reranker"]
    assert "memrerank.runtime" in GRAPH["memrerank.export.pipeline"] or \
        "memrerank.runtime.reranker" in _reach("memrerank.export.pipeline")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("memrerank.runtime")))
def test_runtime_never_reaches_the_exporter(module):
    reached = _reach(module)
    assert not [m for m in reached if m.startswith("memrerank.export")], f"{module} reaches the exporter"


def test_runtime_imports_no_heavy_dependency():
    """torch / transformers / optimum belong to the export extra only."""
    heavy = ("torch", "transformers", "optimum", "onnx.", "onnxscript")
    for module in sorted({"memrerank.runtime.reranker", *_reach("memrerank.runtime.reranker")}):
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.startswith(heavy) or n == "onnx"]
            assert not bad, f"{module} imports {bad}"


def _area(module: str) -> str:
    """What may share private names: a subpackage (``memrerank.runtime``, ``memrerank.export``…) as a whole, or
    one top-level module of ``memrerank`` (``memrerank.serve``) alone."""
    parts = module.split(".")
    if len(parts) > 1 and f"memrerank.{parts[1]}" in MODULES and MODULES[f"memrerank.{parts[1]}"].name == "__init__.py":
        return ".".join(parts[:2])
    return module


def _private_imports(name: str, path: Path, area: str | None) -> list[str]:
    """``from M import _x`` (and ``M._x`` on an imported module) where M is memrerank's and of another area than
    ``area`` (``None``: a bench script, outside every area)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases: dict[str, str] = {}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("memrerank") and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in MODULES:
                    aliases[a.asname or a.name] = full
                elif a.name.startswith("_") and not a.name.startswith("__") and _area(node.module) != area:
                    bad.append(f"{name}: from {node.module} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and _area(aliases[node.value.id]) != area):
            bad.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    return bad


def test_no_private_name_crosses_a_layer():
    """Export, the jobs and the benches use the runtime, serve and scale through their public names only (the
    scoring seam is :class:`memrerank.runtime.Scorer`, the options :class:`memrerank.runtime.LoadOptions`)."""
    bad = [b for name, path in MODULES.items() for b in _private_imports(name, path, _area(name))]
    bad += [b for path in sorted((ROOT / "bench").glob("*.py")) for b in _private_imports(path.name, path, None)]
    assert not bad, "private names used across layers:\n" + "\n".join(bad)


def test_the_private_name_check_sees_a_violation(tmp_path):
    """Guards the check: the import scale.py had (``serve._check_positive``) and an attribute reach are caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("from memrerank.serve import _check_positive, Limits\n"
                     "import memrerank.runtime.reranker as rr\nrr._check_text('x', 'y')\n")
    assert _private_imports("memrerank.scale", probe, "memrerank.scale") == [
        "memrerank.scale: from memrerank.serve import _check_positive",
        "memrerank.scale: memrerank.runtime.reranker._check_text"]
    assert _private_imports("memrerank.runtime.scorer", probe, "memrerank.runtime") == [
        "memrerank.runtime.scorer: from memrerank.serve import _check_positive"]  # the runtime's own: allowed


def test_building_options_loads_no_onnxruntime():
    """The CLI's parser, serve's config and LoadOptions start without onnxruntime or tokenizers (they load on the
    first Reranker), so ``memrerank -h`` and a config check stay fast."""
    import subprocess
    import sys

    code = ("import sys, memrerank.cli, memrerank.serve, memrerank.scale\n"
            "from memrerank import LoadOptions\nLoadOptions('int8', threads=2)\n"
            "print(sorted(m for m in ('onnxruntime', 'tokenizers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
