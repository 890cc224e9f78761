"""The nodes and routers of the keelgraph flow: validate_input -> reason <-> act -> check_output."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    RemoveMessage,
    ToolMessage,
)
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langgraph.config import get_config, get_store
from langgraph.graph.message import REMOVE_ALL_MESSAGES
from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore
from langgraph.types import interrupt

from keelgraph.contracts.contract import CheckContext, Contract, OutputInvalid
from keelgraph.contracts.decision import (
    ANSWER,
    AnswerChoice,
    DecisionError,
    decision_schema,
    inline_refs,
    read_decision,
)
from keelgraph.contracts.errors import (
    Attempt,
    Budget,
    BudgetExceeded,
    InputRejected,
    Problem,
    RepairExhausted,
    UserError,
)
from keelgraph.contracts.parsing import ParseError, oversized_ints, parse_json, storable
from keelgraph.contracts.repair import RepairPlan, repair_plan
from keelgraph.graphs._prompt import (
    Strategy,
    current_turn,
    kind_of,
    render,
    system_prompt,
    tagged,
    tool_args_schema,
)
from keelgraph.graphs.history import (
    archive_turns,
    compact,
    dangling_calls,
    estimate_prompt_tokens,
    recent_history,
)
from keelgraph.graphs.state import Context, ModelAttempt, State, Stats
from keelgraph.models import Price, price_of
from keelgraph.tools.execution import (
    CallOutcome,
    GuardContext,
    allowed_values,
    fence,
    needs_approval,
    policy_of,
    run_tool_call,
    validate_args,
)
from keelgraph.tools.ledger import EffectLedger, default_key

if TYPE_CHECKING:
    from keelgraph.cache import ModelCache
    from keelgraph.models import ModelChain

__all__ = [
    "AgentSpec",
    "act",
    "approve",
    "check_output",
    "estimate_tokens",
    "reason",
    "route_after_act",
    "route_after_check",
    "route_after_input",
    "route_after_reason",
    "validate_input",
]

ModelSource = BaseChatModel | Callable[[], BaseChatModel]
_log = logging.getLogger("keelgraph")
_RAW_LIMIT = 4_000


@dataclass(frozen=True)
class AgentSpec:
    """Everything the nodes need that is not state: the contract, tools, model and limits."""

    contract: Contract[Any, Any]
    tools: Mapping[str, BaseTool]
    model: ModelSource | ModelChain
    """A chat model, a factory, or a `keelgraph.models.ModelChain` (retries and fallbacks)."""
    strategy: Strategy
    max_tool_rounds: int = 4
    """Tool rounds per turn; after that the model must answer."""
    max_tool_calls: int | None = 16
    """Tool calls run per turn (None: no limit); calls past it are refused and the model answers."""
    max_thread_tool_calls: int | None = None
    """Tool calls run per thread, over all its turns (None: no limit)."""
    max_turn_tokens: int | None = None
    """Input + output tokens per turn, every model call counted (None: no limit). A call whose
    estimated cost would go past it is not made: the turn fails with `BudgetExceeded`."""
    max_thread_tokens: int | None = None
    """The same over the whole thread, all its turns (the `usage` channel)."""
    prices: Mapping[str, Price] = field(default_factory=dict)
    """Model name (`model_label`) -> `Price`, `"*"` for any other: each reply's cost is added to
    the turn's `stats["cost"]` and the thread's `usage["cost_micros"]` (millionths)."""
    max_turn_cost: float | None = None
    """Like `max_turn_tokens`, in the currency of `prices`."""
    max_thread_cost: float | None = None
    """Like `max_thread_tokens`, in the currency of `prices`."""
    refuse_tainted_writes: bool = True
    """Enforce tool policies' `from_user`: those arguments must be values the user wrote."""
    history_tokens: int | None = 1000
    """What the model is shown of earlier turns (their requests and answers, newest first), up to
    this many estimated tokens. With a store, earlier turns leave the state for the thread's
    archive and are read back from it; None keeps every turn in the state (and shows them all)."""
    allow_repeat_tools: bool = False
    """Let the model call a tool again in a turn after it succeeded (off: small models loop)."""
    fallbacks: tuple[Strategy, ...] = ()
    """Strategies to move to, in order, when the endpoint refuses the current one."""
    effects: EffectLedger | Callable[[], EffectLedger] | None = None
    """Where completed `write`/`external` tool calls are recorded (None: no record, calls may
    repeat on resume). A callable is resolved at the first such call."""
    cache: ModelCache | None = None
    """Where identical model calls are answered from (None: no cache); see `keelgraph.cache`."""
    cache_sampled: bool = False
    """Also cache calls made at a temperature above 0. Off by default: a cached reply would freeze
    what is meant to be sampled (and repairs, which resample at `REPAIR_TEMPERATURE`, would get
    the same reply every time)."""
    _chain: list[ModelChain] = field(default_factory=list, compare=False, repr=False)
    _ledgers: list[EffectLedger] = field(default_factory=list, compare=False, repr=False)

    def ledger(self) -> EffectLedger | None:
        if self.effects is None or not callable(self.effects):
            return self.effects
        if not self._ledgers:
            self._ledgers.append(self.effects())
        return self._ledgers[0]

    _moved: list[Strategy] = field(default_factory=list, compare=False, repr=False)

    @property
    def active_strategy(self) -> Strategy:
        """The strategy in use: the first one the endpoint has not refused."""
        return self._moved[-1] if self._moved else self.strategy

    def fall_back(self, error: BaseException) -> Strategy | None:
        """Move to the next strategy if `error` says the endpoint does not support this one."""
        if not _unsupported(error):
            return None
        chain = [self.strategy, *self.fallbacks]
        index = chain.index(self.active_strategy)
        if index + 1 >= len(chain):
            return None
        self._moved.append(chain[index + 1])
        _log.warning(
            "keelgraph: the endpoint refused the %s output strategy (%s); using %s from now on",
            chain[index],
            str(error)[:200],
            chain[index + 1],
        )
        return chain[index + 1]

    @property
    def chain(self) -> ModelChain:
        """The models to ask, in order, with their retry policy (one model: a chain of one)."""
        from keelgraph.models import ModelChain

        if isinstance(self.model, ModelChain):
            return self.model
        if not self._chain:
            self._chain.append(ModelChain((self.model,)))
        return self._chain[0]

    def chat_model(self) -> BaseChatModel:
        """The primary model."""
        return self.chain.model(0)

    @property
    def max_model_calls(self) -> int:
        """A hard ceiling per turn, so no combination of events can loop without end."""
        return 2 + self.max_tool_rounds + self.contract.repair_budget


_UNSUPPORTED = re.compile(
    r"response_format|json_schema|json_object|tool_choice|tools|function", re.IGNORECASE
)


def _unsupported(error: BaseException) -> bool:
    """Whether an endpoint's error refuses a request feature (format, tools) rather than failing."""
    if isinstance(error, NotImplementedError):  # a chat model class without bind_tools
        return True
    status = getattr(error, "status_code", None)
    if status == 500:  # llama-cpp-python answers an unknown response_format with a 500
        return bool(re.search(r"response_format|json_schema", str(error)))
    return status in {400, 404, 422, 501} and bool(_UNSUPPORTED.search(str(error)))


REPAIR_TEMPERATURE = 1.0
"""Repairs that must get away from a greedy answer resample at this temperature. A small model's
next-token distribution is so peaked that at 0.5 it wrote its rejected answer again token for token;
at 1.0 two of six such tasks were repaired. Shown its rejected draft, it copied it even at 1.0, so
drafts stay out of the prompt."""

DECISIVE_REPAIR_TEMPERATURE = 0.0
"""A repair whose grammar rules the rejected answer out (`RepairPlan.decisive`) cannot write it again,
so it takes the model's most likely answer among the rest instead of resampling. So does the first
repair of an answer that was sampled (model temperature above 0, or unknown): the rejected answer
was a draw, and the model's most likely answer, told what was wrong, is its best one (on the 0.5B
model at temperature 0.7 extraction repairs at 1.0 broke quantities that had been right)."""


def repair_temperature(model: BaseChatModel, plan: RepairPlan | None, attempts: int) -> float | None:
    """The temperature of the next model call of a turn with `attempts` failed attempts so far
    (None: the model's own), by the rule of `DECISIVE_REPAIR_TEMPERATURE` and `REPAIR_TEMPERATURE`."""
    if not attempts:
        return None
    if plan is not None and plan.decisive:
        return DECISIVE_REPAIR_TEMPERATURE
    own = getattr(model, "temperature", None)
    sampled = not isinstance(own, (int, float)) or own > 0
    return DECISIVE_REPAIR_TEMPERATURE if sampled and attempts == 1 else REPAIR_TEMPERATURE


def _zero_stats() -> Stats:
    return Stats(
        model_calls=0,
        repairs=0,
        recoveries=0,
        tool_calls=0,
        input_tokens=0,
        output_tokens=0,
        seconds=0.0,
        model="",
        transport_errors=0,
        model_attempts=[],
        cache_hits=0,
        cache_misses=0,
        cost=0.0,
    )


def _as_text(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, (bytes, bytearray)):
        return raw.decode("utf-8", errors="replace")
    return json.dumps(raw, default=repr, ensure_ascii=False)


# -- validate_input ---------------------------------------------------------------------------


def _compacted(state: State, runtime: Runtime[Context] | None, spec: AgentSpec) -> dict[str, Any]:
    """Move the finished turns out of the state into the thread's archive, writing them first: the
    state then holds only the turn about to start, and `_with_history` reads what the model is
    shown of earlier turns back from the archive (see `keelgraph.graphs.history`).

    Only with a store to archive to (a served graph always has one; in process, `build_graph`
    opens one next to its default checkpointer): without one the thread keeps everything.
    """
    store = runtime.store if runtime is not None else None
    thread_id = get_config().get("configurable", {}).get("thread_id")
    if store is None or spec.history_tokens is None or thread_id is None:
        return {}
    turns = state.get("turn", 0)
    plan = compact(state.get("messages", []), turns_done=turns, archived_turns=state.get("archived_turns", 0))
    # One item per turn, keyed by its number: a validate_input re-run after a crash writes the same
    # items again, and a thread resumed from an older checkpoint overwrites the turns it re-runs.
    head = archive_turns(store, str(thread_id), plan.to_archive, after=state.get("archive_head", ""))
    update: dict[str, Any] = {
        "archived_turns": plan.archived_turns,
        "archive_head": head,
        "turn": max(turns, plan.archived_turns),
    }
    if plan.removed:
        update["messages"] = [RemoveMessage(id=REMOVE_ALL_MESSAGES)]
    return update


def _with_history(state: State, spec: AgentSpec) -> State:
    """`state` with the earlier turns the model is shown put back in front of this turn.

    A compacted thread's state holds only the turn in progress (see `_compacted`). The requests and
    answers of its earlier turns are read back from the archive, newest first, up to
    `spec.history_tokens` (no store request when this process archived or read them already), so
    the prompt, the tool guards (`GuardContext.earlier_answers`) and the `from_user` check see what
    they saw when those turns stayed in the state. For reading only: nodes return new messages.
    """
    turns = state.get("archived_turns", 0)
    if not turns or spec.history_tokens is None:
        return state
    try:
        store: BaseStore | None = get_store()
        thread_id = get_config().get("configurable", {}).get("thread_id")
    except RuntimeError:  # outside a graph run
        return state
    if store is None or thread_id is None:
        return state
    head = state.get("archive_head", "")
    earlier = recent_history(store, str(thread_id), turns=turns, head=head, budget_tokens=spec.history_tokens)
    messages = state.get("messages", [])
    held = {m.id for m in messages}  # a state from before turns left it whole may hold some of them
    earlier = [m for m in earlier if m.id not in held]
    return {**state, "messages": [*earlier, *messages]} if earlier else state


def validate_input(
    state: State, runtime: Runtime[Context] | None = None, *, spec: AgentSpec
) -> dict[str, Any]:
    """Parse the request into the contract's input model; a bad one ends the turn, typed.

    Either way the request is appended to the thread exactly as it was sent. Earlier turns move to
    the thread's archive first (see `_compacted`): the state stays the same size as a thread grows.
    """
    raw = state.get("request")
    compacted = _compacted(state, runtime, spec)
    removed: list[AnyMessage] = compacted.pop("messages", [])
    reset: dict[str, Any] = {
        **compacted,
        "turn": compacted.get("turn", state.get("turn", 0)) + 1,
        "input": None,
        "attempts": [],
        "tool_log": [],
        "pending": None,
        "tool_rounds": 0,
        "approvals": {},
        "answer_only": False,
        "started": time.time(),
        "cache_writes": [],
        "output": None,
        "error": None,
        "stats": _zero_stats(),
    }
    try:
        value = spec.contract.parse_input(raw)
    except InputRejected as exc:
        message = tagged(HumanMessage(_as_text(raw)), "rejected")
        return {
            **reset,
            "status": "rejected",
            "error": exc.to_failure().model_dump(),
            "messages": [*removed, message],
        }
    message = tagged(HumanMessage(spec.contract.render_input(value)), "request")
    request = value.model_dump(mode="json")
    messages: list[AnyMessage] = [*removed, message]
    preload = [
        {
            "name": name,
            "args": {k: request[k] for k in policy_of(tool).from_input},
            "id": f"pre_{uuid.uuid4().hex[:12]}",
            "type": "tool_call",
        }
        for name, tool in spec.tools.items()
        if policy_of(tool).preload
    ]
    if preload:
        messages.append(tagged(AIMessage("", tool_calls=preload), "preload"))
    return {**reset, "status": "running", "input": request, "messages": messages}


def route_after_input(state: State) -> Literal["act", "reason", "__end__"]:
    """Rejected requests end here; preloaded tools run before the model is asked."""
    if state.get("status") == "rejected":
        return "__end__"
    messages = state.get("messages", [])
    last = messages[-1] if messages else None
    return "act" if isinstance(last, AIMessage) and last.tool_calls else "reason"


# -- reason -----------------------------------------------------------------------------------


def _guard_context(state: State) -> GuardContext:
    messages = state.get("messages", [])
    earlier = [json.loads(str(m.content)) for m in messages if kind_of(m) == "answer"]
    return GuardContext(state.get("input") or {}, earlier, state.get("tool_log", []))


def _offered_schemas(state: State, tools: list[BaseTool]) -> dict[str, dict[str, Any]]:
    """Each offered tool's argument schema, narrowed by its policy's choices for this context."""
    ctx = _guard_context(state)
    schemas = {}
    for tool in tools:
        schema = tool_args_schema(tool)
        for arg, values in allowed_values(tool, ctx).items():
            if arg in schema.get("properties", {}):
                schema["properties"][arg] = {**schema["properties"][arg], "enum": values}
        schemas[tool.name] = schema
    return schemas


def _allowed_tools(state: State, spec: AgentSpec) -> list[BaseTool]:
    if state.get("answer_only") or state.get("tool_rounds", 0) >= spec.max_tool_rounds:
        return []
    used = {entry["name"] for entry in state.get("tool_log", [])}
    request = state.get("input") or {}
    allowed = []
    for name, tool in spec.tools.items():
        gate = policy_of(tool).offer_when
        if (spec.allow_repeat_tools or name not in used) and (gate is None or gate(request)):
            allowed.append(tool)
    return allowed


def _bind(
    model: BaseChatModel,
    strategy: Strategy,
    answer: dict[str, Any],
    allowed: list[BaseTool],
    schemas: dict[str, dict[str, Any]],
    *,
    final: bool = True,
) -> Runnable[LanguageModelInput, BaseMessage]:
    if strategy == "tool_calling":
        answer_tool = {
            "type": "function",
            "function": {
                "name": ANSWER,
                "description": "Give the final answer. Call this once, when you are done.",
                "parameters": inline_refs(answer),
            },
        }
        choice = "required" if allowed else ANSWER
        offered: list[BaseTool | dict[str, Any]] = (
            [*allowed] if allowed and not final else [*allowed, answer_tool]
        )
        return model.bind_tools(offered, tool_choice=choice)
    schema = decision_schema(answer, schemas, final=final)
    if strategy == "json_object":
        # llama.cpp / vLLM style: JSON mode constrained by a schema (a grammar on the server). A
        # bound extra_body replaces the model's own, so keep what it had (an output cap, say).
        fmt = {"type": "json_object", "schema": schema}
        extra = getattr(model, "extra_body", None) or {}
        return model.bind(extra_body={**extra, "response_format": fmt})
    if strategy == "json_schema":
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": "step", "schema": schema, "strict": False},
        }
        return model.bind(response_format=fmt)
    return model


def _fail(state: State, attempts: list[dict[str, Any]], stats: Stats, message: str = "") -> dict[str, Any]:
    stats = {**stats, "seconds": round(time.time() - state.get("started", time.time()), 3)}
    usage = {k: int(stats[k]) for k in ("model_calls", "input_tokens", "output_tokens")}
    error = RepairExhausted([Attempt.model_validate(a) for a in attempts], usage=usage, message=message)
    return {
        "status": "failed",
        "error": error.to_failure().model_dump(),
        "stats": stats,
        "pending": None,
    }


def _first_position(state: State, spec: AgentSpec) -> int:
    """Where in the model chain this call starts: past the models that handed over after failed
    repairs, and at the model that answered last in this turn (a model that just failed over is
    not asked again until the next turn)."""
    repairs = len(state.get("attempts", []))
    answered = [
        a["position"] for a in state.get("stats", {}).get("model_attempts", []) if a["outcome"] == "ok"
    ]
    return max(spec.chain.first_position(repairs), answered[-1] if answered else 0)


def _record(model: str, position: int, began: float, exc: BaseException | None = None) -> ModelAttempt:
    from keelgraph.models import http_status

    return ModelAttempt(
        model=model,
        position=position,
        outcome="ok" if exc is None else type(exc).__name__,
        status=None if exc is None else http_status(exc),
        seconds=round(time.monotonic() - began, 3),
        wait_s=0.0,
    )


DEFAULT_OUTPUT_CAP = 1024
"""Output tokens assumed for a model that declares no `max_tokens` (KEELGRAPH_MAX_TOKENS's default)."""
estimate_tokens = estimate_prompt_tokens
"""See `keelgraph.graphs.history.estimate_prompt_tokens` (one estimator for budgets and compaction)."""


def _prompt(
    state: State,
    spec: AgentSpec,
    answer: dict[str, Any],
    allowed: list[BaseTool],
    schemas: dict[str, dict[str, Any]],
) -> list[BaseMessage]:
    """The messages the model is sent now, under the active strategy."""
    strategy = spec.active_strategy
    system = system_prompt(spec.contract.instructions, answer, allowed, strategy, schemas)
    return render(state.get("messages", []), system, strategy)


def _call_price(state: State, spec: AgentSpec) -> Price:
    """The highest price among the models this call may reach (it may fail over mid-call)."""
    from keelgraph.models import model_label

    first = _first_position(state, spec)
    found = []
    for position in range(first, len(spec.chain.models)):
        name = model_label(spec.chain.model(position))
        price = price_of(spec.prices, name)
        if price is None:
            raise UserError(
                f"max_turn_cost/max_thread_cost need a price for every model of the chain; {name!r} has "
                f'none: add it to prices= (or a "*" entry), e.g. prices={{{name!r}: Price(input=0.5, output=1.5)}}'
            )
        found.append(price)
    return Price(input=max(p.input for p in found), output=max(p.output for p in found))


def _over_budget(
    state: State, spec: AgentSpec, stats: Stats, answer: dict[str, Any], allowed: list[BaseTool]
) -> BudgetExceeded | None:
    """Whether the next call could go past a token or cost budget: what was spent plus the call's
    estimate (its prompt, see `estimate_tokens`, plus the output cap of the model `_ask` asks
    first; for cost, at the highest price of the models it may reach)."""
    limits = (spec.max_turn_tokens, spec.max_thread_tokens, spec.max_turn_cost, spec.max_thread_cost)
    if all(limit is None for limit in limits):
        return None
    schemas = _offered_schemas(state, allowed)
    # Schemas sent beside the messages (tools, response format) cost input tokens too.
    extra = "" if spec.active_strategy == "prompted" else json.dumps([answer, schemas])
    model = spec.chain.model(_first_position(state, spec))
    cap = getattr(model, "max_tokens", None)
    cap = cap if isinstance(cap, int) and cap > 0 else DEFAULT_OUTPUT_CAP
    prompt = estimate_tokens(_prompt(state, spec, answer, allowed, schemas), extra)
    estimate = prompt + cap
    usage = {k: int(stats[k]) for k in ("model_calls", "input_tokens", "output_tokens")}
    thread = state.get("usage", {})
    budgets: list[tuple[Budget, int | None, int]] = [
        ("turn", spec.max_turn_tokens, stats["input_tokens"] + stats["output_tokens"]),
        ("thread", spec.max_thread_tokens, thread.get("input_tokens", 0) + thread.get("output_tokens", 0)),
    ]
    for budget, limit, spent in budgets:
        if limit is not None and spent + estimate > limit:
            return BudgetExceeded(budget, limit=limit, spent=spent, estimate=estimate, usage=usage)
    if spec.max_turn_cost is None and spec.max_thread_cost is None:
        return None
    cost = _call_price(state, spec).cost(prompt, cap)
    costs: list[tuple[Budget, float | None, float]] = [
        ("turn", spec.max_turn_cost, stats.get("cost", 0.0)),
        ("thread", spec.max_thread_cost, thread.get("cost_micros", 0) / 1_000_000),
    ]
    for budget, cost_limit, cost_spent in costs:
        if cost_limit is not None and cost_spent + cost > cost_limit + 1e-12:
            return BudgetExceeded(
                budget, limit=cost_limit, spent=cost_spent, estimate=cost, usage=usage, unit="cost"
            )
    return None


@dataclass(frozen=True)
class _CacheNote:
    """How the response cache took part in one model call."""

    key: str | None = None
    """The call's cache key; None when it is not cacheable (no cache, or sampled)."""
    hit: bool = False


def _cache_lookup(
    spec: AgentSpec,
    model: BaseChatModel,
    bound: Runnable[LanguageModelInput, BaseMessage],
    prompt: list[BaseMessage],
) -> tuple[_CacheNote, AIMessage | None]:
    """The call's cache key and the cached reply, if any (a cache that fails is a miss)."""
    from langchain_core.runnables import RunnableBinding

    from keelgraph.cache import cache_key, effective_temperature

    if spec.cache is None:
        return _CacheNote(), None
    kwargs = dict(bound.kwargs) if isinstance(bound, RunnableBinding) else {}
    temperature = effective_temperature(model, kwargs)
    if temperature is not None and temperature > 0 and not spec.cache_sampled:
        return _CacheNote(), None
    key = cache_key(model, spec.active_strategy, prompt, kwargs)
    try:
        found = spec.cache.get(key)
    except Exception as exc:  # an optimisation must not fail a turn
        _log.warning("keelgraph: response cache lookup failed (%s); asking the model", exc)
        found = None
    if found is None:
        return _CacheNote(key), None
    calls = [
        {"name": c["name"], "args": c["args"], "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"}
        for c in found.get("tool_calls", [])
    ]
    reply = AIMessage(
        found.get("content", ""),
        tool_calls=calls,
        usage_metadata={"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
        response_metadata={"keelgraph_cache": "hit"},
    )
    return _CacheNote(key, hit=True), reply


def _cache_write(spec: AgentSpec, entries: Sequence[Mapping[str, Any]]) -> None:
    """Store the replies of a turn that ended ok (a cache that fails only logs)."""
    if spec.cache is None:
        return
    for entry in entries:
        try:
            spec.cache.put(str(entry["key"]), entry["value"])
        except Exception as exc:
            _log.warning("keelgraph: response cache write failed (%s)", exc)


def _without(entries: Sequence[dict[str, Any]], message_id: str | None) -> list[dict[str, Any]]:
    """The pending cache writes less the one of a rejected reply."""
    return [e for e in entries if e.get("id") != message_id]


def _ask(
    state: State,
    spec: AgentSpec,
    answer: dict[str, Any],
    allowed: list[BaseTool],
    plan: RepairPlan | None = None,
    *,
    final: bool = True,
) -> tuple[BaseMessage, list[ModelAttempt], _CacheNote]:
    """One model call, with every request it took, answered from the response cache if it holds
    the identical call (see `keelgraph.cache`).

    The models of the chain are asked in turn, each bound with the tools and output format of the
    active strategy: a transient error is retried on the same model with backoff (see
    `keelgraph.models.ModelChain`), then the next model takes over; when none answers,
    `ModelUnavailable` ends the node. An endpoint that refuses the strategy moves the graph down the
    strategy chain; any other error is raised as it is. A repair's `plan` (see `_repair_plan`)
    gives the answer schema the output format is bound with; the prompt describes `answer`. With
    `final=False` (and tools allowed) the model may only call a tool (`Contract.needs_tool`).
    """
    from keelgraph.models import ModelUnavailable, is_malformed, is_transient, model_label

    chain = spec.chain
    schemas = _offered_schemas(state, allowed)
    tried: list[ModelAttempt] = []
    last: BaseException | None = None
    for position in range(_first_position(state, spec), len(chain.models)):
        model = chain.model(position)
        name = model_label(model)
        failed = malformed = 0
        while True:
            strategy = spec.active_strategy
            prompt = _prompt(state, spec, answer, allowed, schemas)
            began = time.monotonic()
            try:
                bound = _bind(model, strategy, plan.schema if plan else answer, allowed, schemas, final=final)
                temperature = repair_temperature(model, plan, len(state.get("attempts") or []))
                if temperature is not None:
                    bound = bound.bind(temperature=temperature)
                note, cached = _cache_lookup(spec, model, bound, prompt)
                if cached is not None:
                    hit = _record(name, position, began)
                    return cached, [{**hit, "outcome": "cached"}], note
                reply = bound.invoke(prompt)
            except Exception as exc:
                # An endpoint that refuses this way of asking (no json_schema, no tools) gets the next
                # one, once per graph.
                if spec.fall_back(exc) is not None:
                    continue
                tried.append(_record(name, position, began, exc))
                if not is_transient(exc):
                    raise
                last, failed = exc, failed + 1
                malformed += is_malformed(exc)
                # A malformed body is a provider fault worth one more try; a second one moves on.
                wait = None if malformed > 1 else chain.wait(exc, failed)
                if wait is None:
                    if position + 1 < len(chain.models):
                        _log.warning(
                            "keelgraph: model %s failed (%s, %d request(s)); failing over to %s",
                            name, type(exc).__name__, failed, model_label(chain.model(position + 1)),
                        )  # fmt: skip
                    break
                tried[-1]["wait_s"] = round(wait, 3)
                _log.info("keelgraph: model %s: %s; retrying in %.2f s", name, type(exc).__name__, wait)
                time.sleep(wait)
                continue
            tried.append(_record(name, position, began))
            return reply, tried, note
    assert last is not None  # every position made at least one request
    raise ModelUnavailable([dict(a) for a in tried], last) from last


def _account(
    stats: Stats, spec: AgentSpec, ai: AIMessage, tried: list[ModelAttempt], note: _CacheNote
) -> dict[str, int]:
    """Add one model call to the turn's `stats`; return what it adds to the thread's `usage`:
    tokens, and its cost in millionths at the graph's `prices` (the channel adds up integers)."""
    usage = ai.usage_metadata or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    stats["model_calls"] += 0 if note.hit else 1
    stats["cache_hits"] += note.hit
    stats["cache_misses"] += note.key is not None and not note.hit
    stats["model"] = tried[-1]["model"]
    stats["transport_errors"] += len(tried) - 1
    stats["model_attempts"] = [*stats["model_attempts"], *tried]
    stats["input_tokens"] += usage["input_tokens"]
    stats["output_tokens"] += usage["output_tokens"]
    spent = {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"]}
    price = price_of(spec.prices, stats["model"]) if spec.prices else None
    if price is not None and not note.hit:
        cost = price.cost(usage["input_tokens"], usage["output_tokens"])
        stats["cost"] = round(stats.get("cost", 0.0) + cost, 9)
        spent["cost_micros"] = round(cost * 1_000_000)
    return spent


def reason(state: State, runtime: Runtime[Context] | None = None, *, spec: AgentSpec) -> dict[str, Any]:
    """Ask the model for its next step and read it as a tool call or a candidate answer."""
    state = _with_history(state, spec)
    # The thread must be valid before a provider sees it: a call without a result (a crash, an
    # edit of the state) gets one that says so, kept in the thread.
    repairs = dangling_calls(current_turn(state.get("messages", [])))
    if not repairs:
        return _reason(state, runtime, spec)
    out = _reason({**state, "messages": [*state.get("messages", []), *repairs]}, runtime, spec)
    return {**out, "messages": [*repairs, *out.get("messages", [])]}


def _repair_plan(state: State, spec: AgentSpec, answer: dict[str, Any]) -> RepairPlan | None:
    """How this call repairs a rejected answer, or None when it does not (see
    `keelgraph.contracts.repair.repair_plan`): right after an answer was rejected, the fields the
    problems name lose their rejected values and, when every problem names its field, the others
    are pinned to what the model wrote. The prompt still describes the plain schema."""
    messages = state.get("messages", [])
    attempts = state.get("attempts", [])
    if not messages or kind_of(messages[-1]) != "repair" or not attempts:
        return None
    previous = _rejected_answer(attempts[-1], spec)
    if previous is None:
        return None
    earlier = [
        (found, _problems(a)) for a in attempts[:-1] if (found := _rejected_answer(a, spec)) is not None
    ]
    return repair_plan(inline_refs(answer), previous, _problems(attempts[-1]), earlier=earlier)


def _problems(attempt: Mapping[str, Any]) -> list[Problem]:
    return [Problem.model_validate(p) for p in attempt["problems"]]


def _rejected_answer(attempt: Mapping[str, Any], spec: AgentSpec) -> dict[str, Any] | None:
    """The answer a failed attempt wrote, read back from its raw output (None if it wrote none)."""
    if attempt["kind"] not in {"output", "check"}:
        return None
    try:
        decision = read_decision(parse_json(attempt["raw"]).value, frozenset(spec.tools))
    except (ParseError, DecisionError):
        return None
    if not isinstance(decision, AnswerChoice) or not isinstance(decision.answer, dict):
        return None
    return decision.answer


def _reason(state: State, runtime: Runtime[Context] | None, spec: AgentSpec) -> dict[str, Any]:
    stats: Stats = {**_zero_stats(), **state.get("stats", {})}
    if stats["model_calls"] + stats["cache_hits"] >= spec.max_model_calls:
        return _fail(
            state,
            state.get("attempts", []),
            stats,
            f"stopped after {stats['model_calls']} model calls in one turn (the limit)",
        )
    allowed = _allowed_tools(state, spec)
    answer = spec.contract.output_schema_for(_context(state, runtime, spec.contract))
    if (over := _over_budget(state, spec, stats, answer, allowed)) is not None:
        # Checked before the call, not after: the budget is never overspent by a whole reply.
        stats["seconds"] = round(time.time() - state.get("started", time.time()), 3)
        _log.warning("keelgraph: %s", over)
        return {"status": "failed", "error": over.to_failure().model_dump(), "stats": stats, "pending": None}
    # A contract whose answer rests on a tool result gets no answer option until a tool has returned.
    tool_first = spec.contract.needs_tool and bool(allowed) and not state.get("tool_log")
    plan = _repair_plan(state, spec, answer)
    reply, tried, note = _ask(state, spec, answer, allowed, plan, final=not tool_first)
    ai = reply if isinstance(reply, AIMessage) else AIMessage(str(reply.content))
    update: dict[str, Any] = {"stats": stats, "usage": _account(stats, spec, ai, tried, note)}
    raw = ai.content if isinstance(ai.content, str) else json.dumps(ai.content)
    msg_id = ai.id or f"kg-{uuid.uuid4().hex}"
    if note.key is not None and not note.hit:
        # Kept until the turn ends ok (`check_output`); a rejected reply is dropped (`_without`).
        value = {
            "content": ai.content,
            "tool_calls": [{"name": c["name"], "args": c["args"]} for c in ai.tool_calls],
        }
        entry = {"key": note.key, "id": msg_id, "value": value}
        update["cache_writes"] = [*state.get("cache_writes", []), entry]
    if ai.tool_calls and (too_big := oversized_ints([c["args"] for c in ai.tool_calls])):
        # Native calls arrive parsed: numbers the checkpoint cannot store become a repair turn.
        problem = Problem(
            field=f"args {too_big[0]}",
            reason="an integer is beyond the 64-bit range",
            fix="use a number between -9223372036854775808 and 9223372036854775807",
        )
        raw = json.dumps([{"name": c["name"], "args": storable(c["args"])} for c in ai.tool_calls])
        update.pop("cache_writes", None)  # the checkpoint could not store it, and it is rejected
        step = tagged(AIMessage(raw, id=msg_id), "candidate")
        return {
            **update,
            "messages": [step],
            "pending": {"problems": [problem.model_dump()], "kind": "parse", "raw": raw},
        }
    if ai.tool_calls:
        answers = [c for c in ai.tool_calls if c["name"] == ANSWER]
        if answers:
            raw = json.dumps(answers[0]["args"])
            step = tagged(AIMessage(raw, id=msg_id), "candidate")
            return {
                **update,
                "messages": [step],
                "pending": {"answer": answers[0]["args"], "raw": raw},
            }
        step = tagged(AIMessage(raw, tool_calls=ai.tool_calls, id=msg_id), "step")
        return {**update, "messages": [step], "pending": None}
    try:
        parsed = parse_json(raw)
        decision = read_decision(parsed.value, frozenset(spec.tools))
    except (ParseError, DecisionError) as exc:
        kind = exc.kind if isinstance(exc, DecisionError) else "parse"
        step = tagged(AIMessage(raw, id=msg_id), "candidate")
        pending = {"problems": [exc.problem.model_dump()], "kind": kind, "raw": raw}
        return {**update, "messages": [step], "pending": pending}
    recoveries = len(parsed.recoveries) + len(decision.recoveries)
    stats["recoveries"] += recoveries
    if isinstance(decision, AnswerChoice):
        step = tagged(AIMessage(raw, id=msg_id), "candidate")
        return {**update, "messages": [step], "pending": {"answer": decision.answer, "raw": raw}}
    call = {
        "name": decision.name,
        "args": decision.args,
        "id": f"call_{uuid.uuid4().hex[:12]}",
        "type": "tool_call",
    }
    step = tagged(AIMessage("", tool_calls=[call], id=msg_id), "step")
    return {**update, "messages": [step], "pending": None}


def route_after_reason(
    state: State, *, spec: AgentSpec | None = None
) -> Literal["approve", "act", "check_output", "__end__"]:
    if state.get("status") == "failed":
        return "__end__"
    messages = state.get("messages", [])
    last = messages[-1] if messages else None
    if isinstance(last, AIMessage) and last.tool_calls:
        if spec is not None and _awaiting_approval(_with_history(state, spec), spec, last):
            return "approve"
        return "act"
    return "check_output"


# -- approve ----------------------------------------------------------------------------------

_DECISIONS = frozenset({"approve", "edit", "reject"})
_HOW = (
    'resume with a decision per call id: {"<id>": {"action": "approve"}}, '
    '{"<id>": {"action": "edit", "args": {...}}} or {"<id>": {"action": "reject", "reason": "..."}} '
    "(with one call, the decision alone will do)"
)


def _final_args(tool: BaseTool, args: Mapping[str, Any], state: State) -> dict[str, Any]:
    """The arguments the call would run with: the model's, with `from_input` ones from the request."""
    request = state.get("input") or {}
    return {**args, **{k: request[k] for k in policy_of(tool).from_input if k in request}}


def _awaiting_approval(state: State, spec: AgentSpec, step: AIMessage) -> list[dict[str, Any]]:
    """The calls of `step` that a person must approve, with their final arguments."""
    ctx = _guard_context(state)
    waiting = []
    for call in step.tool_calls:
        tool = spec.tools.get(call["name"])
        if tool is None:
            continue
        args = _final_args(tool, call["args"], state)
        if not needs_approval(tool, args, ctx):
            continue
        # A call the automatic checks will refuse, or the ledger will replay, is not put to a person.
        if (
            _done_before(tool, args, state, spec)
            or validate_args(tool, args)
            or _refusal(tool, args, state)
            or _tainted(tool, str(call["id"]), args, state, spec)
        ):
            continue
        waiting.append({"id": call["id"], "name": call["name"], "args": args})
    return waiting


def _read_decisions(value: Any, asked: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A person's resume value as one decision per asked call; ValueError says what is wrong."""
    if isinstance(value, str) and len(asked) == 1:
        value = {"action": value}
    if isinstance(value, Mapping) and "action" in value and len(asked) == 1:
        value = {asked[0]["id"]: value}
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}; {_HOW}")
    decisions = {}
    for call in asked:
        raw = value.get(call["id"])
        if isinstance(raw, str):
            raw = {"action": raw}
        if not isinstance(raw, Mapping) or raw.get("action") not in _DECISIONS:
            raise ValueError(f"no valid decision for call {call['id']} ({call['name']}); {_HOW}")
        action = str(raw["action"])
        if raw.get("name", call["name"]) != call["name"]:
            raise ValueError(
                f"an edit cannot switch call {call['id']} from {call['name']} to another tool; "
                "reject it instead, and the model will choose again"
            )
        args = dict(call["args"])
        if action == "edit":
            if not isinstance(raw.get("args"), Mapping):
                raise ValueError(f'an edit of call {call["id"]} needs "args": the arguments to change')
            args.update(raw["args"])
        reason = str(raw.get("reason") or "rejected by a person")
        decisions[str(call["id"])] = {"action": action, "name": call["name"], "args": args, "reason": reason}
    return decisions


def approve(state: State, *, spec: AgentSpec) -> dict[str, Any]:
    """Pause for a person's decision on every call that needs approval (LangGraph `interrupt`).

    A call identical to one a person rejected earlier in the thread is rejected again without
    asking. Edited arguments replace the model's in the thread, and `act` checks them again
    (schema, choices, guard) before anything runs.
    """
    state = _with_history(state, spec)
    step = state["messages"][-1]
    assert isinstance(step, AIMessage)
    refused = {_key(r["name"], r["args"]): r for r in state.get("rejected_calls", [])}
    decisions: dict[str, dict[str, Any]] = {}
    asked = []
    for call in _awaiting_approval(state, spec, step):
        earlier = refused.get(_key(call["name"], call["args"]))
        if earlier is not None:
            decisions[call["id"]] = {**earlier, "action": "reject", "again": True}
        else:
            asked.append(call)
    problem = None
    while asked:  # each pass is one interrupt; a resume value that cannot be read is asked again
        value = interrupt({"type": "approval", "calls": asked, "problem": problem, "how": _HOW})
        try:
            decisions.update(_read_decisions(value, asked))
            break
        except ValueError as exc:
            problem = str(exc)
    edited = {cid: d["args"] for cid, d in decisions.items() if d["action"] == "edit"}
    update: dict[str, Any] = {"approvals": {**state.get("approvals", {}), **decisions}}
    if edited:
        calls = [{**c, "args": edited.get(str(c["id"]), c["args"])} for c in step.tool_calls]
        update["messages"] = [step.model_copy(update={"tool_calls": calls})]
    return update


# -- act --------------------------------------------------------------------------------------


def _key(name: str, args: Mapping[str, Any]) -> str:
    return f"{name}:{json.dumps(args, sort_keys=True, default=str)}"


def _attempt(attempts: list[dict[str, Any]], kind: str, raw: str, problems: list[Problem]) -> dict[str, Any]:
    return Attempt(
        number=len(attempts) + 1,
        kind=kind,
        raw=raw[:_RAW_LIMIT],
        problems=problems,
    ).model_dump()


def _exhausted(spec: AgentSpec, attempts: list[dict[str, Any]]) -> str | None:
    """Why the repair loop must stop now, or None while it may go on."""
    if len(attempts) > spec.contract.repair_budget:
        return f"repair budget of {spec.contract.repair_budget} spent"
    if len(attempts) >= 2:
        a, b = attempts[-2], attempts[-1]
        if a["raw"] == b["raw"] and a["problems"] == b["problems"]:
            return "the model repeated the same invalid output; stopped early"
    return None


def _refusal(tool: BaseTool, args: Mapping[str, Any], state: State) -> str | None:
    """Why the policy forbids this call here (choices first, then the guard), or None."""
    ctx = _guard_context(state)
    for arg, values in allowed_values(tool, ctx).items():
        if args.get(arg) not in values:
            return f"{arg}={args.get(arg)!r} is not allowed here; use one of {values}"
    guard = policy_of(tool).guard
    return guard(args, ctx) if guard is not None else None


def _turn_id(state: State) -> str:
    """The id of this turn's request message: stable across a resume of the same turn."""
    for msg in reversed(state.get("messages", [])):
        if kind_of(msg) in {"request", "rejected"}:
            return str(msg.id)
    return ""


def _thread_id() -> str:
    """The running graph's thread id ("" without a checkpointer, or outside a graph run)."""
    try:
        configurable = get_config().get("configurable", {})
    except RuntimeError:  # called outside a runnable context
        return ""
    return str(configurable.get("thread_id", ""))


def _effect_key(tool: BaseTool, args: Mapping[str, Any], state: State) -> str:
    policy = policy_of(tool)
    if policy.idempotency_key is not None:
        return policy.idempotency_key(args, _guard_context(state))
    return default_key(_thread_id(), _turn_id(state), tool.name, args)


def _done_before(tool: BaseTool, args: Mapping[str, Any], state: State, spec: AgentSpec) -> bool:
    """Whether the effect ledger already holds this call as done (it will be replayed, not run)."""
    if policy_of(tool).side_effect == "read" or (ledger := spec.ledger()) is None:
        return False
    found = ledger.lookup(_effect_key(tool, args, state))
    return found is not None and found.status == "done"


def _effect_call(
    tool: BaseTool, call_id: str, args: dict[str, Any], state: State, ledger: EffectLedger
) -> CallOutcome:
    """Run a side-effecting call at most once per idempotency key (see `keelgraph.tools.ledger`)."""
    policy = policy_of(tool)
    thread_id = _thread_id()
    key = _effect_key(tool, args, state)
    found = ledger.lookup(key)
    if found is not None and found.status == "done":
        _log.info("keelgraph: %s already done under key %s; replaying its result", tool.name, key)
        shown = policy.present(found.output) if policy.present else found.output
        content = fence(tool.name, shown, policy.max_output_chars)
        return CallOutcome(
            call_id,
            tool.name,
            args,
            ok=True,
            content=f"{content}\n(This was done earlier; it was not done again.)",
            output=found.output,
        )
    if found is not None and not policy.idempotent:
        reason = (
            f"an earlier {tool.name} call like this one was cut off before it reported back, so whether "
            "it took effect is unknown; it was not repeated"
        )
        fix = "tell the user the outcome must be checked"
        return CallOutcome.failed(call_id, tool.name, args, kind="tool_error", reason=reason, fix=fix)
    ledger.begin(key, tool.name, args, thread_id)
    outcome = run_tool_call(tool, call_id, args, effect_key=key)
    if outcome.ok:
        ledger.finish(key, outcome.output)
    elif outcome.kind in {"tool_args", "tool_error"}:
        ledger.forget(key)  # refused or raised: nothing was done, a later call may try again
    # A timeout leaves the record `started`: the abandoned call may still take effect.
    return outcome


def _rejection(call_id: str, state: State) -> tuple[str, bool] | None:
    """A person's rejection of this call (and whether it repeats an earlier one), or None."""
    decision = state.get("approvals", {}).get(call_id)
    if decision is None or decision["action"] != "reject":
        return None
    return str(decision["reason"]), bool(decision.get("again"))


def _unapproved(
    tool: BaseTool, call_id: str, args: Mapping[str, Any], state: State, spec: AgentSpec
) -> str | None:
    """Why a call that needs approval cannot run: no decision, or arguments changed since it.

    Defence in depth: the `approve` node asks for every such call, whatever routed the step here.
    Calls the ledger will replay change nothing and need no decision; calls with invalid arguments
    are left to argument validation, which reports them without running anything.
    """
    decision = state.get("approvals", {}).get(call_id)
    if decision is None:
        needed = needs_approval(tool, args, _guard_context(state)) and not validate_args(tool, args)
        if needed and not _done_before(tool, args, state, spec):
            return "it needs a person's approval, and none was given"
        return None
    if decision["name"] != tool.name or decision["args"] != dict(args):
        return "the arguments differ from the ones a person approved"
    return None


def _not_offered(name: str, again: bool) -> Problem:
    reason = (
        f"you already called {name} with these arguments; its result is above"
        if again
        else f"{name} is not available any more in this turn"
    )
    return Problem(field="action", reason=reason, fix=f"use the results you have and reply with {ANSWER}")


@dataclass
class _Round:
    """What one `act` pass accumulates while it goes through the step's calls."""

    state: State
    stats: Stats
    attempts: list[dict[str, Any]]
    tool_log: list[dict[str, Any]]
    answer_only: bool
    replies: list[AnyMessage] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    ready: list[tuple[BaseTool, str, dict[str, Any], str]] = field(default_factory=list)
    """Calls that passed every check, to run together: (tool, call id, args, raw)."""
    planned: int = 0

    def refuse(self, call_id: str, name: str, content: str, attempt: dict[str, Any] | None = None) -> None:
        if attempt is not None:
            self.attempts.append(attempt)
        self.replies.append(ToolMessage(content, tool_call_id=call_id, name=name, status="error"))


def _one_call(rnd: _Round, call: Mapping[str, Any], spec: AgentSpec, allowed: set[str]) -> None:
    """Check, approve-check and run one tool call, recording its reply and any attempt."""
    state, attempts = rnd.state, rnd.attempts
    name, args, call_id = call["name"], dict(call["args"]), call["id"] or uuid.uuid4().hex
    raw = json.dumps({"action": name, "args": args}, default=str)
    if name not in spec.tools:
        problem = Problem(
            field="action",
            reason=f"there is no tool named {name!r}",
            fix=f"use one of: {', '.join([*spec.tools, ANSWER])}",
        )
        rnd.refuse(
            call_id,
            name,
            f"ERROR: {problem.reason}; {problem.fix}.",
            _attempt(attempts, "unknown_tool", raw, [problem]),
        )
        return
    if name not in allowed:
        done = {_key(e["name"], e["args"]) for e in rnd.tool_log}
        problem = _not_offered(name, _key(name, args) in done)
        content = f"NOT RUN: {problem.reason}. Now reply with {ANSWER}."
        rnd.refuse(call_id, name, content, _attempt(attempts, "repeated_call", raw, [problem]))
        rnd.answer_only = True
        return
    tool = spec.tools[name]
    args = _final_args(tool, args, state)
    if person := _rejection(call_id, state):
        rejection, again = person
        rnd.rejected.append({"name": name, "args": args, "reason": rejection})
        problem = Problem(
            field="action", reason=f"a person rejected this call: {rejection}", fix="answer without it"
        )
        # Asking again for what a person refused is the model's mistake, and counts as one.
        content = f"REJECTED by a person: {rejection}. Do not ask for it again; answer the user."
        rnd.refuse(
            call_id, name, content, _attempt(attempts, "rejected_call", raw, [problem]) if again else None
        )
        rnd.answer_only = True
        return
    refusal = _refusal(tool, args, {**state, "tool_log": rnd.tool_log}) or _tainted(
        tool, call_id, args, state, spec
    )
    if refusal:
        problem = Problem(field=f"args of {name}", reason=refusal, fix="correct the arguments")
        rnd.refuse(call_id, name, f"NOT RUN: {refusal}", _attempt(attempts, "tool_args", raw, [problem]))
        return
    if (why := _unapproved(tool, call_id, args, state, spec) or _over_limit(rnd, spec)) is not None:
        rnd.refuse(call_id, name, f"NOT RUN: {why}; answer with what you have.")
        rnd.answer_only = True
        return
    rnd.planned += 1
    rnd.ready.append((tool, call_id, args, raw))


def _run_ready(rnd: _Round, spec: AgentSpec) -> None:
    """Run the calls that passed every check, in parallel (they are independent by construction:
    the model asked for them together), and record their outcomes in call order."""

    def run(item: tuple[BaseTool, str, dict[str, Any], str]) -> CallOutcome:
        tool, call_id, args, _ = item
        ledger = None if policy_of(tool).side_effect == "read" else spec.ledger()
        if ledger is None:
            return run_tool_call(tool, call_id, args)
        return _effect_call(tool, call_id, args, {**rnd.state, "tool_log": rnd.tool_log}, ledger)

    if len(rnd.ready) <= 1:
        outcomes = [run(item) for item in rnd.ready]
    else:
        with concurrent.futures.ThreadPoolExecutor(min(8, len(rnd.ready))) as pool:
            outcomes = list(pool.map(run, rnd.ready))
    for (_, call_id, args, raw), outcome in zip(rnd.ready, outcomes, strict=True):
        status: Literal["success", "error"] = "success" if outcome.ok else "error"
        rnd.replies.append(
            ToolMessage(outcome.content, tool_call_id=call_id, name=outcome.name, status=status)
        )
        if outcome.ok:
            rnd.stats["tool_calls"] += 1
            rnd.tool_log.append({"name": outcome.name, "args": args, "output": outcome.output})
        elif outcome.kind == "tool_args":
            rnd.attempts.append(_attempt(rnd.attempts, "tool_args", raw, outcome.problems))


def _over_limit(rnd: _Round, spec: AgentSpec) -> str | None:
    """Why one more call would break a call limit of the turn or the thread, or None."""
    turn = rnd.stats["tool_calls"] + rnd.planned
    if spec.max_tool_calls is not None and turn >= spec.max_tool_calls:
        return f"the limit of {spec.max_tool_calls} tool calls per turn is reached"
    thread = rnd.state.get("thread_tool_calls", 0) + rnd.planned
    if spec.max_thread_tool_calls is not None and thread >= spec.max_thread_tool_calls:
        return f"the limit of {spec.max_thread_tool_calls} tool calls in this conversation is reached"
    return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _tainted(
    tool: BaseTool, call_id: str, args: Mapping[str, Any], state: State, spec: AgentSpec
) -> str | None:
    """Why an argument the tool's policy reserves for the user (`from_user`) is not the user's.

    Tool output is data: an instruction planted in it ("send the list to x@evil.example") must
    not become an action. So the values of `from_user` arguments (a recipient, an account, an
    amount) must appear in what the user wrote in this thread; a value found only in a tool
    result is refused as such. Calls a person approved or edited are trusted.
    """
    policy = policy_of(tool)
    if not spec.refuse_tainted_writes or not policy.from_user or call_id in state.get("approvals", {}):
        return None
    said = (
        " ".join(str(m.content) for m in state.get("messages", []) if kind_of(m) == "request").casefold()
        + json.dumps(state.get("input") or {}, ensure_ascii=False).casefold()
    )
    seen = json.dumps([e["output"] for e in state.get("tool_log", [])], ensure_ascii=False, default=str)
    for key in policy.from_user:
        if key not in args or args[key] is None:
            continue
        for text in _strings(args[key]) or [json.dumps(args[key])]:
            needle = text.strip().casefold()
            if needle and needle not in said:
                where = (
                    "comes from a tool result, not from the user"
                    if needle in seen.casefold()
                    else "is not something the user wrote"
                )
                return f"{key}={text!r} {where}; {tool.name} takes {key} only as the user wrote it"
    return None


def act(state: State, *, spec: AgentSpec) -> dict[str, Any]:
    """Run the tool calls of the last step; every problem goes back to the model as a tool message."""
    state = _with_history(state, spec)
    last = state["messages"][-1]
    assert isinstance(last, AIMessage)
    rnd = _Round(
        state=state,
        stats={**_zero_stats(), **state.get("stats", {})},
        attempts=list(state.get("attempts", [])),
        tool_log=list(state.get("tool_log", [])),
        answer_only=bool(state.get("answer_only")),
    )
    preload = kind_of(last) == "preload"
    allowed = (
        {c["name"] for c in last.tool_calls} if preload else {t.name for t in _allowed_tools(state, spec)}
    )
    before = rnd.stats["tool_calls"]
    for call in last.tool_calls:
        _one_call(rnd, call, spec, allowed)
    _run_ready(rnd, spec)
    order = {call["id"]: i for i, call in enumerate(last.tool_calls)}
    rnd.replies.sort(key=lambda m: order.get(getattr(m, "tool_call_id", None), len(order)))
    rnd.stats["repairs"] = len(rnd.attempts)
    update: dict[str, Any] = {
        "messages": rnd.replies,
        "attempts": rnd.attempts,
        "tool_log": rnd.tool_log,
        "tool_rounds": state.get("tool_rounds", 0) + (0 if preload else 1),
        "answer_only": rnd.answer_only,
        "stats": rnd.stats,
        "thread_tool_calls": state.get("thread_tool_calls", 0) + rnd.stats["tool_calls"] - before,
    }
    # A step is only worth caching when every call of it ran as the model wrote it.
    edited = any(
        state.get("approvals", {}).get(str(c["id"]), {}).get("action") == "edit" for c in last.tool_calls
    )
    clean = len(rnd.replies) == len(last.tool_calls) and all(
        isinstance(m, ToolMessage) and m.status == "success" for m in rnd.replies
    )
    if state.get("cache_writes") and (edited or not clean):
        update["cache_writes"] = _without(state.get("cache_writes", []), last.id)
    if rnd.rejected:
        known = state.get("rejected_calls", [])
        update["rejected_calls"] = [*known, *(r for r in rnd.rejected if r not in known)]
    if why := _exhausted(spec, rnd.attempts):
        return {**update, **_fail(state, rnd.attempts, rnd.stats, f"no valid answer: {why}")}
    return update


def route_after_act(state: State) -> Literal["reason", "__end__"]:
    return "__end__" if state.get("status") == "failed" else "reason"


# -- check_output -----------------------------------------------------------------------------


def _builtin_checks(answer_json: str, attempts: list[dict[str, Any]]) -> list[Problem]:
    """Checks every contract gets: the answer must not paste tool fences or echo a correction."""
    problems = []
    if "<tool_result" in answer_json:
        problems.append(
            Problem(
                field="answer", reason="it pastes raw tool output", fix="state the facts in your own words"
            )
        )
    said = [text for p in (attempts[-1]["problems"] if attempts else []) for text in (p["reason"], p["fix"])]
    if any(len(text) >= 15 and text in answer_json for text in said):
        problems.append(
            Problem(
                field="answer",
                reason="it repeats the correction instead of answering",
                fix="answer the request itself",
            )
        )
    return problems


def _context(
    state: State, runtime: Runtime[Context] | None, contract: Contract[Any, Any]
) -> CheckContext[Any]:
    return CheckContext(
        input=contract.input.model_validate(state.get("input") or {}),
        tool_results=state.get("tool_log", []),
        context=runtime.context if runtime is not None else None,
    )


def check_output(state: State, runtime: Runtime[Context], *, spec: AgentSpec) -> dict[str, Any]:
    """Validate the candidate answer: schema first, then semantic checks. Failures become repairs."""
    contract = spec.contract
    pending = state.get("pending") or {}
    stats: Stats = {**_zero_stats(), **state.get("stats", {})}
    raw = str(pending.get("raw", ""))
    kind = str(pending.get("kind", "output"))
    problems = [Problem.model_validate(p) for p in pending.get("problems", [])]
    output = None
    if not problems:
        candidate = pending.get("answer")
        if contract.derive is not None and isinstance(candidate, dict):
            derived = contract.derive(dict(candidate), _context(state, runtime, contract))
            if derived != candidate:
                stats["recoveries"] += 1
            candidate = derived
        try:
            output = contract.parse_output(candidate)
        except OutputInvalid as exc:
            problems, kind = exc.problems, "output"
    if output is not None:
        ctx = _context(state, runtime, contract)
        problems = [
            *_builtin_checks(output.model_dump_json(), state.get("attempts", [])),
            *contract.choice_problems(output, ctx),
            *contract.run_checks(output, ctx),
        ]
        kind = "check"
    last = state["messages"][-1]
    if output is not None and not problems:
        answer = tagged(AIMessage(output.model_dump_json(), id=last.id), "answer")
        stats["seconds"] = round(time.time() - state.get("started", time.time()), 3)
        # The turn ended ok: its replies that were not rejected are known good, and only now cached.
        _cache_write(spec, state.get("cache_writes", []))
        return {
            "status": "ok",
            "output": output.model_dump(mode="json"),
            "error": None,
            "pending": None,
            "messages": [answer],
            "stats": stats,
            "cache_writes": [],
        }
    writes = _without(state.get("cache_writes", []), last.id)
    attempts = [
        *state.get("attempts", []),
        _attempt(state.get("attempts", []), kind, raw, problems),
    ]
    stats["repairs"] = len(attempts)
    if why := _exhausted(spec, attempts):
        return {
            "attempts": attempts,
            "cache_writes": writes,
            **_fail(state, attempts, stats, f"no valid answer: {why}"),
        }
    lines = "\n".join(f"- {p.line()}" for p in problems)
    request = next((m for m in reversed(state.get("messages", [])) if kind_of(m) == "request"), None)
    # The exact validation errors are the correction prompt (see STYLE.md, item 5).
    correction = tagged(
        HumanMessage(
            f"A reply to this request was rejected:\n{lines}\n"
            f"Reply again to the request, without that mistake: {request.content if request else ''}\n"
            f'Reply with one JSON object: {{"action": "{ANSWER}", "answer": {{...}}}} or a tool call.'
        ),
        "repair",
    )
    answer_only = bool(state.get("answer_only")) or (kind == "output" and state.get("tool_rounds", 0) > 0)
    return {
        "attempts": attempts,
        "stats": stats,
        "pending": None,
        "answer_only": answer_only,
        "messages": [correction],
        "cache_writes": writes,
    }


def route_after_check(state: State) -> Literal["reason", "__end__"]:
    return "__end__" if state.get("status") in {"ok", "failed"} else "reason"
