"""The layers of ``src/optiplug`` stay as docs/architecture.md draws them.

The imports are read with ``ast`` (nothing is executed): every ``import`` statement counts,
at module level, inside functions and under ``TYPE_CHECKING``. Two rules:

- no import cycle, lazy imports included;
- the plugin contract (everything outside ``optiplug.app``) never imports the app, and only the
  registry reaches the default plugin (``optiplug.builtin``), by module path.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "optiplug"
APP = "optiplug.app"
# The facade imports the contract at module level and reaches the app only through its lazy name
# table (strings); ``python -m optiplug`` starts the app's CLI.
ENTRY_MODULES = {"optiplug.__main__"}


def module_names() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The optiplug modules that ``name`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from optiplug.app import run`` imports the module optiplug.app.run
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # ``import optiplug.app.run as r`` -> the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def in_app(name: str) -> bool:
    return name == APP or name.startswith(APP + ".")


def test_the_graph_is_read():
    graph = import_graph()
    assert "optiplug.registry" in graph and "optiplug.app.run" in graph
    assert "optiplug.hookspecs" in graph["optiplug.registry"]
    # lazy (function-level) imports are edges too
    assert "optiplug.app.adapters" in graph["optiplug.app.run"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_contract_never_imports_the_app():
    wrong = {
        name: sorted(target for target in targets if in_app(target))
        for name, targets in import_graph().items()
        if not in_app(name) and name not in ENTRY_MODULES
    }
    assert {name: targets for name, targets in wrong.items() if targets} == {}


def test_only_the_registry_names_the_default_plugin():
    importers = sorted(
        name
        for name, targets in import_graph().items()
        if not name.startswith("optiplug.builtin") and any(t.startswith("optiplug.builtin") for t in targets)
    )
    assert importers == []  # the registry loads it by module path, as it loads any plugin


def test_using_the_contract_loads_no_app_module():
    code = (
        "import sys, optiplug\n"
        "optiplug.list_optimizers(); optiplug.parse_optimizer('adamw', lr=1e-3); optiplug.AdamFields\n"
        "print(sorted(m for m in sys.modules if m.startswith('optiplug.app')))\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "False False"]
