"""Spend limits: token budgets per turn and per thread stop a run before the call, typed and persisted."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from keelgraph import (
    BudgetExceeded,
    Contract,
    Failure,
    Price,
    UserError,
    build_graph,
    sqlite_checkpointer,
    unwrap,
)
from keelgraph.graphs.budgets import DEFAULT_OUTPUT_CAP, estimate_tokens
from keelgraph.testing import ScriptedChatModel, answer


class Question(BaseModel):
    city: str = Field(min_length=1, max_length=40)


class Forecast(BaseModel):
    city: str
    celsius: int = Field(ge=-60, le=60)


CONTRACT = Contract(input=Question, output=Forecast, instructions="Report the weather.")
GOOD = answer(city="Oslo", celsius=21)
BAD = answer(city="Oslo", celsius=99)  # out of range: a repair call follows


def graph_for(model: ScriptedChatModel, tmp: Path, **budgets: Any) -> Any:
    return build_graph(CONTRACT, model=model, checkpointer=sqlite_checkpointer(tmp / "t.db"), **budgets)


def ask(graph: Any, thread: str, city: str = "Oslo") -> dict[str, Any]:
    result: dict[str, Any] = graph.invoke(
        {"request": {"city": city}}, {"configurable": {"thread_id": thread}}
    )
    return result


def tokens(usage: dict[str, Any]) -> int:
    return int(usage["input_tokens"]) + int(usage["output_tokens"])


def first_estimate(tmp: Path) -> int:
    """The estimated cost of a turn's first call, read from a graph whose budget refuses it."""
    model = ScriptedChatModel([])
    result = ask(graph_for(model, tmp / "probe", max_turn_tokens=1), "probe")
    assert result["status"] == "failed" and model.calls == []  # refused before the call
    return int(result["error"]["usage"]["estimate"])


def test_a_repair_that_would_pass_the_turn_budget_is_not_made(tmp_path: Path) -> None:
    limit = first_estimate(tmp_path)  # the first call just fits; the repair cannot
    model = ScriptedChatModel([BAD, GOOD])
    graph = graph_for(model, tmp_path, max_turn_tokens=limit)
    result = ask(graph, "t1")
    assert len(model.calls) == 1
    assert result["status"] == "failed" and result["error"]["type"] == "BudgetExceeded"
    assert result["error"]["code"] == "budget_exceeded"
    saved = graph.get_state({"configurable": {"thread_id": "t1"}}).values
    assert saved["status"] == "failed" and saved["error"] == result["error"]
    assert saved["stats"]["model_calls"] == 1
    error = saved["error"]
    assert error["problems"][0]["field"] == "max_turn_tokens"
    assert error["usage"]["limit"] == limit
    assert error["usage"]["spent"] == tokens(saved["stats"]) == tokens(saved["usage"]) > 0
    assert error["usage"]["spent"] + error["usage"]["estimate"] > limit
    assert f"max_turn_tokens={limit}" in error["message"] and "raise max_turn_tokens" in error["message"]


def test_the_thread_budget_stops_the_third_turn_and_a_new_thread_works(tmp_path: Path) -> None:
    free = ScriptedChatModel([GOOD], repeat_last=True)
    unbudgeted = graph_for(free, tmp_path / "free")
    spent = []
    for _ in range(3):
        assert ask(unbudgeted, "a")["status"] == "ok"
        spent.append(tokens(unbudgeted.get_state({"configurable": {"thread_id": "a"}}).values["usage"]))
    estimates = [estimate_tokens(c["messages"]) + DEFAULT_OUTPUT_CAP for c in free.calls]
    limit = spent[1] + estimates[2] - 1  # turns 1 and 2 fit, turn 3's first call does not
    assert estimates[0] <= limit and spent[0] + estimates[1] <= limit

    model = ScriptedChatModel([GOOD], repeat_last=True)
    graph = graph_for(model, tmp_path, max_thread_tokens=limit)
    assert [ask(graph, "b")["status"] for _ in range(2)] == ["ok", "ok"]
    third = ask(graph, "b")
    assert len(model.calls) == 2
    assert third["status"] == "failed" and third["output"] is None
    saved = graph.get_state({"configurable": {"thread_id": "b"}}).values
    assert saved["error"]["type"] == "BudgetExceeded"
    assert saved["error"]["problems"][0]["field"] == "max_thread_tokens"
    usage = saved["error"]["usage"]
    assert (usage["limit"], usage["spent"], usage["estimate"]) == (limit, spent[1], estimates[2])
    assert "start a new thread" in saved["error"]["message"]
    assert saved["stats"]["model_calls"] == 0 and tokens(saved["usage"]) == spent[1]
    assert ask(graph, "c")["status"] == "ok" and len(model.calls) == 3


def test_budgets_that_are_not_reached_change_nothing(tmp_path: Path) -> None:
    results = []
    for name, budgets in (("none", {}), ("big", {"max_turn_tokens": 10**9, "max_thread_tokens": 10**9})):
        model = ScriptedChatModel([BAD, GOOD, GOOD])
        graph = graph_for(model, tmp_path / name, **budgets)
        first, second = ask(graph, "t"), ask(graph, "t")
        assert first["status"] == second["status"] == "ok" and len(model.calls) == 3
        stats = [
            {k: v for k, v in r["stats"].items() if k not in {"seconds", "model_attempts"}}
            for r in (first, second)
        ]
        results.append((first["output"], second["output"], stats))
    assert results[0] == results[1]


def test_the_estimate_is_at_least_what_the_model_reports(tmp_path: Path) -> None:
    model = ScriptedChatModel([BAD, GOOD])
    result = ask(graph_for(model, tmp_path), "t")
    assert result["status"] == "ok" and len(model.calls) == 2
    for call in model.calls:  # the scripted model counts input tokens as prompt characters // 4
        reported = sum(len(str(m.content)) for m in call["messages"]) // 4
        assert estimate_tokens(call["messages"]) >= reported
    single = ScriptedChatModel([GOOD])
    one_call = ask(graph_for(single, tmp_path / "one"), "t")
    assert first_estimate(tmp_path) >= tokens(one_call["stats"])  # prompt plus the output cap


@pytest.mark.parametrize(
    "budgets", [{"max_turn_tokens": 0}, {"max_thread_tokens": -5}, {"max_thread_tokens": 0}]
)
def test_budgets_are_checked_when_the_graph_is_built(budgets: dict[str, Any]) -> None:
    with pytest.raises(UserError, match="must be None"):
        build_graph(CONTRACT, model=ScriptedChatModel([]), checkpointer=None, **budgets)


def test_budgets_of_one_and_none_build() -> None:
    for budgets in ({"max_turn_tokens": 1, "max_thread_tokens": 1}, {"max_turn_tokens": None}):
        build_graph(CONTRACT, model=ScriptedChatModel([]), checkpointer=None, **budgets)


def test_unwrap_raises_budget_exceeded(tmp_path: Path) -> None:
    model = ScriptedChatModel([])
    result = ask(graph_for(model, tmp_path, max_thread_tokens=5), "t")
    with pytest.raises(BudgetExceeded) as caught:
        unwrap(result, Forecast)
    error = caught.value
    assert error.budget == "thread" and error.limit == 5 and error.spent == 0 and error.estimate > 5
    assert error.usage["model_calls"] == 0
    assert Failure.model_validate(error.to_failure().model_dump()) == Failure.model_validate(result["error"])


# --- cost budgets --------------------------------------------------------------------------

PRICES = {"keelgraph-scripted": Price(input=2.0, output=8.0)}  # per million tokens


def _cost(usage: dict[str, Any], price: Price) -> float:
    return price.cost(int(usage["input_tokens"]), int(usage["output_tokens"]))


def test_prices_account_the_cost_of_every_reply(tmp_path: Path) -> None:
    model = ScriptedChatModel([BAD, GOOD], repeat_last=True)
    graph = graph_for(model, tmp_path, prices=PRICES)
    first = ask(graph, "c")
    assert first["status"] == "ok" and first["stats"]["model_calls"] == 2  # the repair is paid too
    assert first["stats"]["cost"] == pytest.approx(_cost(first["stats"], PRICES["keelgraph-scripted"]))
    assert first["stats"]["cost"] > 0
    second = ask(graph, "c")
    usage = graph.get_state({"configurable": {"thread_id": "c"}}).values["usage"]
    total = first["stats"]["cost"] + second["stats"]["cost"]
    assert usage["cost_micros"] == pytest.approx(total * 1_000_000, abs=2)
    # Without prices nothing is priced.
    plain = ask(graph_for(ScriptedChatModel([GOOD]), tmp_path / "plain"), "p")
    assert plain["stats"]["cost"] == 0.0


def test_a_repair_that_would_pass_the_turn_cost_budget_is_not_made(tmp_path: Path) -> None:
    price = PRICES["keelgraph-scripted"]
    estimate = first_estimate(tmp_path)
    limit = price.cost(estimate - DEFAULT_OUTPUT_CAP, DEFAULT_OUTPUT_CAP) * 1.01  # the first call fits
    model = ScriptedChatModel([BAD, GOOD])
    graph = graph_for(model, tmp_path, prices=PRICES, max_turn_cost=limit)
    result = ask(graph, "t")
    assert len(model.calls) == 1
    error = result["error"]
    assert result["status"] == "failed" and error["type"] == "BudgetExceeded"
    assert error["problems"][0]["field"] == "max_turn_cost"
    assert error["usage"]["limit"] == round(limit * 1_000_000)  # millionths of the currency unit
    assert error["usage"]["spent"] == round(result["stats"]["cost"] * 1_000_000)
    assert "the turn cost budget would be exceeded" in error["message"]
    assert "raise max_turn_cost" in error["message"]
    with pytest.raises(BudgetExceeded) as caught:
        unwrap(result, Forecast)
    assert caught.value.unit == "cost" and caught.value.budget == "turn"
    assert caught.value.limit == pytest.approx(limit, abs=1e-6)
    saved = graph.get_state({"configurable": {"thread_id": "t"}}).values
    assert saved["error"] == error


def test_the_thread_cost_budget_stops_a_later_turn(tmp_path: Path) -> None:
    model = ScriptedChatModel([GOOD], repeat_last=True)
    graph = graph_for(model, tmp_path, prices={"*": Price(input=1.0, output=1.0)}, max_thread_cost=0.0016)
    statuses = [ask(graph, "t")["status"] for _ in range(6)]
    assert statuses[0] == "ok" and statuses[-1] == "failed"
    calls = len(model.calls)
    stopped = ask(graph, "t")
    assert len(model.calls) == calls  # refused before the call
    assert stopped["error"]["problems"][0]["field"] == "max_thread_cost"
    assert "start a new thread" in stopped["error"]["problems"][0]["fix"]
    usage = graph.get_state({"configurable": {"thread_id": "t"}}).values["usage"]
    assert 0 < usage["cost_micros"] <= 1600  # never past the limit
    assert ask(graph, "another")["status"] == "ok"


def test_the_estimate_uses_the_dearest_model_the_call_may_fail_over_to(tmp_path: Path) -> None:
    cheap, dear = ScriptedChatModel([GOOD]), ScriptedChatModel([GOOD])
    object.__setattr__(dear, "model_name", "dear")  # a second model name for the price table
    prices = {"keelgraph-scripted": Price(0.0, 0.0), "dear": Price(1000.0, 1000.0)}
    graph = build_graph(CONTRACT, model=[cheap, dear], checkpointer=None, prices=prices, max_turn_cost=0.01)
    result = graph.invoke({"request": {"city": "Oslo"}})
    assert result["status"] == "failed" and cheap.calls == []
    assert result["error"]["problems"][0]["field"] == "max_turn_cost"


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"max_turn_cost": 1.0}, "max_turn_cost needs prices="),
        ({"max_thread_cost": 0, "prices": PRICES}, "max_thread_cost must be None (no limit) or > 0"),
        ({"max_turn_cost": 1.0, "prices": {"gpt-x": Price(1, 1)}}, "no price for model 'keelgraph-scripted'"),
    ],
)
def test_cost_budgets_misconfigured_fail_at_build_time(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(UserError, match=re.escape(says)):
        build_graph(CONTRACT, model=ScriptedChatModel([]), checkpointer=None, **kwargs)
    with pytest.raises(UserError, match="a price must be >= 0"):
        Price(-1, 0)


def test_an_unpriced_model_resolved_late_is_a_clear_error(tmp_path: Path) -> None:
    graph = build_graph(
        CONTRACT,
        model=lambda: ScriptedChatModel([GOOD]),
        checkpointer=None,
        prices={"gpt-x": Price(1, 1)},
        max_turn_cost=1.0,
    )
    with pytest.raises(UserError, match="need a price for every model of the chain"):
        graph.invoke({"request": {"city": "Oslo"}})


def test_cost_failures_round_trip() -> None:
    error = BudgetExceeded(
        "thread", limit=0.5, spent=0.4993, estimate=0.0012, unit="cost", usage={"model_calls": 3}
    )
    again = BudgetExceeded.from_failure(Failure.model_validate(error.to_failure().model_dump()))
    assert (again.budget, again.unit, again.usage) == ("thread", "cost", {"model_calls": 3})
    assert (again.limit, again.spent, again.estimate) == (0.5, 0.4993, 0.0012)
    assert str(again) == str(error)
    assert "0.4993 of max_thread_cost=0.5 spent, next call estimated at 0.0012" in str(error)
    tokens_again = BudgetExceeded.from_failure(
        BudgetExceeded("turn", limit=10, spent=8, estimate=4).to_failure()
    )
    assert (tokens_again.unit, tokens_again.limit) == ("tokens", 10)
