"""The layers of ``src/optiplug`` stay as docs/architecture.md draws them.

The imports are read with ``ast`` (nothing is executed): every ``import`` statement counts,
at module level, inside functions and under ``TYPE_CHECKING``. Two rules:

- no import cycle, lazy imports included;
- the plugin contract (everything outside ``optiplug.app``) never imports the app, and only the
  registry reaches the default plugin (``optiplug.builtin``), by module path.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ARCHITECTURE_DOC = SRC.parent / "docs" / "architecture.md"
PACKAGE = "optiplug"
APP = "optiplug.app"
# ``python -m optiplug`` starts the app's CLI.
ENTRY_MODULES = {"optiplug.__main__"}
# The one reference from the contract to the app: the deprecation path of the app names ``optiplug``
# exported up to 0.1 (``optiplug.MOVED_TO_APP``, each warning on use; removed in 0.3).
DEPRECATED_REFERENCES = {"optiplug": {"optiplug.app"}}


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


def named_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The optiplug modules that ``name`` names in a string (a lazy-import table, ``importlib.import_module``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and node.value in modules and node.value != name:
            found.add(node.value)
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
    assert "optiplug.hookspecs" in graph["optiplug.plugins"] and "optiplug.tables" in graph["optiplug.registry"]
    # lazy (function-level) imports are edges too
    assert "optiplug.app.adapters" in graph["optiplug.app.run"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_contract_never_imports_the_app():
    modules = module_names()
    wrong = {}
    for name, targets in import_graph().items():
        if in_app(name) or name in ENTRY_MODULES:
            continue
        named = named_modules(name, modules[name], modules) - DEPRECATED_REFERENCES.get(name, set())
        wrong[name] = sorted(target for target in targets | named if in_app(target))
    assert {name: targets for name, targets in wrong.items() if targets} == {}


def test_the_string_references_are_read():
    modules = module_names()
    assert "optiplug.trainer" in named_modules("optiplug", modules["optiplug"], modules)  # the lazy-name table
    assert named_modules("optiplug", modules["optiplug"], modules) & DEPRECATED_REFERENCES["optiplug"]


def test_the_app_names_moved_to_optiplug_app_warn_and_still_work():
    import warnings

    import optiplug
    import optiplug.app

    assert not set(optiplug.__all__) & optiplug.MOVED_TO_APP  # not part of the contract any more
    assert set(optiplug.app.__all__) == optiplug.MOVED_TO_APP
    for name in sorted(optiplug.MOVED_TO_APP):
        getattr(optiplug.app, name)  # imported first: importing transformers warns in its own ways
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = getattr(optiplug, name)
        assert value is getattr(optiplug.app, name)
        [warning] = caught
        assert warning.category is DeprecationWarning
        assert f"from optiplug.app import {name}" in str(warning.message)


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


def test_plugins_use_only_the_public_api():
    import optiplug

    wrong = []
    for path in sorted((SRC.parent / "plugins").glob("*/src/**/*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                wrong += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("optiplug.")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optiplug."):
                wrong.append(f"{path.name}: from {node.module} import ...")
            elif isinstance(node, ast.ImportFrom) and node.module == "optiplug":
                wrong += [f"{path.name}: optiplug.{a.name}" for a in node.names if a.name not in optiplug.__all__]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "optiplug":
                wrong += [f"{path.name}: optiplug.{node.attr}"] if node.attr not in optiplug.__all__ else []
    assert wrong == []


def test_the_testing_helpers_import_without_pytest():
    code = "import sys; sys.modules['pytest'] = None; import optiplug.testing; print(optiplug.testing.SEQ)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "16\n"


def test_the_old_helpers_module_still_exports_every_name_it_had():
    """Plugins written against ``optiplug.helpers`` (one module up to 0.1) keep importing from it."""
    import optiplug
    from optiplug import helpers, transformers_args

    had = {
        "STEP_BYTES",
        "TRAINING_ARGUMENT_FIELDS",
        "AdamFields",
        "Betas",
        "Kernel",
        "LearningRate",
        "adam_state_bytes",
        "kernel_kwargs",
        "moment_bytes",
        "optimizer_state_bytes",
        "tensor_bytes",
        "training_argument_value",
        "unwrap_optimizer",
    }
    assert set(helpers.__all__) == had
    for name in had - {"training_argument_value"}:
        assert getattr(helpers, name) is getattr(optiplug, name), name
    assert helpers.training_argument_value is transformers_args.training_argument_value


def documented_modules(section: str) -> set[str]:
    """The ``*.py`` files named in the first column of the table under ``## {section}`` in docs/architecture.md."""
    text = ARCHITECTURE_DOC.read_text(encoding="utf-8").split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([\w/]+\.py)`", row)}


def test_the_architecture_doc_lists_every_module_and_no_other():
    package = SRC / PACKAGE
    contract = {p.name for p in package.glob("*.py")} | {
        f"builtin/{p.name}" for p in (package / "builtin").glob("*.py")
    }
    assert documented_modules("The contract") == contract
    assert documented_modules("The app") == {p.name for p in (package / "app").glob("*.py")}


def test_nothing_in_the_package_imports_the_deprecated_helpers_module():
    importers = sorted(name for name, targets in import_graph().items() if "optiplug.helpers" in targets)
    assert importers == []  # it is a re-export kept for plugins written against 0.1
