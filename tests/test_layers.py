"""The package's layers, read from the source: no module imports one above it, and no two import each other.

Bottom to top: errors/_lazy/version, io, layers/device, stats, routing, methods, engine (config, plan, step,
executor, memory, hooks, card, vocab), api/search/extract, evaluate (tasks, scorers, sweep worker, backends), tune/bench/analysis (none
importing another), cli.  An import inside a function counts the same as one at
the top (it is a dependency too)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "submerge"


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        mod = _module_of(path)
        deps = out.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("submerge"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("submerge"))
    return out


def _group(mod: str) -> str:
    """The unit a layer is made of: a subpackage (``submerge.stats``) or a top-level module."""
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else mod


def test_no_two_units_import_each_other():
    graph: dict[str, set[str]] = {}
    for mod, deps in _imports().items():
        g = _group(mod)
        graph.setdefault(g, set()).update(_group(d) for d in deps if _group(d) not in (g, "submerge"))
    _assert_acyclic(graph, "import cycle")


def _assert_acyclic(graph: dict[str, set[str]], what: str) -> None:
    """Depth-first search with colours; the first cycle found is the failure, named node by node."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> None:
        colour[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if colour.get(v) == 1:
                raise AssertionError(f"{what}: " + " -> ".join(stack[stack.index(v):] + [v]))
            if colour.get(v) is None:
                visit(v)
        stack.pop()
        colour[u] = 2

    for u in sorted(graph):
        if colour.get(u) is None:
            visit(u)


def test_lower_layers_never_import_higher_ones():
    below = {  # unit -> units it must never import
        "submerge.io": {"submerge.stats", "submerge.methods", "submerge.routing", "submerge.engine"},
        "submerge.layers": {"submerge.stats", "submerge.methods", "submerge.routing", "submerge.io"},
        "submerge.stats": {"submerge.methods", "submerge.routing", "submerge.engine", "submerge.analysis"},
        "submerge.routing": {"submerge.methods", "submerge.engine", "submerge.api"},
        "submerge.methods": {"submerge.engine", "submerge.api", "submerge.tune", "submerge.bench",
                             "submerge.analysis"},
        "submerge.engine": {"submerge.api", "submerge.tune", "submerge.bench", "submerge.analysis", "submerge.cli"},
        # mergekit-moe's job: beside the merge engine (it reuses its model resolution), below the commands
        "submerge.moe": {"submerge.methods", "submerge.api", "submerge.tune", "submerge.bench", "submerge.analysis",
                         "submerge.cli"},
        # the evaluation seam lies below the three commands that score models; they share it, not each other
        "submerge.evaluate": {"submerge.tune", "submerge.bench", "submerge.analysis", "submerge.cli"},
        "submerge.tune": {"submerge.bench", "submerge.analysis"},
        "submerge.bench": {"submerge.tune", "submerge.analysis"},
        "submerge.analysis": {"submerge.tune", "submerge.bench"},
    }
    modules_below = {  # inside a unit
        "submerge.engine.card": {"submerge.engine.executor"},
        "submerge.engine.step": {"submerge.engine.executor", "submerge.engine.memory", "submerge.engine.plan"},
        "submerge.methods.kernels": {"submerge.methods.registry"},  # pure tensor kernels: no engine state
        "submerge.bench.session": {"submerge.bench.rows", "submerge.bench.adaptive", "submerge.bench.run",
                                   "submerge.bench.ray", "submerge.bench.cache"},
    }
    bad = []
    for mod, deps in _imports().items():
        for d in deps:
            if _group(d) in below.get(_group(mod), ()) or d in modules_below.get(mod, ()):
                bad.append(f"{mod} imports {d}")
    assert not bad, bad


def test_the_graph_is_read():  # the checks above are not vacuous
    imports = _imports()
    assert "submerge.stats.gram" in imports and "submerge.stats.folder" in imports["submerge.stats.gram"]
    assert "submerge.layers" in imports["submerge.methods.esm"]


def test_tensors_are_written_only_through_io():
    """Every safetensors file a command delivers is written by submerge.io (ShardWriter, or save_tensors, which
    checks each tensor finite first): no module elsewhere calls safetensors' save_file itself, so a new command
    cannot forget the check.  The one exception is a method's scratch spill, which its own run reads back."""
    scratch = {"submerge.methods.esm"}
    bad = []
    for path in SRC.rglob("*.py"):
        mod = _module_of(path)
        if mod.startswith("submerge.io") or mod in scratch:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "safetensors.torch" and \
                    any(a.name in ("save_file", "save") for a in node.names):
                bad.append(mod)
    assert not bad, f"modules writing safetensors files directly (use submerge.io.writer.save_tensors): {bad}"


def test_no_private_name_crosses_a_unit_and_nothing_imports_the_package_face():
    """A ``_name`` is its unit's own business: no other unit imports it.  The package face (``submerge``'s
    ``__init__``) re-exports the public API for users; modules inside the package import what they need from
    where it lives (``submerge.version`` for the version), never from the face above them."""
    bad = []
    for path in SRC.rglob("*.py"):
        mod = _module_of(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            if node.module == "submerge" and mod != "submerge":
                bad.append(f"{mod} imports {[a.name for a in node.names]} from the package face")
            elif node.module.startswith("submerge.") and _group(node.module) != _group(mod):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                if private:
                    bad.append(f"{mod} imports private {private} from {node.module}")
        if '__import__("submerge")' in path.read_text():
            bad.append(f"{mod} reaches the package face through __import__")
    assert not bad, bad


def test_no_module_cycles_inside_a_unit():
    """Inside a unit too, modules form layers (``bench``: session -> presets -> adaptive -> rows -> cache -> ray ->
    run): no module imports one that imports it back, however far round.  A package's ``__init__`` (its face,
    re-exporting its modules) is not a module of the graph."""
    imports = _imports()
    packages = {m for m in imports if (SRC.parent / m.replace(".", "/") / "__init__.py").exists()}
    graph = {m: {d for d in deps if d not in packages and d != m and d in imports}
             for m, deps in imports.items() if m not in packages}
    _assert_acyclic(graph, "module import cycle")
    assert "submerge.bench.rows" in graph and "submerge.bench.adaptive" in graph["submerge.bench.rows"]
