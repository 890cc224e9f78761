"""What the nodes share about the turn in progress: its stats, history, facts and failures."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import AnyMessage
from langgraph.config import get_config, get_store
from langgraph.store.base import BaseStore

from keelgraph.contracts.errors import Attempt, Problem, RepairExhausted
from keelgraph.graphs.history import recent_history
from keelgraph.graphs.prompt import kind_of
from keelgraph.graphs.spec import AgentSpec
from keelgraph.graphs.state import State, Stats
from keelgraph.tools.execution import GuardContext
from keelgraph.tools.gate import TurnFacts

__all__ = [
    "RAW_LIMIT",
    "answered_position",
    "as_text",
    "exhausted",
    "failed",
    "guard_context",
    "new_attempt",
    "stuck",
    "thread_id",
    "turn_facts",
    "turn_id",
    "with_history",
    "zero_stats",
]

RAW_LIMIT = 4_000
"""What an attempt keeps of the model's raw output, in characters."""

SAME_OUTPUT_TWICE = "the model repeated the same invalid output; stopped early"
BUDGET_SPENT = "repair budget of {budget} spent"


def zero_stats() -> Stats:
    """The stats of a turn that has not called anything yet."""
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


def as_text(raw: Any) -> str:
    """A request as the text kept in the thread, whatever it was."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, (bytes, bytearray)):
        return raw.decode("utf-8", errors="replace")
    return json.dumps(raw, default=repr, ensure_ascii=False)


def thread_id() -> str:
    """The running graph's thread id ("" without a checkpointer, or outside a graph run)."""
    try:
        configurable = get_config().get("configurable", {})
    except RuntimeError:  # called outside a runnable context
        return ""
    return str(configurable.get("thread_id", "") or "")


def turn_id(state: State) -> str:
    """The id of this turn's request message: stable across a resume of the same turn."""
    for msg in reversed(state.get("messages", [])):
        if kind_of(msg) in {"request", "rejected"}:
            return str(msg.id)
    return ""


def with_history(state: State, spec: AgentSpec) -> State:
    """`state` with the earlier turns the model is shown put back in front of this turn.

    A compacted thread's state holds only the turn in progress (see `graphs.validate`). The requests
    and answers of its earlier turns are read back from the archive, newest first, up to
    `spec.history_tokens` (no store request when this process archived or read them already), so
    the prompt, the tool guards (`GuardContext.earlier_answers`) and the `from_user` check see what
    they saw when those turns stayed in the state. For reading only: nodes return new messages.
    """
    turns = state.get("archived_turns", 0)
    if not turns or spec.history_tokens is None:
        return state
    try:
        store: BaseStore | None = get_store()
        thread = get_config().get("configurable", {}).get("thread_id")
    except RuntimeError:  # outside a graph run
        return state
    if store is None or thread is None:
        return state
    head = state.get("archive_head", "")
    earlier = recent_history(store, str(thread), turns=turns, head=head, budget_tokens=spec.history_tokens)
    messages: list[AnyMessage] = state.get("messages", [])
    held = {m.id for m in messages}  # a state from before turns left it whole may hold some of them
    earlier = [m for m in earlier if m.id not in held]
    return {**state, "messages": [*earlier, *messages]} if earlier else state


def guard_context(state: State) -> GuardContext:
    """What a tool's guard, choices and approval predicate see of this turn."""
    return turn_facts(state).guard()


def turn_facts(state: State) -> TurnFacts:
    """The turn as the tool gate reads it: plain data taken from the state (with its history)."""
    messages = state.get("messages", [])
    return TurnFacts(
        request=state.get("input") or {},
        earlier_answers=[json.loads(str(m.content)) for m in messages if kind_of(m) == "answer"],
        tool_log=state.get("tool_log", []),
        user_text=" ".join(str(m.content) for m in messages if kind_of(m) == "request"),
        decisions=state.get("approvals", {}),
        thread_id=thread_id(),
        turn_id=turn_id(state),
    )


def new_attempt(
    attempts: list[dict[str, Any]], kind: str, raw: str, problems: list[Problem]
) -> dict[str, Any]:
    """The next failed attempt of the turn, as data (raw output cut to `RAW_LIMIT`)."""
    return Attempt(number=len(attempts) + 1, kind=kind, raw=raw[:RAW_LIMIT], problems=problems).model_dump()


def stuck(attempts: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the last two failed attempts are the same output with the same problems: the model
    gave its rejected answer again, and telling it once more will not help."""
    if len(attempts) < 2:
        return False
    a, b = attempts[-2], attempts[-1]
    return bool(a["raw"] == b["raw"] and a["problems"] == b["problems"])


def answered_position(stats: Mapping[str, Any]) -> int:
    """The position in the model chain of the model that answered last this turn (0 before any)."""
    answered = [a["position"] for a in stats.get("model_attempts", []) if a["outcome"] == "ok"]
    return answered[-1] if answered else 0


def exhausted(
    spec: AgentSpec, attempts: list[dict[str, Any]], stats: Mapping[str, Any] | None = None
) -> str | None:
    """Why the repair loop must stop now, or None while it may go on. A model that repeats its
    rejected answer stops the loop, unless a later model of the chain can take the turn (a cascade:
    see `graphs.model_call.first_position`)."""
    if len(attempts) > spec.contract.repair_budget:
        return BUDGET_SPENT.format(budget=spec.contract.repair_budget)
    if stuck(attempts):
        if stats is not None and answered_position(stats) + 1 < len(spec.chain.models):
            return None
        return SAME_OUTPUT_TWICE
    return None


def failed(state: State, attempts: list[dict[str, Any]], stats: Stats, message: str = "") -> dict[str, Any]:
    """The update that ends the turn with `RepairExhausted` carrying every attempt."""
    stats = {**stats, "seconds": round(time.time() - state.get("started", time.time()), 3)}
    usage = {k: int(stats[k]) for k in ("model_calls", "input_tokens", "output_tokens")}
    error = RepairExhausted([Attempt.model_validate(a) for a in attempts], usage=usage, message=message)
    return {"status": "failed", "error": error.to_failure().model_dump(), "stats": stats, "pending": None}
