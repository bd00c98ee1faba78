"""The package's shape: no import cycle between its modules (function-local and TYPE_CHECKING
imports included, which is where a cycle hides), the verbs at the top level without a module shadowing them, and
a fast ``import edgerepvgg`` that loads no runtime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import edgerepvgg

PACKAGE = Path(edgerepvgg.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (AST, not executed)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        deps: set[str] = set()
        for node in ast.walk(tree):  # annotation-only (TYPE_CHECKING) imports count: they are dependencies too
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` depends on the submodule, not on pkg's __init__
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in modules] or [node.module]
                if len(targets) < len(subs):  # some names are attributes of node.module itself
                    targets.append(node.module)
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "edgerepvgg":  # the root only re-exports, lazily
                    deps.add(t)
        graph[name] = deps
    return graph


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
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "edgerepvgg._export" in graph["edgerepvgg._compare"]  # the graph sees real edges
    assert "edgerepvgg.quant.calibrate" in graph["edgerepvgg.cli"]  # function-local ones too
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_leaf_modules_import_nothing_heavy_from_the_package():
    graph = import_graph()
    assert graph["edgerepvgg.machine"] == set()
    assert graph["edgerepvgg.inputs"] == {"edgerepvgg.errors"}
    assert "edgerepvgg.data" not in graph["edgerepvgg.plain"] | graph["edgerepvgg._fuse"]  # no image decoding


def test_the_verbs_are_top_level_and_no_module_shadows_them():
    import importlib

    for verb in ("load_checkpoint", "fuse", "calibrate", "qat", "export", "compare"):
        assert callable(getattr(edgerepvgg, verb)), verb
    assert importlib.import_module("edgerepvgg._fuse").fuse is edgerepvgg.fuse
    assert not (PACKAGE / "fuse.py").exists() and not (PACKAGE / "export.py").exists() and not (PACKAGE / "compare.py").exists()


def test_import_edgerepvgg_loads_neither_torch_nor_a_runtime():
    code = ("import sys, edgerepvgg; heavy = [m for m in ('torch', 'onnxruntime', 'openvino', 'tensorrt', 'ai_edge_litert') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
