"""The graph a command works on: `--graph module:factory` or `path/to/file.py:factory`, loaded and checked."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from keelgraph.contracts.errors import KeelgraphError, UserError

__all__ = [
    "DEFAULT_GRAPH",
    "GraphNotLoaded",
    "as_graph",
    "input_model",
    "load_factory",
    "load_graph",
    "request_from",
]

DEFAULT_GRAPH = "keelgraph.apps.support.desk:make_graph"
"""The support desk: what `ask`, `approve`, `history` and `eval` work on without `--graph`."""
DEFAULT_ATTRIBUTE = "make_graph"
"""The factory's name when `--graph` names only a module or file."""


class GraphNotLoaded(UserError):
    """`--graph` names no module, file or factory, or what it names is not a keelgraph graph."""

    code = "graph_not_loaded"


def _split(spec: str) -> tuple[str, str]:
    """`module:attr` or `path/to/file.py:attr` (a Windows drive letter is not a separator)."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or "/" in attr or "\\" in attr:
        return spec, DEFAULT_ATTRIBUTE
    return where, attr or DEFAULT_ATTRIBUTE


def _import_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise GraphNotLoaded(f"--graph {spec}: no file {path}")
    name = "_keelgraph_graph_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise GraphNotLoaded(f"--graph {spec}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    # Like langgraph.json's entries: the file's folder is importable, so it can import its neighbours.
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import(spec: str, where: str) -> Any:
    try:
        if where.endswith(".py") or os.sep in where or "/" in where:
            return _import_file(spec, Path(where))
        # A console script does not put the working directory on sys.path; `python -m` does.
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(where)
    except (KeelgraphError, KeyboardInterrupt):
        raise
    except ModuleNotFoundError as exc:
        if exc.name and (where == exc.name or where.startswith(exc.name + ".")):
            raise GraphNotLoaded(f"--graph {spec}: cannot import {where} (no module {exc.name!r})") from None
        raise GraphNotLoaded(f"--graph {spec}: importing {where} failed: {exc}") from None
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        raise GraphNotLoaded(
            f"--graph {spec}: importing {where} failed: {type(exc).__name__}: {exc}"
        ) from None


def load_factory(spec: str) -> Callable[..., Any]:
    """The factory `spec` names (`module:factory`, `path/to/file.py:factory`; the factory defaults to
    `make_graph`). An attribute that is already a graph (as langgraph.json allows) counts as a
    factory without arguments. `GraphNotLoaded` says what is wrong.
    """
    where, attr = _split(spec)
    module = _import(spec, where)
    found = getattr(module, attr, None)
    if found is None:
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise GraphNotLoaded(
            f"--graph {spec}: {where} has no {attr!r}"
            + (f" (its public callables: {', '.join(names[:12])})" if names else "")
        )
    if _is_graph(found):
        return lambda: found
    if not callable(found):
        raise GraphNotLoaded(
            f"--graph {spec}: {where}.{attr} is a {type(found).__name__}, not a graph factory"
        )
    return found  # type: ignore[no-any-return]


def _is_graph(value: Any) -> bool:
    from langgraph.graph import StateGraph
    from langgraph.pregel import Pregel

    return isinstance(value, (Pregel, StateGraph))


def as_graph(built: Any, spec: str, *, checkpointer: Callable[[], Any], store: Callable[[], Any]) -> Any:
    """`built` as a compiled keelgraph graph that keeps threads: an uncompiled builder is compiled,
    a graph compiled without a checkpointer (as served graphs are) gets `checkpointer()` and
    `store()`. Anything else is `GraphNotLoaded`.
    """
    from langgraph.graph import StateGraph
    from langgraph.pregel import Pregel

    if isinstance(built, StateGraph):
        built = built.compile(checkpointer=checkpointer(), store=store())
    elif not isinstance(built, Pregel):
        raise GraphNotLoaded(
            f"--graph {spec}: the factory returned a {type(built).__name__}, not a graph: return "
            "keelgraph.build_graph(...) (or keelgraph.graph_builder(...), compiled or not)"
        )
    elif built.checkpointer is None:
        built = built.copy(update={"checkpointer": checkpointer(), "store": built.store or store()})
    schema = getattr(getattr(built, "builder", None), "input_schema", None)
    if "request" not in getattr(schema, "__annotations__", {}):
        raise GraphNotLoaded(
            f"--graph {spec}: a LangGraph graph, but not a keelgraph one (its input has no `request`): "
            "build it with keelgraph.build_graph or keelgraph.graph_builder"
        )
    return built


def load_graph(spec: str) -> Any:
    """The compiled keelgraph graph `spec` names, keeping threads in the configured checkpointer
    (`$KEELGRAPH_DATA_DIR/threads.db`, or `KEELGRAPH_DATABASE_URL`) unless it brings its own."""
    from keelgraph.graphs.persistence import default_checkpointer, default_store

    factory = load_factory(spec)
    try:
        built = factory()
    except (KeelgraphError, KeyboardInterrupt):
        raise
    except TypeError as exc:
        if _takes_required_arguments(factory):
            raise GraphNotLoaded(
                f"--graph {spec}: the factory needs arguments ({exc}); name one that takes none"
            ) from None
        raise
    return as_graph(built, spec, checkpointer=default_checkpointer, store=default_store)


def _takes_required_arguments(factory: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        for p in parameters
    )


def input_model(graph: Any) -> type[BaseModel] | None:
    """The contract's input model of a keelgraph graph (None when it cannot be found)."""
    from keelgraph.graphs.spec import AgentSpec

    nodes = getattr(getattr(graph, "builder", None), "nodes", {})
    node = nodes.get("validate_input")
    func = inspect.unwrap(getattr(getattr(node, "runnable", None), "func", None) or (lambda: None))
    spec = getattr(func, "keywords", {}).get("spec")
    return spec.contract.input if isinstance(spec, AgentSpec) else None


def _text_field(model: type[BaseModel]) -> str | None:
    """The one field a plain message fills: the only required field, or the only field, if it is text."""
    fields = model.model_fields
    required = [name for name, info in fields.items() if info.is_required()]
    candidates = required if required else list(fields)
    if len(candidates) == 1 and fields[candidates[0]].annotation in (str, str | None):
        return candidates[0]
    return None


def request_from(graph: Any, message: str | None, data: str | None) -> Any:
    """The request `ask` sends: `--input` as given (JSON text, checked by the contract), a message
    that is a JSON object as given, or a plain message in the contract's one text field."""
    if data is not None:
        if data.startswith("@"):
            try:
                return Path(data[1:]).read_text(encoding="utf-8")
            except OSError as exc:
                raise UserError(f"--input {data}: {exc.strerror or exc}") from None
        return data
    assert message is not None
    try:
        if isinstance(json.loads(message), dict):
            return message
    except ValueError:
        pass
    model = input_model(graph)
    field = _text_field(model) if model is not None else None
    if model is not None and field is None:
        names = ", ".join(model.model_fields) or "none"
        raise UserError(
            f"this graph's input has the fields {names}, not one text field: send the request "
            "with --input JSON (or a JSON object)"
        )
    return message if field is None else {field: message}
