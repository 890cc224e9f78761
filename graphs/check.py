"""The `check_output` node: the candidate answer against the output contract and its checks."""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

from langchain_core.messages import AIMessage, HumanMessage
from langgraph.runtime import Runtime

from keelgraph.contracts.contract import CheckContext, Contract, OutputInvalid, Review
from keelgraph.contracts.decision import ANSWER, AnswerChoice, DecisionError, read_decision
from keelgraph.contracts.errors import Problem
from keelgraph.contracts.parsing import ParseError, parse_json
from keelgraph.contracts.suspend import Steps, adrive, drive
from keelgraph.graphs.events import Repairing, emit, problems_of
from keelgraph.graphs.model_call import cache_write, without_reply
from keelgraph.graphs.prompt import kind_of, tagged
from keelgraph.graphs.spec import AgentSpec
from keelgraph.graphs.state import Context, State, Stats
from keelgraph.graphs.turn import exhausted, failed, new_attempt, turn_facts, with_history, zero_stats

__all__ = ["CORRECTION", "acheck_output", "check_context", "check_output", "route_after_check", "ship"]

CORRECTION = (
    "A reply to this request was rejected:\n{problems}\n"
    "Reply again to the request, without that mistake: {request}\n"
    'Reply with one JSON object: {{"action": "{answer}", "answer": {{...}}}} or a tool call.'
)
"""The correction prompt: the exact problems (validation errors and check complaints, each with its
fix) are what the model is told, then the request again; no paraphrase of our own in between."""
CORRECTION_TOOL = (
    "A reply to this request was rejected:\n{problems}\n"
    "Reply again to the request, with a tool call first: {request}\n"
    'Reply with one JSON object: {{"action": "<tool name>", "args": {{...}}}}.'
)
"""The correction of an answer given where a tool call was required (`no_tool`): it asks for the
call, not for an answer."""
PASTES_TOOL_OUTPUT = "it pastes raw tool output"
OWN_WORDS = "state the facts in your own words"
ECHOES_CORRECTION = "it repeats the correction instead of answering"
ANSWER_THE_REQUEST = "answer the request itself"


def _builtin_checks(answer_json: str, attempts: list[dict[str, Any]]) -> list[Problem]:
    """Checks every contract gets: the answer must not paste tool fences or echo a correction."""
    problems = []
    if "<tool_result" in answer_json:
        problems.append(Problem(field="answer", reason=PASTES_TOOL_OUTPUT, fix=OWN_WORDS))
    said = [text for p in (attempts[-1]["problems"] if attempts else []) for text in (p["reason"], p["fix"])]
    if any(len(text) >= 15 and text in answer_json for text in said):
        problems.append(Problem(field="answer", reason=ECHOES_CORRECTION, fix=ANSWER_THE_REQUEST))
    return problems


def check_context(
    state: State,
    runtime: Runtime[Context] | None,
    contract: Contract[Any, Any],
    spec: AgentSpec | None = None,
) -> CheckContext[Any]:
    """What checks, choices and `derive` see: this turn's request and tool results, the run's
    context, and (given the `spec`) the thread's earlier answers."""
    earlier = turn_facts(with_history(state, spec)).earlier_answers if spec is not None else ()
    return CheckContext(
        input=contract.input.model_validate(state.get("input") or {}),
        tool_results=state.get("tool_log", []),
        context=runtime.context if runtime is not None else None,
        earlier_answers=earlier,
    )


def _write_in(answer: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`answer` with each dotted path of `values` set to its value (paths that lead nowhere are skipped)."""
    out = copy.deepcopy(answer)
    for path, value in values.items():
        node: Any = out
        parts = path.split(".")
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                node = None
                break
        last = parts[-1]
        if isinstance(node, dict):
            node[last] = value
        elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
    return out


def _judge(
    contract: Contract[Any, Any], output: Any, ctx: CheckContext[Any], attempts: list[dict[str, Any]]
) -> Steps[tuple[list[Problem], Review]]:
    """Every problem of a parsed answer: the built-in checks, its choices, the contract's checks."""
    review = yield from contract.reviewing(output, ctx)
    return [
        *_builtin_checks(output.model_dump_json(), attempts),
        *contract.choice_problems(output, ctx),
        *review.problems,
    ], review


def _computed_in(
    contract: Contract[Any, Any],
    output: Any,
    ctx: CheckContext[Any],
    review: Review,
    attempts: list[dict[str, Any]],
) -> Steps[Any | None]:
    """The answer with the checks' computed values written in, when that alone satisfies every check
    (None otherwise): a value the system computed is not asked of the model (`keelgraph.Computed`)."""
    try:
        patched = contract.parse_output(_write_in(output.model_dump(mode="json"), review.computed))
    except OutputInvalid:
        return None
    problems, _ = yield from _judge(contract, patched, ctx, attempts)
    return None if problems else patched


def ship(state: State, spec: AgentSpec, output: Any, stats: Stats) -> dict[str, Any]:
    """The update that ends the turn with `output`: the answer message, the stats, the cache."""
    last = state["messages"][-1]
    answer = tagged(AIMessage(output.model_dump_json(), id=last.id), "answer")
    stats["seconds"] = round(time.time() - state.get("started", time.time()), 3)
    # The turn ended ok: its replies that were not rejected are known good, and only now cached.
    cache_write(spec, state.get("cache_writes", []))
    return {
        "status": "ok",
        "output": output.model_dump(mode="json"),
        "error": None,
        "pending": None,
        "messages": [answer],
        "stats": stats,
        "cache_writes": [],
    }


def _carried(candidate: dict[str, Any], attempts: list[dict[str, Any]], spec: AgentSpec) -> dict[str, Any]:
    """Required fields a repair left out that the rejected answer before it had, where no problem
    named them: carried over rather than refused again. Without a grammar (prompted JSON) a small
    model told to fix one field often writes only that field; what it wrote before and nobody
    objected to still stands. Never a field a problem named (those must be written anew)."""
    if not attempts or attempts[-1].get("kind") not in {"output", "check"}:
        return {}
    try:
        decision = read_decision(parse_json(str(attempts[-1].get("raw", ""))).value, frozenset(spec.tools))
    except (ParseError, DecisionError):
        return {}
    previous = decision.answer if isinstance(decision, AnswerChoice) else None
    if not isinstance(previous, dict):
        return {}
    required = spec.contract.output_schema().get("required", [])
    named = {str(p.get("field", "")) for p in attempts[-1].get("problems", [])}
    return {
        name: previous[name]
        for name in required
        if name not in candidate
        and name in previous
        and not any(f == name or f.startswith((f"{name}.", f"answer.{name}")) for f in named)
    }


def check_output(state: State, runtime: Runtime[Context], *, spec: AgentSpec) -> dict[str, Any]:
    """Validate the candidate answer: schema first, then semantic checks. Failures become repairs.

    Values the checks computed (`keelgraph.Computed`) are written in when they are all that is
    wrong, and pinned in the repair's grammar otherwise. An answer with `judgement` fields goes to
    `confirm` before it ships. `acheck_output`, the node of async runs, awaits async checks."""
    return drive(_checking(state, runtime, spec))


async def acheck_output(state: State, runtime: Runtime[Context], *, spec: AgentSpec) -> dict[str, Any]:
    """`check_output`, awaiting async checks on the running event loop."""
    return await adrive(_checking(state, runtime, spec))


def _checking(state: State, runtime: Runtime[Context], spec: AgentSpec) -> Steps[dict[str, Any]]:
    contract = spec.contract
    pending = state.get("pending") or {}
    stats: Stats = {**zero_stats(), **state.get("stats", {})}
    raw = str(pending.get("raw", ""))
    kind = str(pending.get("kind", "output"))
    problems = [Problem.model_validate(p) for p in pending.get("problems", [])]
    output = None
    if not problems:
        candidate = pending.get("answer")
        if isinstance(candidate, dict) and (kept := _carried(candidate, state.get("attempts", []), spec)):
            candidate = {**candidate, **kept}
            stats["recoveries"] += 1
        if contract.derive is not None and isinstance(candidate, dict):
            derived = contract.derive(dict(candidate), check_context(state, runtime, contract, spec))
            if derived != candidate:
                stats["recoveries"] += 1
            candidate = derived
        try:
            output = contract.parse_output(candidate)
        except OutputInvalid as exc:
            problems, kind = exc.problems, "output"
    review = Review([])
    if output is not None:
        ctx = check_context(state, runtime, contract, spec)
        problems, review = yield from _judge(contract, output, ctx, state.get("attempts", []))
        kind = "check"
        only_computed = problems and review.computed_only and len(problems) == len(review.problems)
        if only_computed and (
            patched := (yield from _computed_in(contract, output, ctx, review, state.get("attempts", [])))
        ):
            output, problems = patched, []
            stats["recoveries"] += 1
    if output is not None and not problems:
        if contract.judgement:
            # Not shipped yet: `confirm` asks again and ships it only if the samples agree.
            return {"pending": {"confirm": output.model_dump(mode="json"), "raw": raw}, "stats": stats}
        return ship(state, spec, output, stats)
    last = state["messages"][-1]
    writes = without_reply(state.get("cache_writes", []), last.id)
    attempts = [
        *state.get("attempts", []),
        new_attempt(state.get("attempts", []), kind, raw, problems),
    ]
    stats["repairs"] = len(attempts)
    if why := exhausted(spec, attempts, stats):
        return {
            "attempts": attempts,
            "cache_writes": writes,
            **failed(state, attempts, stats, f"no valid answer: {why}"),
        }
    emit(
        Repairing(
            keelgraph="phase",
            phase="repairing",
            attempt=len(attempts),
            kind=kind,
            problems=problems_of(problems),
        )
    )
    lines = "\n".join(f"- {p.line()}" for p in problems)
    request = next((m for m in reversed(state.get("messages", [])) if kind_of(m) == "request"), None)
    template = CORRECTION_TOOL if kind == "no_tool" else CORRECTION
    text = template.format(problems=lines, request=request.content if request else "", answer=ANSWER)
    correction = tagged(HumanMessage(text), "repair")
    answer_only = bool(state.get("answer_only")) or (kind == "output" and state.get("tool_rounds", 0) > 0)
    return {
        "attempts": attempts,
        "stats": stats,
        "pending": None,
        "answer_only": answer_only,
        # A check that wanted a tool result nobody fetched: the next step must call a tool.
        "tool_next": review.needs_tool,
        "pins": review.computed,
        "messages": [correction],
        "cache_writes": writes,
    }


def route_after_check(state: State) -> Literal["reason", "confirm", "__end__"]:
    if state.get("status") in {"ok", "failed"}:
        return "__end__"
    pending = state.get("pending")
    return "confirm" if isinstance(pending, dict) and "confirm" in pending else "reason"
