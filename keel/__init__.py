"""keelgraph: turn an LLM prompt into a reliable product, as one LangGraph state graph."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from keelgraph.contracts import (
    Attempt,
    BudgetExceeded,
    CheckContext,
    Contract,
    ContractError,
    Failure,
    InputRejected,
    KeelgraphError,
    Problem,
    RepairExhausted,
    RunError,
    UserError,
)
from keelgraph.graphs import Context, build_graph, graph_builder, sqlite_checkpointer
from keelgraph.models import Price, chat_model, default_model
from keelgraph.settings import Settings
from keelgraph.tools import GuardContext, ToolPolicy, with_policy

__all__ = [
    "Attempt",
    "BudgetExceeded",
    "CheckContext",
    "Context",
    "Contract",
    "ContractError",
    "Failure",
    "GuardContext",
    "InputRejected",
    "KeelgraphError",
    "Price",
    "Problem",
    "RepairExhausted",
    "RunError",
    "Settings",
    "ToolPolicy",
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

OutT = TypeVar("OutT", bound=BaseModel)


def unwrap(result: dict[str, Any], output: type[OutT]) -> OutT:
    """The typed answer of a graph result, or the typed error it ended with.

    >>> class Reply(BaseModel):
    ...     text: str
    >>> unwrap({"status": "ok", "output": {"text": "hi"}}, Reply).text
    'hi'
    """
    if result.get("status") == "ok" and result.get("output") is not None:
        return output.model_validate(result["output"])
    if result.get("error"):
        raise Failure.model_validate(result["error"]).to_exception()
    raise RunError(f"the run has no answer yet (status {result.get('status')!r}); was it interrupted?")
