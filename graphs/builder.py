"""Assembling the keelgraph flow from a contract, tools and a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import httpx
import openai
from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.store.base import BaseStore
from langgraph.types import Checkpointer

from keelgraph.contracts.contract import Contract
from keelgraph.contracts.decision import ANSWER
from keelgraph.contracts.errors import UserError
from keelgraph.graphs._prompt import Strategy, tool_args_schema
from keelgraph.graphs.nodes import (
    AgentSpec,
    ModelSource,
    act,
    approve,
    check_output,
    reason,
    route_after_act,
    route_after_check,
    route_after_input,
    route_after_reason,
    validate_input,
)
from keelgraph.graphs.state import Context, InputState, OutputState, State
from keelgraph.models import Price, model_label, price_of
from keelgraph.observability import configure_from_env, traced
from keelgraph.tools.execution import policy_of
from keelgraph.tools.ledger import EffectLedger, SqliteLedger

if TYPE_CHECKING:
    from keelgraph.cache import ModelCache
    from keelgraph.models import ModelChain

__all__ = ["TRANSIENT_ERRORS", "build_graph", "graph_builder", "infer_strategy", "strategy_chain"]

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    openai.APIConnectionError,  # includes APITimeoutError
    openai.RateLimitError,
    openai.InternalServerError,
    httpx.TransportError,
    TimeoutError,
)
"""The broad classes of transport failure. The `reason` node decides case by case with
`keelgraph.models.is_transient` (a 429 and a 503 are retried, a 400 and a 401 are not) and retries
inside the node, so it has no LangGraph retry policy to multiply its attempts."""


def strategy_chain(model: ModelSource) -> tuple[Strategy, ...]:
    """The ways to ask `model` for structured steps, best first; the graph uses the first one the
    endpoint accepts and moves down the chain when the endpoint refuses one (a 400 naming
    `response_format` or `tools`, say).

    `KEELGRAPH_OUTPUT_STRATEGY` pins one. The embedded llama.cpp server and other local servers get
    schema-constrained JSON first; hosted OpenAI-compatible endpoints native tool calling, then a
    JSON schema, then prompted JSON; other chat models prompted JSON.
    """
    from keelgraph.settings import Settings

    settings = Settings.from_env()
    if settings.output_strategy:
        return (settings.output_strategy,)
    local: tuple[Strategy, ...] = ("json_object", "prompted")
    hosted: tuple[Strategy, ...] = ("tool_calling", "json_schema", "json_object", "prompted")
    if not isinstance(model, BaseChatModel):
        return local if settings.base_url is None or _is_local(settings.base_url) else hosted
    base = str(getattr(model, "openai_api_base", "") or "")
    if _is_local(base):
        return local
    if type(model).__name__ == "ChatOpenAI":
        return hosted
    return ("prompted",)


def _is_local(url: str) -> bool:
    return url.startswith(("http://127.0.0.1", "http://localhost"))


def infer_strategy(model: ModelSource) -> Strategy:
    """The first strategy of `strategy_chain(model)`."""
    return strategy_chain(model)[0]


def graph_builder(
    contract: Contract[Any, Any],
    tools: Sequence[BaseTool] = (),
    *,
    model: ModelSource | Sequence[ModelSource] | ModelChain | None = None,
    strategy: Strategy | Sequence[Strategy] | None = None,
    max_tool_rounds: int = 4,
    allow_repeat_tools: bool = False,
    effects: EffectLedger | Literal["default"] | None = "default",
    max_tool_calls: int | None = 16,
    max_thread_tool_calls: int | None = None,
    refuse_tainted_writes: bool = True,
    history_tokens: int | None = 1000,
    max_turn_tokens: int | None = None,
    max_thread_tokens: int | None = None,
    cache: ModelCache | Literal["default"] | None = None,
    cache_sampled: bool = False,
    prices: Mapping[str, Price] | None = None,
    max_turn_cost: float | None = None,
    max_thread_cost: float | None = None,
) -> StateGraph[State, Context, InputState, OutputState]:
    """The uncompiled keelgraph flow, to compile yourself or to embed in a larger graph.

    `model` is a chat model or a zero-argument factory; by default the configured endpoint or the
    embedded local model, resolved at the first model call (so building a graph starts nothing).
    A sequence is a failover chain, primary first: transient errors (timeouts, connection errors,
    429, 5xx) are retried with backoff, then the next model answers, bound with the same tools and
    output format; a `keelgraph.models.ModelChain` sets the retries and `handover_after`.
    `strategy` is one output strategy or a chain tried in order (see `strategy_chain`).
    `effects` records completed `write`/`external` tool calls so none is performed twice (see
    `keelgraph.tools.ledger`); by default in `$KEELGRAPH_DATA_DIR/effects.db`, opened at the first
    such call. None turns the record off: such calls may then repeat on resume.
    `max_tool_calls` / `max_thread_tool_calls` cap the tool calls run per turn / per thread (calls
    past a cap are refused and the model must answer). `refuse_tainted_writes` enforces the tool
    policies' `from_user` arguments: values the user must have written, not a tool result.
    `history_tokens` bounds what the model is shown of earlier turns (their requests and answers,
    newest first, by estimated tokens). With a store, the state holds only the turn in progress:
    finished turns move to the thread's archive in the graph's store and the model's share of them
    is read back from there, so a checkpoint holds the same whatever the length of the thread (see
    `keelgraph.graphs.history`). Without a store, or with None, the state keeps every turn.
    `max_turn_tokens` / `max_thread_tokens` are spend limits in input + output tokens per turn / per
    thread, counting every model call (repairs included). Before each call its cost is estimated
    (prompt characters // 4 plus the model's `max_tokens`, 1024 without one); a call that could go
    past a limit is not made, and the turn ends "failed" with a `BudgetExceeded` error.
    `prices` maps model names (`keelgraph.models.model_label`, `"*"` for any other) to a
    `keelgraph.Price` per million tokens: each reply's cost goes into the turn's `stats["cost"]`
    and the thread's `usage["cost_micros"]`; `max_turn_cost` / `max_thread_cost` are spend limits
    in that currency, checked before each call like the token limits (at the highest price of the
    models the call may fail over to).
    `cache` answers identical model calls from a response cache (see `keelgraph.cache`): None (the
    default) is off, "default" a SQLite cache in `$KEELGRAPH_DATA_DIR/model_cache.db`. Only replies of
    turns that ended ok are kept; calls at a temperature above 0 are not cached unless `cache_sampled`.
    """
    from keelgraph.models import as_chain

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
    if history_tokens is not None and history_tokens < 0:
        raise UserError("history_tokens must be None (keep everything) or >= 0")
    if max_tool_rounds < 0:
        raise UserError("max_tool_rounds must be >= 0")
    caps = {
        "max_tool_calls": max_tool_calls,
        "max_thread_tool_calls": max_thread_tool_calls,
        "max_turn_tokens": max_turn_tokens,
        "max_thread_tokens": max_thread_tokens,
    }
    for label, cap in caps.items():
        if cap is not None and cap < 1:
            raise UserError(f"{label} must be None (no limit) or >= 1, got {cap}")
    models = as_chain(model)
    for label, limit in (("max_turn_cost", max_turn_cost), ("max_thread_cost", max_thread_cost)):
        if limit is not None and limit <= 0:
            raise UserError(f"{label} must be None (no limit) or > 0, got {limit}")
        if limit is not None and not prices:
            raise UserError(f"{label} needs prices=: the price of each model, e.g. {{'*': Price(0.15, 0.6)}}")
    if prices and (max_turn_cost is not None or max_thread_cost is not None):
        for source in models.models:  # factories are checked when first resolved, at the first call
            if isinstance(source, BaseChatModel) and price_of(prices, model_label(source)) is None:
                raise UserError(
                    f'no price for model {model_label(source)!r}: add it to prices= (or a "*" entry)'
                )
    if isinstance(strategy, str):
        chain: tuple[Strategy, ...] = (strategy,)
    else:
        chain = tuple(strategy) if strategy else strategy_chain(models.models[0])
    spec = AgentSpec(
        contract=contract,
        tools={t.name: t for t in tools},
        model=models,
        strategy=chain[0],
        fallbacks=chain[1:],
        max_tool_rounds=max_tool_rounds,
        allow_repeat_tools=allow_repeat_tools,
        effects=_default_ledger if effects == "default" else effects,
        max_tool_calls=max_tool_calls,
        max_thread_tool_calls=max_thread_tool_calls,
        refuse_tainted_writes=refuse_tainted_writes,
        history_tokens=history_tokens,
        max_turn_tokens=max_turn_tokens,
        max_thread_tokens=max_thread_tokens,
        cache=_default_cache() if cache == "default" else cache,
        cache_sampled=cache_sampled,
        prices=dict(prices or {}),
        max_turn_cost=max_turn_cost,
        max_thread_cost=max_thread_cost,
    )
    builder = StateGraph(State, context_schema=Context, input_schema=InputState, output_schema=OutputState)
    configure_from_env()
    # Each node logs one record (and an OpenTelemetry span) per run: see `keelgraph.observability`.
    builder.add_node("validate_input", traced("validate_input", partial(validate_input, spec=spec)))
    # No retry_policy: the node retries and fails over itself (see `_ask`), once per request.
    builder.add_node("reason", traced("reason", partial(reason, spec=spec)))
    builder.add_node("approve", traced("approve", partial(approve, spec=spec)))
    builder.add_node("act", traced("act", partial(act, spec=spec)))
    builder.add_node("check_output", traced("check_output", partial(check_output, spec=spec)))
    builder.add_edge(START, "validate_input")
    builder.add_conditional_edges("validate_input", route_after_input)
    builder.add_conditional_edges(
        "reason", partial(route_after_reason, spec=spec), ["approve", "act", "check_output", END]
    )
    builder.add_edge("approve", "act")
    builder.add_conditional_edges("act", route_after_act)
    builder.add_conditional_edges("check_output", route_after_check)
    return builder


def _default_cache() -> ModelCache:
    from keelgraph.cache import SqliteModelCache
    from keelgraph.settings import Settings

    return SqliteModelCache(Settings.from_env().data_dir / "model_cache.db")


def _default_ledger() -> EffectLedger:
    from keelgraph.settings import Settings

    return SqliteLedger(Settings.from_env().data_dir / "effects.db")


def build_graph(
    contract: Contract[Any, Any],
    tools: Sequence[BaseTool] = (),
    *,
    model: ModelSource | Sequence[ModelSource] | ModelChain | None = None,
    checkpointer: Checkpointer | Literal["default"] = "default",
    store: BaseStore | Literal["default"] | None = "default",
    strategy: Strategy | Sequence[Strategy] | None = None,
    max_tool_rounds: int = 4,
    allow_repeat_tools: bool = False,
    effects: EffectLedger | Literal["default"] | None = "default",
    max_tool_calls: int | None = 16,
    max_thread_tool_calls: int | None = None,
    refuse_tainted_writes: bool = True,
    history_tokens: int | None = 1000,
    max_turn_tokens: int | None = None,
    max_thread_tokens: int | None = None,
    cache: ModelCache | Literal["default"] | None = None,
    cache_sampled: bool = False,
    prices: Mapping[str, Price] | None = None,
    max_turn_cost: float | None = None,
    max_thread_cost: float | None = None,
    name: str | None = None,
) -> CompiledStateGraph[State, Context, InputState, OutputState]:
    """Compile the keelgraph flow for `contract` and `tools`.

    By default threads persist in the SQLite file `$KEELGRAPH_DATA_DIR/threads.db` (PostgreSQL when
    `KEELGRAPH_DATABASE_URL` is set), with a store beside it (`store.db`) for the threads' archives
    and long-term memory; pass `checkpointer=None` for a graph served by LangGraph server (it brings
    its own). `store="default"` means that store with the default checkpointer, and none otherwise.

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
        effects=effects,
        max_tool_calls=max_tool_calls,
        max_thread_tool_calls=max_thread_tool_calls,
        refuse_tainted_writes=refuse_tainted_writes,
        history_tokens=history_tokens,
        max_turn_tokens=max_turn_tokens,
        max_thread_tokens=max_thread_tokens,
        cache=cache,
        cache_sampled=cache_sampled,
        prices=prices,
        max_turn_cost=max_turn_cost,
        max_thread_cost=max_thread_cost,
    )
    if store == "default":
        store = None
        if checkpointer == "default":
            from keelgraph.graphs.persistence import default_store

            store = default_store()
    if checkpointer == "default":
        from keelgraph.graphs.persistence import default_checkpointer

        checkpointer = default_checkpointer()
    return builder.compile(checkpointer=checkpointer, store=store, name=name or contract.name or "keelgraph")
