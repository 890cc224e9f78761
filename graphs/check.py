"""The `check_output` node: the candidate answer against the output contract and its checks."""

from __future__ import annotations

import time
from typing import Any, Literal

from langchain_core.messages import AIMessage, HumanMessage
from langgraph.runtime import Runtime

from keelgraph.contracts.contract import CheckContext, Contract, OutputInvalid
from keelgraph.contracts.decision import ANSWER
from keelgraph.contracts.errors import Problem
from keelgraph.graphs.model_call import cache_write, without_reply
from keelgraph.graphs.prompt import kind_of, tagged
from keelgraph.graphs.spec import AgentSpec
from keelgraph.graphs.state import Context, State, Stats
from keelgraph.graphs.turn import exhausted, failed, new_attempt, zero_stats

__all__ = ["CORRECTION", "check_context", "check_output", "route_after_check"]

CORRECTION = (
    "A reply to this request was rejected:\n{problems}\n"
    "Reply again to the request, without that mistake: {request}\n"
    'Reply with one JSON object: {{"action": "{answer}", "answer": {{...}}}} or a tool call.'
)
"""The correction prompt: the exact problems (validation errors and check complaints, each with its
fix) are what the model is told, then the request again; no paraphrase of our own in between."""
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
    stats: Stats = {**zero_stats(), **state.get("stats", {})}
    raw = str(pending.get("raw", ""))
    kind = str(pending.get("kind", "output"))
    problems = [Problem.model_validate(p) for p in pending.get("problems", [])]
    output = None
    if not problems:
        candidate = pending.get("answer")
        if contract.derive is not None and isinstance(candidate, dict):
            derived = contract.derive(dict(candidate), check_context(state, runtime, contract))
            if derived != candidate:
                stats["recoveries"] += 1
            candidate = derived
        try:
            output = contract.parse_output(candidate)
        except OutputInvalid as exc:
            problems, kind = exc.problems, "output"
    if output is not None:
        ctx = check_context(state, runtime, contract)
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
    writes = without_reply(state.get("cache_writes", []), last.id)
    attempts = [
        *state.get("attempts", []),
        new_attempt(state.get("attempts", []), kind, raw, problems),
    ]
    stats["repairs"] = len(attempts)
    if why := exhausted(spec, attempts):
        return {
            "attempts": attempts,
            "cache_writes": writes,
            **failed(state, attempts, stats, f"no valid answer: {why}"),
        }
    lines = "\n".join(f"- {p.line()}" for p in problems)
    request = next((m for m in reversed(state.get("messages", [])) if kind_of(m) == "request"), None)
    text = CORRECTION.format(problems=lines, request=request.content if request else "", answer=ANSWER)
    correction = tagged(HumanMessage(text), "repair")
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
