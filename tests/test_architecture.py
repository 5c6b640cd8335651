"""The package's shape (docs/ARCHITECTURE.md): imports go one way, private names stay in their module, and every
public exception is a PersonavecError."""

from __future__ import annotations

import ast
import importlib
import inspect
from collections import defaultdict
from pathlib import Path

import pytest

import personavec
from personavec.errors import PersonavecError

PACKAGE = Path(personavec.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Nodes under ``if TYPE_CHECKING:``: annotations only, never executed."""
    return {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """The run-time import graph among the package's modules (module-level and function-level imports; ``from pkg
    import submodule`` is an import of the submodule), and every private name imported from another module."""
    edges: dict[str, set[str]] = defaultdict(set)
    private = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        edges[name].add(sub)
                    elif base in modules:
                        edges[name].add(base)
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            private.append(f"{name} imports {alias.name} from {base}")
        edges[name].discard(name)
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    modules = _modules()
    edges, _ = _imports(modules)
    assert sum(len(v) for v in edges.values()) > 100  # the walk sees the package's imports
    assert _cycles(edges) == []


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_imported_from_another_module() -> None:
    _, private = _imports(_modules())
    assert private == []


# Not errors, on purpose: the two interrupts are KeyboardInterrupts (code that handles Ctrl-C handles them, `except
# Exception` does not swallow them); StopForward is the signal that ends a recorded forward early (like StopIteration).
NOT_ERRORS = {"RunInterrupted", "Terminated", "StopForward"}


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_public_exception_is_a_personavec_error(module: str) -> None:
    mod = importlib.import_module(module)
    for name, obj in vars(mod).items():
        if (
            inspect.isclass(obj)
            and issubclass(obj, BaseException)
            and obj.__module__ == module
            and not name.startswith("_")
            and name not in NOT_ERRORS
        ):
            assert issubclass(obj, PersonavecError), f"{module}.{name} is not a PersonavecError"
