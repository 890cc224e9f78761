"""The `reason` node: ask the model for its next step and read it as a tool call or an answer."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from langchain_core.messages import AIMessage
from langchain_core.tools import BaseTool
from langgraph.runtime import Runtime

from keelgraph.contracts.boundary import check_value, safe_value
from keelgraph.contracts.decision import ANSWER, AnswerChoice, DecisionError, inline_refs, read_decision
from keelgraph.contracts.errors import Problem
from keelgraph.contracts.parsing import ParseError, parse_json
from keelgraph.contracts.repair import RepairPlan, pin_values, repair_plan
from keelgraph.contracts.suspend import Steps, adrive, drive
from keelgraph.graphs.approve import awaiting_approval
from keelgraph.graphs.budgets import account, over_budget
from keelgraph.graphs.check import check_context
from keelgraph.graphs.events import Decision, ModelFinished, ModelStarted, emit
from keelgraph.graphs.history import dangling_calls
from keelgraph.graphs.model_call import allowed_tools, asking
from keelgraph.graphs.prompt import current_turn, kind_of, tagged
from keelgraph.graphs.spec import AgentSpec
from keelgraph.graphs.state import Context, State, Stats
from keelgraph.graphs.turn import failed, with_history, zero_stats
from keelgraph.tools.execution import policy_of

__all__ = ["areason", "reason", "route_after_reason"]

_log = logging.getLogger("keelgraph")
NO_TOOL_RESULT = (
    "the answer must rest on a tool result (Contract.needs_tool) and no tool returned one in {n} "
    "round(s) of tool calls; see the tool errors in the thread"
)
_SURROGATE = re.compile("[\ud800-\udfff]")


def reason(state: State, runtime: Runtime[Context] | None = None, *, spec: AgentSpec) -> dict[str, Any]:
    """Ask the model for its next step and read it as a tool call or a candidate answer.

    A step with tool calls records which of them wait for a person (`awaiting_approval`), so the
    router after this node reads state only. `areason` is the same node for async runs
    (`ainvoke`, `astream`, LangGraph server): it awaits the model instead of holding a thread.
    """
    return drive(_reasoning(state, runtime, spec))


async def areason(
    state: State, runtime: Runtime[Context] | None = None, *, spec: AgentSpec
) -> dict[str, Any]:
    """`reason`, awaiting the model (`ainvoke`) on the running event loop."""
    return await adrive(_reasoning(state, runtime, spec))


def _reasoning(state: State, runtime: Runtime[Context] | None, spec: AgentSpec) -> Steps[dict[str, Any]]:
    state = with_history(state, spec)
    # The thread must be valid before a provider sees it: a call without a result (a crash, an
    # edit of the state) gets one that says so, kept in the thread.
    repairs = dangling_calls(current_turn(state.get("messages", [])))
    if repairs:
        out = yield from _reason({**state, "messages": [*state.get("messages", []), *repairs]}, runtime, spec)
        out = {**out, "messages": [*repairs, *out.get("messages", [])]}
    else:
        out = yield from _reason(state, runtime, spec)
    step = (out.get("messages") or [None])[-1]
    if "usage" in out:  # the model answered (a step that failed before asking it has no usage)
        emit(_model_finished(out, step))
    waiting: list[str] = []
    if out.get("status") != "failed" and isinstance(step, AIMessage) and step.tool_calls:
        waiting = [str(c["id"]) for c in awaiting_approval(state, spec, step)]
    return {**out, "awaiting_approval": waiting}


def _model_started(state: State, stats: Stats) -> ModelStarted:
    messages = state.get("messages", [])
    return ModelStarted(
        keelgraph="phase",
        phase="model_started",
        call=stats["model_calls"] + stats["cache_hits"] + 1,
        repair=bool(messages) and kind_of(messages[-1]) == "repair",
    )


def _model_finished(out: Mapping[str, Any], step: Any) -> ModelFinished:
    """What the model wrote, as a kind of step: never the text itself, which may yet be rejected."""
    stats = out.get("stats") or {}
    pending = out.get("pending") or {}
    calls = step.tool_calls if isinstance(step, AIMessage) else []
    decision: Decision = "answer" if "answer" in pending else "invalid" if pending else "tool_calls"
    tried = (stats.get("model_attempts") or [{}])[-1]
    return ModelFinished(
        keelgraph="phase",
        phase="model_finished",
        call=int(stats.get("model_calls", 0)) + int(stats.get("cache_hits", 0)),
        model=str(stats.get("model", "")),
        decision=decision,
        tools=[str(c["name"]) for c in calls] if decision == "tool_calls" else [],
        cached=tried.get("outcome") == "cached",
        seconds=float(tried.get("seconds", 0.0)),
    )


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
    plan = repair_plan(inline_refs(answer), previous, _problems(attempts[-1]), earlier=earlier)
    pins = state.get("pins") or {}
    return RepairPlan(pin_values(plan.schema, pins), plan.decisive) if pins else plan


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


def _tool_first(
    state: State, spec: AgentSpec, allowed: list[BaseTool], *, fetched: bool
) -> tuple[bool, list[BaseTool]]:
    """Whether this step must call a tool, and the tools it may call."""
    if spec.contract.needs_tool and not fetched:
        return bool(allowed), allowed
    messages = state.get("messages", [])
    if messages and kind_of(messages[-1]) == "repair" and state.get("tool_next"):
        # A check judged the answer by tool evidence: look again, with a tool that only reads (a
        # repair never forces a write), else repair the answer as usual.
        readers = [t for t in allowed if policy_of(t).side_effect == "read"]
        if readers:
            return True, readers
    return False, allowed


def _answered_early(raw: str, allowed: list[BaseTool]) -> dict[str, Any]:
    """The repair of an answer given where a tool call was required (`Contract.needs_tool`, or a
    check that asked for tool evidence). Grammar paths cannot write one; prompted JSON and an
    endpoint that takes only `tool_choice="auto"` can, and it must not reach the checks as if it
    rested on a tool result."""
    names = ", ".join(f"`{t.name}`" for t in allowed)
    problem = Problem(
        field="action",
        reason="answered without calling a tool; this answer must rest on a tool's result",
        fix=f"call {names} first (a tool call, not a final answer), then answer from what it returns",
    )
    return {"problems": [problem.model_dump()], "kind": "no_tool", "raw": raw}


def _reason(state: State, runtime: Runtime[Context] | None, spec: AgentSpec) -> Steps[dict[str, Any]]:
    stats: Stats = {**zero_stats(), **state.get("stats", {})}
    if stats["model_calls"] + stats["cache_hits"] >= spec.max_model_calls:
        return failed(
            state,
            state.get("attempts", []),
            stats,
            f"stopped after {stats['model_calls']} model calls in one turn (the limit)",
        )
    allowed = allowed_tools(state, spec)
    answer = spec.contract.output_schema_for(check_context(state, runtime, spec.contract, spec))
    usage = {k: int(stats[k]) for k in ("model_calls", "input_tokens", "output_tokens")}
    late = spec.out_of_time(state.get("started"), usage)  # `turn_timeout_s`: no call past it
    if (over := late or over_budget(state, spec, stats, answer, allowed)) is not None:
        # Checked before the call, not after: the budget is never overspent by a whole reply.
        stats["seconds"] = round(time.time() - state.get("started", time.time()), 3)
        _log.warning("keelgraph: %s", over)
        return {"status": "failed", "error": over.to_failure().model_dump(), "stats": stats, "pending": None}
    # A contract whose answer rests on a tool result gets no answer option until a tool has returned;
    # so does a repair of an answer whose check asked for a tool result (`tool_next`).
    fetched = bool(state.get("tool_log"))
    if spec.contract.needs_tool and not fetched and not allowed and state.get("tool_rounds", 0) > 0:
        # Tools were called and none returned a result: an answer now could rest on nothing.
        return failed(
            state, state.get("attempts", []), stats, NO_TOOL_RESULT.format(n=state.get("tool_rounds", 0))
        )
    tool_first, allowed = _tool_first(state, spec, allowed, fetched=fetched)
    emit(_model_started(state, stats))
    reply, tried, note = yield from asking(
        state, spec, answer, allowed, _repair_plan(state, spec, answer), final=not tool_first
    )
    ai = reply if isinstance(reply, AIMessage) else AIMessage(str(reply.content))
    update: dict[str, Any] = {"stats": stats, "usage": account(stats, spec, ai, tried, note)}
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
    if ai.tool_calls and (problems := _unsafe_calls(ai.tool_calls)):
        # Native calls arrive parsed: values that are not JSON data within the boundary limits (NaN,
        # infinities, 64-bit overflow, lone surrogates, deep nesting) never reach a tool or an
        # answer, and the checkpoint keeps a safe copy of what was written: a repair turn.
        safe = [{"name": safe_value(c["name"])[0], "args": safe_value(c["args"])[0]} for c in ai.tool_calls]
        raw = json.dumps(safe, ensure_ascii=False)
        update.pop("cache_writes", None)  # the checkpoint could not store it, and it is rejected
        step = tagged(AIMessage(raw, id=msg_id), "candidate")
        return {
            **update,
            "messages": [step],
            "pending": {"problems": [p.model_dump() for p in problems], "kind": "parse", "raw": raw},
        }
    if ai.tool_calls:
        answers = [c for c in ai.tool_calls if c["name"] == ANSWER]
        if answers:
            raw = json.dumps(answers[0]["args"])
            step = tagged(AIMessage(raw, id=msg_id), "candidate")
            if tool_first:
                return {**update, "messages": [step], "pending": _answered_early(raw, allowed)}
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
        kept = kept_text(raw)  # a refused draft is kept as a record, made storable
        step = tagged(AIMessage(kept, id=msg_id), "candidate")
        problems = exc.problems if isinstance(exc, ParseError) else [exc.problem]
        pending = {"problems": [p.model_dump() for p in problems[:5]], "kind": kind, "raw": kept}
        return {**update, "messages": [step], "pending": pending}
    recoveries = len(parsed.recoveries) + len(decision.recoveries)
    stats["recoveries"] += recoveries
    if isinstance(decision, AnswerChoice):
        step = tagged(AIMessage(raw, id=msg_id), "candidate")
        if tool_first:
            return {**update, "messages": [step], "pending": _answered_early(raw, allowed)}
        return {**update, "messages": [step], "pending": {"answer": decision.answer, "raw": raw}}
    call = {
        "name": decision.name,
        "args": decision.args,
        "id": f"call_{uuid.uuid4().hex[:12]}",
        "type": "tool_call",
    }
    step = tagged(AIMessage("", tool_calls=[call], id=msg_id), "step")
    return {**update, "messages": [step], "pending": None}


def _unsafe_calls(calls: list[Any]) -> list[Problem]:
    """Boundary problems of native tool calls' names and arguments, each naming its call."""
    problems: list[Problem] = []
    for call in calls:
        name = call.get("name")
        where = f"args of {name}" if isinstance(name, str) and not check_value(name) else "tool name"
        problems += check_value(name, where="tool name") + check_value(call.get("args"), where=where)
    return problems[:5]


def kept_text(text: str) -> str:
    """`text` as the thread keeps it: lone surrogates (which no checkpoint can store) replaced by
    U+FFFD. Only for drafts that were refused: accepted text never holds one (`parse_json` refuses it)."""
    return _SURROGATE.sub("\ufffd", text)


def route_after_reason(state: State) -> Literal["approve", "act", "check_output", "__end__"]:
    """A failed turn ends; tool calls run (after a person's decision where one is awaited); an
    answer is checked."""
    if state.get("status") == "failed":
        return "__end__"
    messages = state.get("messages", [])
    last = messages[-1] if messages else None
    if isinstance(last, AIMessage) and last.tool_calls:
        return "approve" if state.get("awaiting_approval") else "act"
    return "check_output"
