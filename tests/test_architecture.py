"""The layers, read from the code itself: who may import whom, what stays private, what stays small.

Each folder owns one layer (see README, "Layout"). These tests parse every library module's imports
(function-level imports included: a lazy import is still a dependency) and fail on an import that
goes up the layers, a cycle, a reach into another package's private module, a library module that
imports the test fakes, a router that does I/O, or a module past its size ceiling.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FOLDERS = {"keelgraph": "keel", "keelgraph.contracts": "contracts", "keelgraph.tools": "tools"}
FOLDERS |= {"keelgraph.graphs": "graphs", "keelgraph.apps": "apps"}

LAYERS: dict[str, int] = {
    "keelgraph.contracts": 0,
    "keelgraph.settings": 1,
    "keelgraph._sqlite": 1,
    "keelgraph.progress": 1,
    "keelgraph.tools": 2,
    "keelgraph.local": 3,
    "keelgraph.runtime": 4,
    "keelgraph.graphs": 5,
    "keelgraph.serving": 6,
    "keelgraph.apps": 6,
    "keelgraph.commands": 7,
}
"""contracts < foundation (settings, the tuned SQLite connection, progress) < tools < local processes
< model runtime < graphs < serving and apps < commands. `keelgraph.testing` is outside the ladder:
it may use any library layer, and only apps, commands and tests may use it."""

MAY_USE_TESTING = ("keelgraph.testing", "keelgraph.apps", "keelgraph.commands")
MODULE_CEILING = 1000
"""Lines per module anywhere in the library."""
GRAPHS_CEILING = 600
"""Lines per module in `graphs/`, where the agent loop once lived in one 1,455-line file."""
ROUTER_FORBIDDEN = {"get_store", "get_config", "store", "ledger", "spec", "runtime", "config", "Runtime"}


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    names: tuple[str, ...]
    line: int
    top_level: bool
    """Imported when the module loads (not inside a function, not under TYPE_CHECKING)."""


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if package == "keelgraph" and parts and parts[0] in {"contracts", "tools", "graphs", "apps"}:
                continue
            name = ".".join([package, *parts]).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST, top: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(name, alias.name, (), child.lineno, top)
            elif isinstance(child, ast.ImportFrom) and child.module:
                target = child.module if not child.level else f"{package}.{child.module}"
                names = tuple(a.name for a in child.names)
                yield Import(name, target, names, child.lineno, top)
                for alias in child.names:  # `from keelgraph.graphs import history` imports a module
                    if f"{target}.{alias.name}" in MODULES:
                        yield Import(name, f"{target}.{alias.name}", (), child.lineno, top)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
                isinstance(child, ast.If) and _is_type_checking(child)
            ):
                yield from visit(child, False)
            else:
                yield from visit(child, top)

    yield from visit(tree, True)


IMPORTS = [imp for name, path in MODULES.items() for imp in _imports(name, path)]


def _layer(module: str) -> tuple[str, int] | None:
    if module == "keelgraph.__main__":  # `python -m keelgraph` is the CLI
        return ("keelgraph.commands", LAYERS["keelgraph.commands"])
    best = None
    for prefix, rank in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best[0])
        ):
            best = (prefix, rank)
    return best


def upward_imports(imports: list[Import]) -> list[str]:
    """Imports that break the ladder: a lower layer importing a higher one (or a sibling package
    of the same rank), or a library module importing the `keelgraph` facade."""
    bad = []
    for imp in imports:
        if not imp.target.startswith("keelgraph"):
            continue
        if imp.target == "keelgraph" and imp.source != "keelgraph":
            bad.append(f"{imp.source}:{imp.line} imports the keelgraph facade; import the module instead")
            continue
        source, target = _layer(imp.source), _layer(imp.target)
        if source is None or target is None or source[0] == target[0]:
            continue
        if target[1] > source[1] or (target[1] == source[1] and target[1] != 1):
            bad.append(f"{imp.source}:{imp.line} imports {imp.target} ({source[0]} may not use {target[0]})")
    return bad


def test_the_ladder_covers_every_library_module() -> None:
    unplaced = [
        m for m in MODULES if m != "keelgraph" and _layer(m) is None and not m.startswith("keelgraph.testing")
    ]
    assert unplaced == [], f"put these modules in a layer (LAYERS): {unplaced}"


def test_no_layer_imports_a_higher_one() -> None:
    assert upward_imports(IMPORTS) == []


def test_an_upward_import_is_caught() -> None:
    """The check itself can fail: a tools module importing the graphs layer is reported."""
    planted = Import("keelgraph.tools.gate", "keelgraph.graphs.state", ("State",), 1, True)
    assert upward_imports([planted]) == [
        "keelgraph.tools.gate:1 imports keelgraph.graphs.state (keelgraph.tools may not use keelgraph.graphs)"
    ]
    assert upward_imports([Import("keelgraph.contracts.errors", "keelgraph", ("Problem",), 3, True)])


def test_no_import_cycles_between_modules() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if imp.top_level and imp.target in MODULES and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    done: set[str] = set()
    path: list[str] = []

    def walk(node: str) -> None:
        if node in path:
            cycle = [*path[path.index(node) :], node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            walk(nxt)
        path.pop()
        done.add(node)

    for module in sorted(graph):
        walk(module)


def _private_parts(module: str) -> list[int]:
    return [
        i for i, part in enumerate(module.split(".")) if part.startswith("_") and not part.startswith("__")
    ]


def test_no_module_reaches_into_another_packages_private_parts() -> None:
    bad = []
    for imp in IMPORTS:
        if not imp.target.startswith("keelgraph"):
            continue
        parts = imp.target.split(".")
        for index in _private_parts(imp.target):
            owner = ".".join(parts[:index])  # the package the private module belongs to
            if not (imp.source == owner or imp.source.startswith(owner + ".")):
                bad.append(f"{imp.source}:{imp.line} imports private {imp.target}")
        owner = imp.target if imp.target in MODULES and MODULES[imp.target].name == "__init__.py" else ""
        owner = owner or imp.target.rpartition(".")[0]
        for name in imp.names:
            if name.startswith("_") and not name.startswith("__") and not imp.source.startswith(owner):
                bad.append(f"{imp.source}:{imp.line} imports private name {name} from {imp.target}")
    assert bad == []


def test_no_library_module_imports_the_test_fakes() -> None:
    bad = [
        f"{imp.source}:{imp.line}"
        for imp in IMPORTS
        if imp.target.startswith("keelgraph.testing") and not imp.source.startswith(MAY_USE_TESTING)
    ]
    assert bad == [], f"library modules importing keelgraph.testing: {bad}"


def test_importing_contracts_loads_neither_langgraph_nor_openai() -> None:
    code = (
        "import sys, keelgraph.contracts, keelgraph\n"
        "from keelgraph import Contract, Problem\n"
        "print(sorted(m for m in ('langgraph', 'openai', 'langchain_core', 'langchain_openai') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("folder", ["contracts", "tools", "graphs", "apps"])
def test_a_layer_folder_refuses_to_import_under_its_bare_name(folder: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", f"import {folder}"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert run.returncode != 0
    assert f"import keelgraph.{folder}, not {folder}" in run.stderr


def _routers() -> Iterator[tuple[str, ast.FunctionDef]]:
    for name, path in MODULES.items():
        if name.startswith("keelgraph.graphs"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.FunctionDef) and node.name.startswith("route_"):
                    yield name, node


def test_routers_read_state_only() -> None:
    routers = list(_routers())
    assert {r.name for _, r in routers} >= {
        "route_after_input",
        "route_after_reason",
        "route_after_act",
        "route_after_check",
    }
    for module, router in routers:
        params = [a.arg for a in [*router.args.posonlyargs, *router.args.args, *router.args.kwonlyargs]]
        assert params == ["state"], f"{module}.{router.name} takes {params}: a router gets the state only"
        used = {n.id for n in ast.walk(router) if isinstance(n, ast.Name)}
        used |= {n.attr for n in ast.walk(router) if isinstance(n, ast.Attribute)}
        assert not used & ROUTER_FORBIDDEN, f"{module}.{router.name} uses {sorted(used & ROUTER_FORBIDDEN)}"
        calls = [n.func for n in ast.walk(router) if isinstance(n, ast.Call)]
        names = {
            f.id if isinstance(f, ast.Name) else f.attr
            for f in calls
            if isinstance(f, (ast.Name, ast.Attribute))
        }
        assert names <= {"get", "isinstance", "len"}, f"{module}.{router.name} calls {sorted(names)}"


def test_modules_stay_under_their_size_ceiling() -> None:
    big = []
    for name, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        ceiling = GRAPHS_CEILING if name.startswith("keelgraph.graphs") else MODULE_CEILING
        if lines > ceiling:
            big.append(f"{name}: {lines} lines (ceiling {ceiling})")
    assert big == []
