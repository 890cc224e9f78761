"""Assembling the keelgraph flow from a contract, tools and a model."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import httpx
import openai
from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool
from langgraph.graph import START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.store.base import BaseStore
from langgraph.types import Checkpointer, RetryPolicy

from keelgraph.contracts.contract import Contract
from keelgraph.contracts.decision import ANSWER
from keelgraph.contracts.errors import UserError
from keelgraph.graphs._prompt import Strategy, tool_args_schema
from keelgraph.graphs.nodes import (
    AgentSpec,
    ModelSource,
    act,
    check_output,
    reason,
    route_after_act,
    route_after_check,
    route_after_input,
    route_after_reason,
    validate_input,
)
from keelgraph.graphs.state import Context, InputState, OutputState, State
from keelgraph.tools.execution import policy_of

__all__ = ["TRANSIENT_ERRORS", "build_graph", "graph_builder", "infer_strategy"]

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    openai.APIConnectionError,  # includes APITimeoutError
    openai.RateLimitError,
    openai.InternalServerError,
    httpx.TransportError,
    TimeoutError,
)
"""Transport failures retried with backoff by the `reason` node; contract failures never are."""


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


def infer_strategy(model: ModelSource) -> Strategy:
    """How to ask `model` for structured steps when the caller did not say.

    The embedded llama.cpp server and other local servers get schema-constrained JSON; hosted
    OpenAI-compatible endpoints get native tool calling; anything else gets prompted JSON.
    """
    from keelgraph.settings import Settings

    settings = Settings.from_env()
    if settings.output_strategy:
        return settings.output_strategy
    if not isinstance(model, BaseChatModel):
        return "json_object" if settings.base_url is None else "tool_calling"
    base = str(getattr(model, "openai_api_base", "") or "")
    if base.startswith(("http://127.0.0.1", "http://localhost")):
        return "json_object"
    if type(model).__name__ == "ChatOpenAI":
        return "tool_calling"
    return "prompted"


def graph_builder(
    contract: Contract[Any, Any],
    tools: Sequence[BaseTool] = (),
    *,
    model: ModelSource | None = None,
    strategy: Strategy | None = None,
    max_tool_rounds: int = 4,
    allow_repeat_tools: bool = False,
) -> StateGraph[State, Context, InputState, OutputState]:
    """The uncompiled keelgraph flow, to compile yourself or to embed in a larger graph.

    `model` is a chat model or a zero-argument factory; by default the configured endpoint or the
    embedded local model, resolved at the first model call (so building a graph starts nothing).
    """
    from keelgraph.models import default_model

    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise UserError(f"tool names must be unique, got {names}")
    if ANSWER in names:
        raise UserError(f"{ANSWER!r} is reserved for the final answer; rename that tool")
    for tool in tools:
        policy = policy_of(tool)
        if policy.preload:
            required = set(tool_args_schema(tool).get("required", []))
            if not required <= set(policy.from_input) or set(policy.from_input) - set(
                contract.input.model_fields
            ):
                raise UserError(
                    f"preloaded tool {tool.name!r} must take every required argument ({sorted(required)}) "
                    f"from the request's fields ({sorted(contract.input.model_fields)}) via from_input"
                )
    if max_tool_rounds < 0:
        raise UserError("max_tool_rounds must be >= 0")
    source: ModelSource = model if model is not None else default_model
    spec = AgentSpec(
        contract=contract,
        tools={t.name: t for t in tools},
        model=source,
        strategy=strategy or infer_strategy(source),
        max_tool_rounds=max_tool_rounds,
        allow_repeat_tools=allow_repeat_tools,
    )
    builder = StateGraph(State, context_schema=Context, input_schema=InputState, output_schema=OutputState)
    builder.add_node("validate_input", partial(validate_input, spec=spec))
    builder.add_node(
        "reason",
        partial(reason, spec=spec),
        retry_policy=RetryPolicy(max_attempts=3, initial_interval=0.5, retry_on=_is_transient),
    )
    builder.add_node("act", partial(act, spec=spec))
    builder.add_node("check_output", partial(check_output, spec=spec))
    builder.add_edge(START, "validate_input")
    builder.add_conditional_edges("validate_input", route_after_input)
    builder.add_conditional_edges("reason", route_after_reason)
    builder.add_conditional_edges("act", route_after_act)
    builder.add_conditional_edges("check_output", route_after_check)
    return builder


def build_graph(
    contract: Contract[Any, Any],
    tools: Sequence[BaseTool] = (),
    *,
    model: ModelSource | None = None,
    checkpointer: Checkpointer | Literal["default"] = "default",
    store: BaseStore | None = None,
    strategy: Strategy | None = None,
    max_tool_rounds: int = 4,
    allow_repeat_tools: bool = False,
    name: str | None = None,
) -> CompiledStateGraph[State, Context, InputState, OutputState]:
    """Compile the keelgraph flow for `contract` and `tools`.

    By default threads persist in the SQLite file `$KEELGRAPH_DATA_DIR/threads.db`; pass
    `checkpointer=None` for a graph served by LangGraph server (it brings its own).

    >>> from pydantic import BaseModel
    >>> class Q(BaseModel):
    ...     question: str
    >>> class A(BaseModel):
    ...     answer: str
    >>> from keelgraph.testing import ScriptedChatModel
    >>> graph = build_graph(Contract(input=Q, output=A, instructions="Answer."),
    ...                     model=ScriptedChatModel([{"action": "final_answer", "answer": {"answer": "4"}}]),
    ...                     checkpointer=None)
    >>> graph.invoke({"request": {"question": "2+2?"}})["output"]
    {'answer': '4'}
    """
    builder = graph_builder(
        contract,
        tools,
        model=model,
        strategy=strategy,
        max_tool_rounds=max_tool_rounds,
        allow_repeat_tools=allow_repeat_tools,
    )
    if checkpointer == "default":
        from keelgraph.graphs.persistence import sqlite_checkpointer
        from keelgraph.settings import Settings

        checkpointer = sqlite_checkpointer(Settings.from_env().data_dir / "threads.db")
    return builder.compile(checkpointer=checkpointer, store=store, name=name or contract.name or "keelgraph")
