"""The `confirm` node: an answer with `judgement` fields ships only if the model gives them again.

A check can verify a fact against the request or a tool result; it cannot verify a judgement (a
category, a priority). What it can measure is whether the model would say the same thing again:
the answer is sampled `Contract.judgement_samples - 1` more times, from the same messages, answer
only, and ships only when every valid sample agrees with it on the judgement fields. Otherwise the
turn fails with `Uncertain`, carrying the votes (see `keelgraph.Uncertain`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from langchain_core.messages import AIMessage
from langgraph.runtime import Runtime

from keelgraph.contracts.contract import Contract, OutputInvalid
from keelgraph.contracts.decision import ANSWER, AnswerChoice, DecisionError, read_decision
from keelgraph.contracts.errors import Attempt, Problem, Uncertain
from keelgraph.contracts.parsing import ParseError, parse_json
from keelgraph.graphs.budgets import account, over_budget
from keelgraph.graphs.check import check_context, ship
from keelgraph.graphs.model_call import ask
from keelgraph.graphs.spec import AgentSpec
from keelgraph.graphs.state import Context, State, Stats
from keelgraph.graphs.turn import RAW_LIMIT, with_history, zero_stats

__all__ = ["JUDGEMENT_TEMPERATURE", "UNSURE_FIX", "confirm", "judged_values"]

JUDGEMENT_TEMPERATURE = 0.7
"""The temperature samples are drawn at when the model's own is 0 (or unset): a greedy model asked
again gives the same answer, which measures nothing."""
UNSURE_FIX = "have a person decide, or give the model more to go on (the request, the instructions)"


def _normal(value: Any) -> Any:
    return " ".join(value.split()).casefold() if isinstance(value, str) else value


def judged_values(contract: Contract[Any, Any], answer: Mapping[str, Any]) -> dict[str, Any]:
    """The values of the contract's `judgement` fields in `answer`, by path, normalised for comparing."""
    out = {}
    for path in contract.judgement:
        node: Any = answer
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        out[path] = _normal(node)
    return out


def _sampled_answer(reply: AIMessage, contract: Contract[Any, Any]) -> tuple[str, dict[str, Any] | None]:
    """A sample's raw text and its answer as validated data (None when it is not a valid answer)."""
    answers = [c["args"] for c in reply.tool_calls if c["name"] == ANSWER]
    raw = json.dumps(answers[0]) if answers else str(reply.content)
    try:
        candidate: Any = answers[0] if answers else None
        if candidate is None:
            decision = read_decision(parse_json(raw).value, frozenset())
            if not isinstance(decision, AnswerChoice):
                return raw, None
            candidate = decision.answer
        return raw, contract.parse_output(candidate).model_dump(mode="json")
    except (ParseError, DecisionError, OutputInvalid):
        return raw, None


def confirm(state: State, runtime: Runtime[Context] | None = None, *, spec: AgentSpec) -> dict[str, Any]:
    """Sample the answer again and ship it only if the samples agree on its judgement fields."""
    contract = spec.contract
    pending = state.get("pending") or {}
    shipped = contract.parse_output(pending.get("confirm"))
    want = judged_values(contract, shipped.model_dump(mode="json"))
    stats: Stats = {**zero_stats(), **state.get("stats", {})}
    # The samples see what the checked answer was written from: the turn so far, less that answer.
    asked = with_history({**state, "messages": state.get("messages", [])[:-1]}, spec)
    answer = contract.output_schema_for(check_context(state, runtime, contract, spec))
    own = getattr(spec.chain.model(0), "temperature", None)
    heat = own if isinstance(own, (int, float)) and own > 0 else JUDGEMENT_TEMPERATURE
    usage: dict[str, int] = {}
    samples: list[dict[str, Any]] = []
    for _ in range(contract.judgement_samples - 1):
        spent = {k: int(stats[k]) for k in ("model_calls", "input_tokens", "output_tokens")}
        over = spec.out_of_time(state.get("started"), spent) or over_budget(asked, spec, stats, answer, [])
        if over is not None:
            stats["seconds"] = round(time.time() - state.get("started", time.time()), 3)
            return {
                "status": "failed",
                "error": over.to_failure().model_dump(),
                "stats": stats,
                "pending": None,
            }
        reply, tried, note = ask(asked, spec, answer, [], temperature=heat)
        ai = reply if isinstance(reply, AIMessage) else AIMessage(str(reply.content))
        for key, value in account(stats, spec, ai, tried, note).items():
            usage[key] = usage.get(key, 0) + value
        raw, sampled = _sampled_answer(ai, contract)
        votes = None if sampled is None else judged_values(contract, sampled)
        samples.append({"raw": raw[:RAW_LIMIT], "values": votes})
    valid = [s["values"] for s in samples if s["values"] is not None]
    disagree = {
        path: [want[path], *(v[path] for v in valid)]
        for path in contract.judgement
        if not valid or any(v[path] != want[path] for v in valid)
    }
    update: dict[str, Any] = {"samples": samples, "usage": usage}
    if not disagree:
        return {**update, **ship(state, spec, shipped, stats)}
    problems = [
        Problem(
            field=f"answer.{path}",
            reason=f"{len(values)} answers gave {values}" if valid else "no sample gave a valid answer",
            fix=UNSURE_FIX,
        )
        for path, values in disagree.items()
    ]
    records = [Attempt(number=i + 1, kind="sample", raw=s["raw"], problems=[]) for i, s in enumerate(samples)]
    stats["seconds"] = round(time.time() - state.get("started", time.time()), 3)
    spent = {k: int(stats[k]) for k in ("model_calls", "input_tokens", "output_tokens")}
    error = Uncertain(problems, records, usage=spent)
    return {
        **update,
        "status": "failed",
        "error": error.to_failure().model_dump(),
        "stats": stats,
        "pending": None,
    }
