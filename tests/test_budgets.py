"""Spend limits: token budgets per turn and per thread stop a run before the call, typed and persisted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from keelgraph import BudgetExceeded, Contract, Failure, UserError, build_graph, sqlite_checkpointer, unwrap
from keelgraph.graphs.nodes import DEFAULT_OUTPUT_CAP, estimate_tokens
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
