"""keelgraph: turn an LLM prompt into a reliable product, as one LangGraph state graph."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pydantic import BaseModel

    from keelgraph.contracts import (
        Attempt,
        BudgetExceeded,
        CheckContext,
        Computed,
        Contract,
        ContractError,
        Failure,
        InputRejected,
        KeelgraphError,
        ModelUnavailable,
        Problem,
        RepairExhausted,
        RunError,
        ThreadBusy,
        Uncertain,
        UserError,
    )
    from keelgraph.graphs import Context, GraphOptions, build_graph, graph_builder, sqlite_checkpointer
    from keelgraph.runtime.models import Price, chat_model, default_model
    from keelgraph.settings import Settings
    from keelgraph.tools import GuardContext, ToolPolicy, with_policy

__all__ = [
    "Attempt",
    "BudgetExceeded",
    "CheckContext",
    "Computed",
    "Context",
    "Contract",
    "ContractError",
    "Failure",
    "GraphOptions",
    "GuardContext",
    "InputRejected",
    "KeelgraphError",
    "ModelUnavailable",
    "Price",
    "Problem",
    "RepairExhausted",
    "RunError",
    "Settings",
    "ThreadBusy",
    "ToolPolicy",
    "Uncertain",
    "UserError",
    "__version__",
    "build_graph",
    "chat_model",
    "default_model",
    "graph_builder",
    "sqlite_checkpointer",
    "unwrap",
    "with_policy",
]

__version__ = "0.1.0"

_WHERE = {
    **dict.fromkeys(
        (
            "Attempt",
            "BudgetExceeded",
            "CheckContext",
            "Computed",
            "Contract",
            "ContractError",
            "Failure",
            "InputRejected",
            "KeelgraphError",
            "ModelUnavailable",
            "Problem",
            "RepairExhausted",
            "RunError",
            "ThreadBusy",
            "Uncertain",
            "UserError",
        ),
        "keelgraph.contracts",
    ),
    **dict.fromkeys(
        ("Context", "GraphOptions", "build_graph", "graph_builder", "sqlite_checkpointer"), "keelgraph.graphs"
    ),
    **dict.fromkeys(("Price", "chat_model", "default_model"), "keelgraph.runtime.models"),
    "Settings": "keelgraph.settings",
    **dict.fromkeys(("GuardContext", "ToolPolicy", "with_policy"), "keelgraph.tools"),
}
"""Where each public name lives. Imported on first use, so `import keelgraph.contracts` (or
`from keelgraph import Contract`) does not load LangGraph or OpenAI."""


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'keelgraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


OutT = TypeVar("OutT", bound="BaseModel")


def unwrap(result: dict[str, Any], output: type[OutT]) -> OutT:
    """The typed answer of a graph result, or the typed error it ended with.

    >>> from pydantic import BaseModel
    >>> class Reply(BaseModel):
    ...     text: str
    >>> unwrap({"status": "ok", "output": {"text": "hi"}}, Reply).text
    'hi'
    """
    from keelgraph.contracts import Failure, RunError

    if result.get("status") == "ok" and result.get("output") is not None:
        return output.model_validate(result["output"])
    if result.get("error"):
        raise Failure.model_validate(result["error"]).to_exception()
    raise RunError(f"the run has no answer yet (status {result.get('status')!r}); was it interrupted?")
