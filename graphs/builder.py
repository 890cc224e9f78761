"""Assembling the keelgraph flow from a contract, tools and a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal, TypedDict, Unpack

import httpx
import openai
from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool

# LangGraph's node runnable with a sync and an async body (langchain's create_agent uses it too).
from langgraph._internal._runnable import RunnableCallable
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.store.base import BaseStore
from langgraph.types import Checkpointer

from keelgraph.contracts.contract import Contract
from keelgraph.contracts.decision import ANSWER, Strategy
from keelgraph.contracts.errors import UserError
from keelgraph.graphs.act import aact, act, route_after_act
from keelgraph.graphs.approve import approve
from keelgraph.graphs.check import acheck_output, check_output, route_after_check
from keelgraph.graphs.confirm import confirm
from keelgraph.graphs.events import reported
from keelgraph.graphs.prompt import tool_args_schema
from keelgraph.graphs.reason import areason, reason, route_after_reason
from keelgraph.graphs.spec import AgentSpec
from keelgraph.graphs.state import Context, InputState, OutputState, State
from keelgraph.graphs.validate import route_after_input, validate_input
from keelgraph.runtime.cache import ModelCache, SqliteModelCache
from keelgraph.runtime.models import ModelChain, ModelSource, Price, as_chain, model_label, price_of
from keelgraph.runtime.observability import configure_from_env, traced
from keelgraph.settings import Settings
from keelgraph.tools.execution import policy_of
from keelgraph.tools.ledger import EffectLedger, SqliteLedger

__all__ = [
    "TRANSIENT_ERRORS",
    "GraphOptions",
    "build_graph",
    "graph_builder",
    "infer_strategy",
    "strategy_chain",
]

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    openai.APIConnectionError,  # includes APITimeoutError
    openai.RateLimitError,
    openai.InternalServerError,
    httpx.TransportError,
    TimeoutError,
)
"""The broad classes of transport failure. The `reason` node decides case by case with
`keelgraph.runtime.models.is_transient` (a 429 and a 503 are retried, a 400 and a 401 are not) and retries
inside the node (`graphs.model_call.ask`, with `ModelChain`'s backoff), so the graph has no LangGraph
`RetryPolicy` to multiply its attempts."""


def strategy_chain(model: ModelSource) -> tuple[Strategy, ...]:
    """The ways to ask `model` for structured steps, best first; the graph uses the first one the
    endpoint accepts and moves down the chain when the endpoint refuses one (a 400 naming
    `response_format` or `tools`, say).

    `KEELGRAPH_OUTPUT_STRATEGY` pins one. The embedded llama.cpp server and other local servers get
    schema-constrained JSON first; hosted OpenAI-compatible endpoints native tool calling, then a
    JSON schema, then prompted JSON; other chat models prompted JSON.
    """
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


class GraphOptions(TypedDict, total=False):
    """The behaviour of a keelgraph graph: every keyword `graph_builder` and `build_graph` take
    besides the contract, tools and model (and, for `build_graph`, persistence). Declared once here;
    the defaults are `DEFAULTS`.

    >>> opts: GraphOptions = {"max_tool_calls": 4, "history_tokens": 500}
    >>> sorted(opts)
    ['history_tokens', 'max_tool_calls']
    """

    strategy: Strategy | Sequence[Strategy] | None
    """One output strategy, or a chain tried in order (default: `strategy_chain(model)`)."""
    max_tool_rounds: int
    """Tool rounds per turn; after that the model must answer (default 4)."""
    allow_repeat_tools: bool
    """Let the model call a tool again in a turn after it succeeded (default off: small models loop)."""
    effects: EffectLedger | Literal["default"] | None
    """Where completed `write`/`external` calls are recorded so none runs twice (see
    `keelgraph.tools.ledger`): "default" is `$KEELGRAPH_DATA_DIR/effects.db`, opened at the first
    such call; None turns the record off (such calls may then repeat on resume)."""
    max_tool_calls: int | None
    """Tool calls run per turn (default 16; None: no limit). Calls past it are refused and the model
    must answer."""
    max_thread_tool_calls: int | None
    """Tool calls run per thread, over all its turns (default None: no limit)."""
    refuse_tainted_writes: bool
    """Enforce the tool policies' `from_user` arguments (values the user wrote, not a tool result)
    and `scope` (tools the request asks for); a doubtful call goes to a person where the tool's
    `approval` is not "never", and is refused otherwise (default True)."""
    history_tokens: int | None
    """What the model is shown of earlier turns (requests and answers, newest first), in estimated
    tokens (default 1000). With a store, finished turns move to the thread's archive and the state
    holds only the turn in progress (see `keelgraph.graphs.history`); None keeps every turn."""
    max_turn_tokens: int | None
    """Spend limit in input + output tokens per turn, every model call counted (default None). A call
    that could go past it (prompt characters // 4 plus the model's `max_tokens`, 1024 without one) is
    not made: the turn ends "failed" with `BudgetExceeded`."""
    max_thread_tokens: int | None
    """The same over the whole thread (default None)."""
    cache: ModelCache | Literal["default"] | None
    """Answer identical model calls from a response cache (see `keelgraph.runtime.cache`): None (the
    default) is off, "default" a SQLite cache in `$KEELGRAPH_DATA_DIR/model_cache.db`. Only replies of
    turns that ended ok are kept."""
    cache_sampled: bool
    """Also cache calls made at a temperature above 0 (default off)."""
    prices: Mapping[str, Price] | None
    """Model name (`model_label`, `"*"` for any other) -> `Price` per million tokens: each reply's
    cost goes into the turn's `stats["cost"]` and the thread's `usage["cost_micros"]`."""
    max_turn_cost: float | None
    """Spend limit per turn in the currency of `prices`, checked before each call at the highest price
    of the models the call may fail over to (default None)."""
    max_thread_cost: float | None
    """The same over the whole thread (default None)."""
    tool_workers: int
    """Threads the graph's tool calls run on at most (default 8). A call that runs past its
    `timeout_s` is reported to the model and abandoned, but its thread cannot be killed: it keeps
    its worker until it returns. While every worker is busy, a new call waits for one within its
    own deadline; when every worker is held by a call that did not finish, it is refused at once
    (the model reads why), so hung tools never grow the process's threads."""
    turn_timeout_s: float | None
    """Seconds a turn may run, from its request (default None: no limit). Checked before each model
    call and each step of tool calls; every tool call's deadline is capped by the time left. Past
    it nothing more is started and the turn ends "failed" with `BudgetExceeded` (unit "seconds").
    Time waiting for a person's approval counts."""


DEFAULTS: GraphOptions = {
    "strategy": None,
    "max_tool_rounds": 4,
    "allow_repeat_tools": False,
    "effects": "default",
    "max_tool_calls": 16,
    "max_thread_tool_calls": None,
    "refuse_tainted_writes": True,
    "history_tokens": 1000,
    "max_turn_tokens": None,
    "max_thread_tokens": None,
    "cache": None,
    "cache_sampled": False,
    "prices": None,
    "max_turn_cost": None,
    "max_thread_cost": None,
    "tool_workers": 8,
    "turn_timeout_s": None,
}
"""The default of every `GraphOptions` field."""


def _check_tools(contract: Contract[Any, Any], tools: Sequence[BaseTool]) -> None:
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


def _check_limits(opts: GraphOptions, models: ModelChain) -> None:
    history = opts["history_tokens"]
    if history is not None and history < 0:
        raise UserError("history_tokens must be None (keep everything) or >= 0")
    if opts["max_tool_rounds"] < 0:
        raise UserError("max_tool_rounds must be >= 0")
    for label in ("max_tool_calls", "max_thread_tool_calls", "max_turn_tokens", "max_thread_tokens"):
        cap = opts[label]
        if cap is not None and cap < 1:
            raise UserError(f"{label} must be None (no limit) or >= 1, got {cap}")
    if opts["tool_workers"] < 1:
        raise UserError(f"tool_workers must be >= 1, got {opts['tool_workers']}")
    turn_timeout = opts["turn_timeout_s"]
    if turn_timeout is not None and not turn_timeout > 0:
        raise UserError(f"turn_timeout_s must be None (no limit) or > 0, got {turn_timeout}")
    prices = opts["prices"]
    costs = (("max_turn_cost", opts["max_turn_cost"]), ("max_thread_cost", opts["max_thread_cost"]))
    for label, limit in costs:
        if limit is not None and limit <= 0:
            raise UserError(f"{label} must be None (no limit) or > 0, got {limit}")
        if limit is not None and not prices:
            raise UserError(f"{label} needs prices=: the price of each model, e.g. {{'*': Price(0.15, 0.6)}}")
    if prices and any(limit is not None for _, limit in costs):
        for source in models.models:  # factories are checked when first resolved, at the first call
            if isinstance(source, BaseChatModel) and price_of(prices, model_label(source)) is None:
                raise UserError(
                    f'no price for model {model_label(source)!r}: add it to prices= (or a "*" entry)'
                )


def agent_spec(
    contract: Contract[Any, Any],
    tools: Sequence[BaseTool] = (),
    *,
    model: ModelSource | Sequence[ModelSource] | ModelChain | None = None,
    **options: Unpack[GraphOptions],
) -> AgentSpec:
    """The checked `AgentSpec` the nodes run with; a mistake is a `UserError` at build time."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise UserError(f"unknown graph option(s) {unknown}; the options are {sorted(DEFAULTS)}")
    opts: GraphOptions = {**DEFAULTS, **options}
    _check_tools(contract, tools)
    models = as_chain(model)
    _check_limits(opts, models)
    strategy = opts["strategy"]
    if isinstance(strategy, str):
        chain: tuple[Strategy, ...] = (strategy,)
    else:
        chain = tuple(strategy) if strategy else strategy_chain(models.models[0])
    effects, cache = opts["effects"], opts["cache"]
    return AgentSpec(
        contract=contract,
        tools={t.name: t for t in tools},
        model=models,
        strategy=chain[0],
        fallbacks=chain[1:],
        max_tool_rounds=opts["max_tool_rounds"],
        allow_repeat_tools=opts["allow_repeat_tools"],
        effects=_default_ledger if effects == "default" else effects,
        max_tool_calls=opts["max_tool_calls"],
        max_thread_tool_calls=opts["max_thread_tool_calls"],
        refuse_tainted_writes=opts["refuse_tainted_writes"],
        history_tokens=opts["history_tokens"],
        max_turn_tokens=opts["max_turn_tokens"],
        max_thread_tokens=opts["max_thread_tokens"],
        cache=_default_cache() if cache == "default" else cache,
        cache_sampled=opts["cache_sampled"],
        prices=dict(opts["prices"] or {}),
        max_turn_cost=opts["max_turn_cost"],
        max_thread_cost=opts["max_thread_cost"],
        tool_workers=opts["tool_workers"],
        turn_timeout_s=opts["turn_timeout_s"],
    )


def graph_builder(
    contract: Contract[Any, Any],
    tools: Sequence[BaseTool] = (),
    *,
    model: ModelSource | Sequence[ModelSource] | ModelChain | None = None,
    **options: Unpack[GraphOptions],
) -> StateGraph[State, Context, InputState, OutputState]:
    """The uncompiled keelgraph flow, to compile yourself or to embed in a larger graph.

    `model` is a chat model or a zero-argument factory; by default the configured endpoint or the
    embedded local model, resolved at the first model call (so building a graph starts nothing).
    A sequence is a failover chain, primary first: transient errors (timeouts, connection errors,
    429, 5xx) are retried with backoff, then the next model answers, bound with the same tools and
    output format; a `keelgraph.runtime.models.ModelChain` sets the retries and `handover_after`.
    Every other keyword is a `GraphOptions` field (limits, budgets, effects, cache, history).
    """
    spec = agent_spec(contract, tools, model=model, **options)
    builder = StateGraph(State, context_schema=Context, input_schema=InputState, output_schema=OutputState)
    configure_from_env()
    # Each node logs one record (and an OpenTelemetry span) per run: see `keelgraph.runtime.observability`;
    # a node whose update ends the turn streams the `output` and `final` events (`graphs.events`).
    builder.add_node("validate_input", traced("validate_input", reported(partial(validate_input, spec=spec))))
    # No retry_policy: the node retries and fails over itself (see `model_call.ask`), once per request.
    # The model step, the tool calls and the checks are written once as steps
    # (`keelgraph.contracts.suspend`): an async run (`ainvoke`, `astream`, LangGraph server) awaits
    # the model, async tools and async checks on its event loop; the other nodes run on LangGraph's
    # executor threads there.
    builder.add_node("reason", _both("reason", reason, areason, spec))
    builder.add_node("approve", traced("approve", partial(approve, spec=spec)))
    if any(_is_async(tool) for tool in spec.tools.values()):
        builder.add_node("act", _both("act", act, aact, spec))
    else:
        # Sync tools only: the step runs whole on one executor thread (as LangGraph runs a sync
        # node) instead of hopping between the loop and threads per call: served at 32 clients,
        # the hops took the main graph from 12.6 to 7 runs/s.
        builder.add_node("act", traced("act", reported(partial(act, spec=spec))))
    builder.add_node("check_output", _both("check_output", check_output, acheck_output, spec))
    builder.add_node("confirm", traced("confirm", reported(partial(confirm, spec=spec))))
    builder.add_edge(START, "validate_input")
    builder.add_conditional_edges("validate_input", route_after_input)
    builder.add_conditional_edges("reason", route_after_reason, ["approve", "act", "check_output", END])
    builder.add_edge("approve", "act")
    builder.add_conditional_edges("act", route_after_act)
    builder.add_conditional_edges("check_output", route_after_check)
    builder.add_edge("confirm", END)
    return builder


def _both(
    name: str, sync: Any, asynchronous: Any, spec: AgentSpec, *, report: bool = True
) -> RunnableCallable:
    """A node with a sync and an async body: `invoke` runs the one, `ainvoke` the other. LangGraph's
    `RunnableCallable` (as LangChain's `create_agent` uses it) reads the arguments to inject
    (`runtime`, `config`) from the sync body's signature; both bodies take the same ones."""
    return RunnableCallable(
        traced(name, reported(partial(sync, spec=spec))),
        traced(name, reported(partial(asynchronous, spec=spec))),
        name=name,
        trace=False,
    )


def _is_async(tool: BaseTool) -> bool:
    """A tool with only a coroutine (`StructuredTool.from_function(coroutine=...)`, an async
    `BaseTool._arun`): it runs on the event loop in async runs."""
    if getattr(tool, "coroutine", None) is not None:
        return getattr(tool, "func", None) is None
    return type(tool)._arun is not BaseTool._arun and type(tool)._run is BaseTool._run


def _default_cache() -> ModelCache:
    return SqliteModelCache(Settings.from_env().data_dir / "model_cache.db")


def _default_ledger() -> EffectLedger:
    return SqliteLedger(Settings.from_env().data_dir / "effects.db")


def build_graph(
    contract: Contract[Any, Any],
    tools: Sequence[BaseTool] = (),
    *,
    model: ModelSource | Sequence[ModelSource] | ModelChain | None = None,
    checkpointer: Checkpointer | Literal["default"] = "default",
    store: BaseStore | Literal["default"] | None = "default",
    name: str | None = None,
    **options: Unpack[GraphOptions],
) -> CompiledStateGraph[State, Context, InputState, OutputState]:
    """Compile the keelgraph flow for `contract` and `tools` (see `graph_builder`; every other
    keyword is a `GraphOptions` field).

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
    builder = graph_builder(contract, tools, model=model, **options)
    if store == "default":
        store = None
        if checkpointer == "default":
            from keelgraph.graphs.persistence import default_store

            store = default_store()
    if checkpointer == "default":
        from keelgraph.graphs.persistence import default_checkpointer

        checkpointer = default_checkpointer()
    return builder.compile(checkpointer=checkpointer, store=store, name=name or contract.name or "keelgraph")
