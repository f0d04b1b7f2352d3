"""The house rules, checked on the source: no import cycle between trace_lib's packages, small modules,
a lazy top level, and the public API importable from ``trace_lib``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import trace_lib

ROOT = Path(trace_lib.__file__).resolve().parent
MAX_LINES = 520  # "no module over ~500 lines"


def _unit(path: Path) -> str:
    """The package (or top-level module) a file belongs to: ``capture``, ``audit``, ``cli``..."""
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0]


def _imported_units(path: Path) -> set[str]:
    """Every trace_lib unit a file imports, at module level or inside functions (lazy imports count too:
    they only defer a cycle, they do not remove it)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods = ([f"trace_lib.{a.name}" for a in node.names] if node.module == "trace_lib" else [node.module])
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        else:
            continue
        for m in mods:
            parts = m.split(".")
            if parts[0] == "trace_lib" and len(parts) > 1 and (ROOT / parts[1]).with_suffix(".py").exists() | (
                    ROOT / parts[1]).is_dir():
                out.add(parts[1])
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        unit = _unit(path)
        if unit in ("__init__", "__main__"):  # the public facade and `python -m trace_lib` sit on top
            continue
        graph.setdefault(unit, set()).update(u for u in _imported_units(path) if u != unit)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the strongly connected components with more than one node (the import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

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
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_packages():
    graph = import_graph()
    assert {"models", "capture", "quant", "sae", "cli"} <= set(graph)
    cycles = strongly_connected(graph)
    assert cycles == [], f"import cycles between trace_lib packages: {cycles}"


def test_lower_layers_never_import_upper_ones():
    graph = import_graph()
    foundations = {"errors", "cache", "_env", "progress", "jsonutil", "validate", "models", "quant", "capture"}
    upper = {"audit", "sweep", "redteam", "report", "cli", "organisms", "tracer", "fingerprint", "attribution"}
    for low in foundations & set(graph):
        assert not graph[low] & upper, f"{low} imports {graph[low] & upper}"
    assert all("cli" not in deps for unit, deps in graph.items() if unit != "cli")
    # the measurement bases (SAEs, metrics, probes) sit under the reference side's pieces and the views
    for basis in {"sae", "metrics", "probes"} & set(graph):
        assert not graph[basis] & (upper | {"compare"}), f"{basis} imports {graph[basis] & (upper | {'compare'})}"
    assert "probes" in graph and "probes" in graph["audit"]


def test_no_source_module_is_oversized():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in ROOT.rglob("*.py")}
    big = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert big == {}, f"modules over {MAX_LINES} lines: {big}"


def test_importing_trace_lib_and_parsing_arguments_loads_no_torch():
    code = ("import sys, trace_lib, trace_lib.cli, trace_lib.validate, trace_lib.quant.config; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_public_api_is_importable_from_the_top_level():
    for name in trace_lib.__all__:
        assert getattr(trace_lib, name) is not None
    from trace_lib.redteam import RedTeam
    from trace_lib.sae import SAE, load_sae
    from trace_lib.tracer import ModelTracer

    assert (trace_lib.ModelTracer, trace_lib.RedTeam, trace_lib.SAE, trace_lib.load_sae) == (
        ModelTracer, RedTeam, SAE, load_sae)
    assert {"Audit", "HookManager", "ModelTracer", "RedTeam", "SAE", "load_sae", "load_model"} <= set(dir(trace_lib))
