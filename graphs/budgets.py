"""Spend limits and usage: what a model call may cost before it is made, and what it cost after."""

from __future__ import annotations

import json
from typing import Any

from langchain_core.messages import AIMessage
from langchain_core.tools import BaseTool

from keelgraph.contracts.errors import Budget, BudgetExceeded, UserError
from keelgraph.graphs.history import estimate_prompt_tokens
from keelgraph.graphs.model_call import CacheNote, first_position, offered_schemas, prompt_messages
from keelgraph.graphs.spec import AgentSpec
from keelgraph.graphs.state import ModelAttempt, State, Stats
from keelgraph.runtime.models import Price, model_label, price_of

__all__ = ["DEFAULT_OUTPUT_CAP", "account", "call_price", "estimate_tokens", "over_budget"]

DEFAULT_OUTPUT_CAP = 1024
"""Output tokens assumed for a model that declares no `max_tokens` (KEELGRAPH_MAX_TOKENS's default)."""
estimate_tokens = estimate_prompt_tokens
"""See `keelgraph.graphs.history.estimate_prompt_tokens` (one estimator for budgets and compaction)."""


def call_price(state: State, spec: AgentSpec) -> Price:
    """The highest price among the models this call may reach (it may fail over mid-call)."""
    first = first_position(state, spec)
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


def over_budget(
    state: State, spec: AgentSpec, stats: Stats, answer: dict[str, Any], allowed: list[BaseTool]
) -> BudgetExceeded | None:
    """Whether the next call could go past a token or cost budget: what was spent plus the call's
    estimate (its prompt, see `estimate_tokens`, plus the output cap of the model `model_call.ask` asks
    first; for cost, at the highest price of the models it may reach)."""
    limits = (spec.max_turn_tokens, spec.max_thread_tokens, spec.max_turn_cost, spec.max_thread_cost)
    if all(limit is None for limit in limits):
        return None
    schemas = offered_schemas(state, allowed)
    # Schemas sent beside the messages (tools, response format) cost input tokens too.
    extra = "" if spec.active_strategy == "prompted" else json.dumps([answer, schemas])
    model = spec.chain.model(first_position(state, spec))
    cap = getattr(model, "max_tokens", None)
    cap = cap if isinstance(cap, int) and cap > 0 else DEFAULT_OUTPUT_CAP
    prompt = estimate_tokens(prompt_messages(state, spec, answer, allowed, schemas), extra)
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
    cost = call_price(state, spec).cost(prompt, cap)
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


def account(
    stats: Stats, spec: AgentSpec, ai: AIMessage, tried: list[ModelAttempt], note: CacheNote
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
