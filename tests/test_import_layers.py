"""The package imports one way: no import circle, rendering at the top, no private helpers
borrowed across modules.

Every import counts, also those inside functions and under TYPE_CHECKING: each one is a
dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bnexport"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement of the module."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, []) if sub in known else (base, [alias.name]))
    return [(m, names) for m, names in found if m.split(".")[0] == "bnexport"]


def import_graph() -> dict[str, dict[str, list[str]]]:
    """module -> {imported bnexport module: names taken from it}."""
    modules = _modules()
    graph: dict[str, dict[str, list[str]]] = {}
    for name, path in modules.items():
        edges: dict[str, list[str]] = {}
        for target, names in _imports(name, path, set(modules)):
            if target != name:
                edges.setdefault(target, []).extend(names)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "bnexport.cli" in graph and "bnexport.report" in graph
    assert "bnexport.errors" in graph["bnexport.cli"]


def test_the_cycle_finder_finds_a_circle():
    graph = {"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b": []}, "b": {}}) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_private_helper_is_imported_from_another_module():
    borrowed = [
        f"{module} takes {name} from {target}"
        for module, edges in import_graph().items()
        for target, names in edges.items()
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert borrowed == []


RENDERING = {"bnexport.render", "bnexport.cli"}
BELOW_RENDERING = [
    "bnexport.report",
    "bnexport.export",
    "bnexport.verify",
    "bnexport.half",
    "bnexport.folding",
    "bnexport.stats",
    "bnexport.load",
    "bnexport.load_onnx",
]


@pytest.mark.parametrize("prefix", BELOW_RENDERING)
def test_lower_layers_do_not_import_rendering(prefix):
    graph = import_graph()
    offenders = [
        f"{module} imports {target}"
        for module, edges in graph.items()
        if module == prefix or module.startswith(prefix + ".")
        for target in edges
        if target in RENDERING or target == "bnexport.runs" or target.startswith("bnexport.runs.")
    ]
    assert offenders == []


def test_report_types_import_nothing_above_them():
    allowed = {"bnexport.errors", "bnexport.formatting", "bnexport.version"}
    assert set(import_graph()["bnexport.report"]) <= allowed


def test_runs_core_does_not_import_a_command():
    """The shared core of `runs` sits below the command modules that compose it."""
    graph = import_graph()
    commands = {m for m in graph if m.startswith("bnexport.runs.") and m in COMMAND_MODULES}
    core = {m for m in graph if m.startswith("bnexport.runs.") and m not in commands}
    offenders = [f"{m} imports {t}" for m in sorted(core) for t in graph[m] if t in commands]
    assert offenders == []


COMMAND_MODULES = {
    "bnexport.runs.fold",
    "bnexport.runs.fold_checkpoint",
    "bnexport.runs.fold_onnx",
    "bnexport.runs.verify_file",
    "bnexport.runs.inspect_model",
    "bnexport.runs.recalibrate_model",
}


def test_runs_modules_are_short():
    long = {
        p.name: n
        for p in sorted((PACKAGE / "runs").glob("*.py"))
        if (n := len(p.read_text().splitlines())) > 350
    }
    assert long == {}


# The layers of docs/how-it-works.md ("The code"), top to bottom: a module may import its own
# layer and those below it, never one above.
LAYERS = [
    ("command line", ["bnexport.cli", "bnexport.__main__"]),
    ("runs", ["bnexport.runs"]),
    ("rendering", ["bnexport.render"]),
    (
        "stages",
        [
            "bnexport.export",
            "bnexport.verify",
            "bnexport.layer_check",
            "bnexport.layer_cut",
            "bnexport.input_profile",
            "bnexport.half",
            "bnexport.stats",
        ],
    ),
    ("engines", ["bnexport.folding"]),
    (
        "loading",
        [
            "bnexport.load",
            "bnexport.load_onnx",
            "bnexport.source",
            "bnexport.onnx_runtime",
            "bnexport.outputs",
            "bnexport.inputs",
            "bnexport.trace",
        ],
    ),
    ("data", ["bnexport.report"]),
    (
        "base",
        [
            "bnexport.errors",
            "bnexport.defaults",
            "bnexport.formatting",
            "bnexport.files",
            "bnexport.interrupts",
            "bnexport.version",
        ],
    ),
]


def _layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if m != "bnexport" and _layer_of(m) is None] == []


def test_no_module_imports_a_layer_above_it():
    upward = [
        f"{module} ({LAYERS[_layer_of(module)][0]}) imports {target}"
        for module, edges in import_graph().items()
        if _layer_of(module) is not None
        for target in edges
        if _layer_of(target) is not None and _layer_of(target) < _layer_of(module)
    ]
    assert upward == []
