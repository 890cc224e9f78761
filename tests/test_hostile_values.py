"""Hostile values at every boundary of a running graph (issue 15's examples, each reproduced on the
old main): a request, the model's text, native tool-call arguments, a tool's result and a resume
value. Invariant: the turn ends `ok`, `rejected` or `failed` with a typed error, the thread is not
left `running`, nothing is silently changed, and what the thread keeps is bounded."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langchain_core.tools import StructuredTool
from langgraph.types import Command
from pydantic import BaseModel, Field

from keelgraph import Contract, build_graph, sqlite_checkpointer, with_policy
from keelgraph.testing import ScriptedChatModel, answer, call


class Question(BaseModel):
    city: str = Field(min_length=1, max_length=40)


class Reply(BaseModel):
    city: str
    note: str = ""


class Amount(BaseModel):
    amount: float


CONTRACT = Contract(input=Question, output=Reply, instructions="Answer.", repair_budget=2)


def _graph(tmp: Path, script: list[Any], tools: list[Any] | None = None, **kw: Any) -> Any:
    kw.setdefault("strategy", "json_object")
    return build_graph(
        kw.pop("contract", CONTRACT),
        tools or [],
        model=ScriptedChatModel(script),
        checkpointer=sqlite_checkpointer(tmp / "threads.db"),
        **kw,
    )


def _turn(graph: Any, request: Any, thread: str = "t") -> tuple[dict[str, Any], Any]:
    config: Any = {"configurable": {"thread_id": thread}}
    result = graph.invoke({"request": request}, config)
    return result, graph.get_state(config)


def _ended_typed(result: dict[str, Any], state: Any) -> None:
    assert result["status"] in {"ok", "rejected", "failed"}, result
    assert state.values["status"] == result["status"]
    assert not state.next, f"the thread is left waiting at {state.next}"
    if result["status"] != "ok":
        assert result["error"]["type"] in {"InputRejected", "RepairExhausted", "BudgetExceeded"}
        assert result["error"]["problems"] or result["error"]["attempts"]


def _nested(levels: int) -> str:
    return "[" * levels + "1" + "]" * levels


def _deep_value(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


# -- the model's text -------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [255, 490, 10_000])
def test_deeply_nested_model_output_is_a_repair_not_a_crash(tmp_path: Path, levels: int) -> None:
    text = '{"action": "final_answer", "answer": {"city": "Oslo", "note": ' + _nested(levels) + "}}"
    result, state = _turn(_graph(tmp_path, [text, answer(city="Oslo")]), {"city": "Oslo"})
    _ended_typed(result, state)
    assert result["status"] == "ok" and result["output"] == {"city": "Oslo", "note": ""}
    [attempt] = state.values["attempts"]
    assert attempt["kind"] == "parse" and "nested more than" in attempt["problems"][0]["reason"]


@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "Infinity"])
def test_numbers_that_are_not_finite_are_refused_in_model_text(tmp_path: Path, number: str) -> None:
    contract = Contract(input=Question, output=Amount, instructions="Answer.", repair_budget=1)
    text = '{"action": "final_answer", "answer": {"amount": ' + number + "}}"
    graph = _graph(tmp_path, [text, answer(amount=2.5)], contract=contract)
    result, state = _turn(graph, {"city": "Oslo"})
    assert result["status"] == "ok" and result["output"] == {"amount": 2.5}
    assert state.values["attempts"][0]["kind"] == "parse"


@pytest.mark.parametrize("text", ['"Os\\ud800lo"', '"Oslo\\u0000"'])
def test_a_lone_surrogate_or_nul_in_the_answer_is_a_repair_and_never_silently_changed(
    tmp_path: Path, text: str
) -> None:
    raw = '{"action": "final_answer", "answer": {"city": ' + text + "}}"
    graph = _graph(tmp_path, [raw, answer(city="Oslo")])
    result, state = _turn(graph, {"city": "Oslo"})
    assert result["status"] == "ok" and result["output"]["city"] == "Oslo"
    assert state.values["attempts"][0]["kind"] == "parse"
    again = graph.invoke(None, {"configurable": {"thread_id": "t"}})
    assert again["output"]["city"] == "Oslo"


def test_a_lone_surrogate_as_a_raw_character_in_the_answer_is_a_repair(tmp_path: Path) -> None:
    raw = '{"action": "final_answer", "answer": {"city": "Os\ud800lo"}}'
    result, _ = _turn(_graph(tmp_path, [raw, answer(city="Oslo")]), {"city": "Oslo"})
    assert result["status"] == "ok" and result["output"]["city"] == "Oslo"


# -- native tool-call arguments ---------------------------------------------------------------

SPENT: list[float] = []


class SpendArgs(BaseModel):
    amount: float


def _spend_tool() -> StructuredTool:
    def spend(amount: float) -> dict[str, float]:
        SPENT.append(amount)
        return {"spent": amount}

    return StructuredTool.from_function(spend, name="spend", description="Spend", args_schema=SpendArgs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 2**70])
def test_native_tool_arguments_that_are_not_finite_never_reach_the_tool(tmp_path: Path, bad: Any) -> None:
    SPENT.clear()
    step = AIMessage(
        "", tool_calls=[{"name": "spend", "args": {"amount": bad}, "id": "c1", "type": "tool_call"}]
    )
    script = [step, answer(city="Oslo")]
    result, state = _turn(
        _graph(tmp_path, script, [_spend_tool()], strategy="tool_calling"), {"city": "Oslo"}
    )
    _ended_typed(result, state)
    assert SPENT == []
    assert state.values["attempts"][0]["kind"] == "parse"


def test_native_answer_arguments_with_a_lone_surrogate_are_a_repair(tmp_path: Path) -> None:
    final = AIMessage(
        "",
        tool_calls=[
            {"name": "final_answer", "args": {"city": "Os\ud800lo"}, "id": "a1", "type": "tool_call"}
        ],
    )
    result, state = _turn(
        _graph(tmp_path, [final, answer(city="Oslo")], strategy="tool_calling"), {"city": "Oslo"}
    )
    assert result["status"] == "ok" and result["output"]["city"] == "Oslo"
    assert state.values["attempts"][0]["kind"] == "parse"


# -- the request --------------------------------------------------------------------------------


class _Custom:
    pass


def _circular() -> dict[str, Any]:
    value: dict[str, Any] = {"city": "Oslo"}
    value["self"] = value
    return value


@pytest.mark.parametrize(
    "request_",
    [
        '{"city": ' + _nested(9_000) + "}",  # about 18 KB of JSON text, under the 20,000-character limit
        '{"city": "Oslo", "extra": ' + _nested(12_000)[:19_990] + "}",
        {"city\ud800": "Oslo"},
        {"city": "Os\ud800lo"},
        {"city": "Oslo", "n": 10**5000},
        {"city": "Oslo", "n": 10**4_301 - 1},
        '{"city": "Oslo", "n": ' + "9" * 4_301 + "}",
        '{"city": "Oslo", "amount": NaN}',
        '{"city": "Oslo", "amount": 1e400}',
        {"city": "Oslo", "amount": float("nan")},
        {"city": _Custom()},
        _Custom(),
        _circular(),
        {"city": threading.Lock()},
    ],
    ids=[
        "deep-text",
        "deep-text-cut",
        "surrogate-key",
        "surrogate-value",
        "int-10**5000",
        "int-4301-digits",
        "int-4301-digits-text",
        "nan-text",
        "1e400-text",
        "nan-value",
        "custom-object-field",
        "custom-object",
        "circular",
        "lock",
    ],
)
def test_a_hostile_request_is_rejected_typed_and_recorded(tmp_path: Path, request_: Any) -> None:
    graph = _graph(tmp_path, [answer(city="Oslo")])
    result, state = _turn(graph, request_)
    _ended_typed(result, state)
    assert result["status"] == "rejected" and result["error"]["type"] == "InputRejected"
    assert state.values["messages"][-1].additional_kwargs["keelgraph"] == "rejected"
    # the thread still works
    result, state = _turn(graph, {"city": "Oslo"})
    assert result["status"] == "ok"


def test_a_50_mb_request_is_refused_and_stored_bounded(tmp_path: Path) -> None:
    graph = _graph(tmp_path, [answer(city="Oslo")])
    huge = json.dumps({"city": "x" * (50 * 1024 * 1024)})
    result, state = _turn(graph, huge)
    assert result["status"] == "rejected"
    [problem] = result["error"]["problems"]
    assert "52,428,8" in problem["reason"] and "over the limit" in problem["reason"]
    kept = json.dumps(state.values["request"], default=str) + str(state.values["messages"][-1].content)
    assert len(kept) < 16_000
    assert "sha256" in json.dumps(state.values["request"])
    db = sqlite3.connect(tmp_path / "threads.db")
    stored = db.execute("SELECT SUM(LENGTH(checkpoint)) + 0 FROM checkpoints").fetchone()[0]
    writes = db.execute("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM writes").fetchone()[0]
    assert stored + writes <= 64 * 1024, (stored, writes)


# -- a tool's result ----------------------------------------------------------------------------


def _gen() -> Iterator[int]:
    yield 1


def _loop() -> dict[str, Any]:
    value: dict[str, Any] = {"a": 1}
    value["me"] = value
    return value


@pytest.mark.parametrize(
    "make",
    [
        _Custom,
        threading.Lock,
        _gen,
        _loop,
        lambda: 10**5000,
        lambda: {"x": float("nan")},
        lambda: "Os\ud800lo",
    ],
    ids=["custom", "lock", "generator", "circular", "int-10**5000", "nan", "surrogate"],
)
def test_a_tool_result_that_is_not_data_never_crashes_the_turn(tmp_path: Path, make: Any) -> None:
    def lookup(city: str) -> Any:
        return make()

    tool = with_policy(
        StructuredTool.from_function(lookup, name="lookup", description="Look up a city"), side_effect="read"
    )
    graph = _graph(tmp_path, [call("lookup", city="Oslo"), answer(city="Oslo")], [tool])
    result, state = _turn(graph, {"city": "Oslo"})
    _ended_typed(result, state)
    assert result["status"] == "ok"
    resumed = graph.invoke(None, {"configurable": {"thread_id": "t"}})
    assert resumed["status"] == "ok"
    json.dumps(state.values["tool_log"], allow_nan=False)


# -- a resume value -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [_deep_value(5_000), {"c1": {"action": "edit", "args": {"amount": float("nan")}}}, "\ud800"],
    ids=["deep", "nan-edit", "surrogate"],
)
def test_a_hostile_resume_value_is_asked_again(tmp_path: Path, value: Any) -> None:
    SPENT.clear()
    tool = with_policy(_spend_tool(), side_effect="write", approval="always")
    contract = Contract(input=Question, output=Reply, instructions="Answer.", repair_budget=2)
    graph = _graph(
        tmp_path, [call("spend", amount=5.0), answer(city="Oslo")], [tool], contract=contract, effects=None
    )
    config: Any = {"configurable": {"thread_id": "t"}}
    graph.invoke({"request": {"city": "Oslo"}}, config)
    [task] = graph.get_state(config).tasks
    call_id = task.interrupts[0].value["calls"][0]["id"]
    if isinstance(value, dict) and "c1" in value:
        value = {call_id: value["c1"]}
    graph.invoke(Command(resume=value), config)
    state = graph.get_state(config)
    assert state.next == ("approve",), "a value that cannot be read is asked again"
    assert state.tasks[0].interrupts[-1].value["problem"]
    assert SPENT == []
    result = graph.invoke(Command(resume="approve"), config)
    assert result["status"] == "ok" and SPENT == [5.0]


# -- what a tool's exception may say -----------------------------------------------------------


@pytest.mark.parametrize("detail", ["short", "full"])
def test_tool_exception_text_is_redacted_unless_the_tool_opts_in(
    tmp_path: Path, detail: str, caplog: pytest.LogCaptureFixture
) -> None:
    def lookup(city: str) -> Any:
        raise RuntimeError("query failed: SELECT secret FROM users WHERE id=1 (db /srv/app/shop.sqlite)")

    tool = with_policy(
        StructuredTool.from_function(lookup, name="lookup", description="Look up a city"),
        side_effect="read",
        error_detail=detail,
    )
    graph = _graph(tmp_path, [call("lookup", city="Oslo"), answer(city="Oslo")], [tool])
    with caplog.at_level("WARNING", logger="keelgraph"):
        result, state = _turn(graph, {"city": "Oslo"})
    assert result["status"] == "ok"
    kept = json.dumps([str(m.content) for m in state.values["messages"]])
    assert "lookup failed: RuntimeError: query failed" in kept
    assert ("SELECT secret" in kept) == (detail == "full")
    assert ("/srv/app" in kept) == (detail == "full")
    assert "SELECT secret FROM users" in caplog.text  # the whole text is in the log either way


def test_the_refused_request_benchmark_runs_and_meets_its_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import sys

    path = Path(__file__).parents[1] / "bench" / "refused_request.py"
    spec = importlib.util.spec_from_file_location("bench_refused_request", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_refused_request", bench)  # its TypedDict resolves names there
    spec.loader.exec_module(bench)
    stored = bench.main(["--mb", "2"])
    assert stored["keelgraph"] <= 64 * 1024 < stored["plain"]
