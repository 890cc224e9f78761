"""Bounded tool execution: a pool of workers per graph (hung calls hold a worker, a full pool
refuses typed), every call of a step started at once, timeouts counted against the call limits,
a turn deadline that ends the turn typed, and async tools never waited on past their deadline."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool, StructuredTool, tool
from pydantic import BaseModel

from keelgraph import BudgetExceeded, Contract, UserError, build_graph, sqlite_checkpointer
from keelgraph.contracts.errors import Failure
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools import run_tool_call, with_policy
from keelgraph.tools.pool import ToolPool, running_in

ROOT = Path(__file__).parents[1]


class Ask(BaseModel):
    text: str


class Reply(BaseModel):
    reply: str


CONTRACT = Contract(input=Ask, output=Reply, instructions="Help.", repair_budget=2)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of each test, so every hung tool returns and its thread ends."""
    event = threading.Event()
    yield event
    event.set()


def _hanging(release: threading.Event, seen: list[str] | None = None, **policy: Any) -> BaseTool:
    def hang(q: str) -> str:
        if seen is not None:
            seen.append(q)
        release.wait(30)
        return f"late {q}"

    return with_policy(StructuredTool.from_function(hang, name="hang", description="x"), **policy)


def _drained(pool: ToolPool, within_s: float = 5.0) -> bool:
    end = time.monotonic() + within_s
    while pool.held and time.monotonic() < end:
        time.sleep(0.01)
    return pool.held == 0


def test_hung_calls_never_grow_the_threads_past_the_pool(release: threading.Event) -> None:
    pool = ToolPool(4)
    hang = _hanging(release, timeout_s=0.05)
    before = threading.active_count()
    started = time.perf_counter()
    outcomes = [run_tool_call(hang, f"c{i}", {"q": str(i)}, pool=pool) for i in range(100)]
    took = time.perf_counter() - started
    assert threading.active_count() <= before + 4  # one thread per worker, not one per hung call
    assert [o.kind for o in outcomes[:4]] == ["timeout"] * 4
    assert {o.kind for o in outcomes[4:]} == {"tool_error"}  # refused: the pool is full of hung calls
    assert took < 2.0  # 4 deadlines, then 96 refusals at once
    assert pool.held == pool.hung == 4
    release.set()
    assert _drained(pool)  # the workers come back when the abandoned calls return
    assert pool.hung == 0 and run_tool_call(hang, "again", {"q": "x"}, pool=pool).ok


def test_a_full_pool_refuses_at_once_and_says_why(release: threading.Event) -> None:
    pool = ToolPool(2)
    hang = _hanging(release, timeout_s=0.3)
    assert [run_tool_call(hang, f"c{i}", {"q": str(i)}, pool=pool).kind for i in range(2)] == ["timeout"] * 2
    started = time.perf_counter()
    refused = run_tool_call(hang, "c3", {"q": "3"}, pool=pool)
    assert time.perf_counter() - started < 0.15  # no wait (0.3 s): no worker can come free in time
    assert not refused.ok and refused.kind == "tool_error" and not refused.ran
    assert refused.content == (
        "ERROR: hang was not started: all 2 tool workers are held by earlier calls that did not finish "
        "(a hung tool keeps its worker until it returns)."
    )
    assert "raise tool_workers" in refused.problems[0].fix


def test_a_busy_pool_lets_a_call_wait_for_a_worker_within_its_deadline(release: threading.Event) -> None:
    pool = ToolPool(1)

    def nap(q: str) -> str:
        time.sleep(0.2)
        return q

    slow = with_policy(StructuredTool.from_function(nap, name="nap", description="x"), timeout_s=2)
    first = threading.Thread(target=run_tool_call, args=(slow, "c1", {"q": "1"}), kwargs={"pool": pool})
    first.start()
    time.sleep(0.05)
    assert run_tool_call(slow, "c2", {"q": "2"}, pool=pool).ok  # waited for the worker
    first.join()
    hurried = with_policy(slow, timeout_s=0.1)
    first = threading.Thread(target=run_tool_call, args=(slow, "c3", {"q": "3"}), kwargs={"pool": pool})
    first.start()
    time.sleep(0.05)
    late = run_tool_call(hurried, "c4", {"q": "4"}, pool=pool)
    first.join()
    assert late.kind == "tool_error" and not late.ran
    assert "was not started within 0.1 s: all 1 tool workers were busy" in late.content


def test_an_async_tool_that_ignores_cancellation_is_reported_at_its_deadline(
    release: threading.Event,
) -> None:
    @tool
    async def stubborn(q: str) -> str:
        """Ignore every cancellation until released."""
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue
        return "late"

    pool = ToolPool(2)
    started = time.perf_counter()
    outcome = run_tool_call(with_policy(stubborn, timeout_s=0.2), "c1", {"q": "x"}, pool=pool)
    took = time.perf_counter() - started
    assert outcome.kind == "timeout" and outcome.ran
    assert took < 0.6  # not waited on past its deadline (it was 1 s more)
    assert pool.held == pool.hung == 1  # it holds its worker while it runs on
    release.set()
    assert _drained(pool)


def test_a_turn_deadline_caps_a_direct_call(release: threading.Event) -> None:
    hang = _hanging(release, timeout_s=10)
    started = time.perf_counter()
    with running_in(ToolPool(1), deadline=time.time() + 0.2):
        outcome = run_tool_call(hang, "c1", {"q": "x"})
    assert outcome.kind == "timeout" and time.perf_counter() - started < 0.6
    assert "the time left in this turn" in outcome.content
    spent = run_tool_call(hang, "c2", {"q": "y"}, deadline=time.time() - 1)
    assert spent.kind == "tool_error" and not spent.ran and "time limit is spent" in spent.content


def _parallel_step(n: int) -> AIMessage:
    calls = [{"name": "hang", "args": {"q": str(i)}, "id": f"c{i}", "type": "tool_call"} for i in range(n)]
    return AIMessage("", tool_calls=calls)


def test_sixteen_hung_calls_in_one_step_take_one_deadline(release: threading.Event) -> None:
    deadline = 1.5
    hang = _hanging(release, timeout_s=deadline)
    model = ScriptedChatModel([_parallel_step(16), answer(reply="nothing came back")])
    graph = build_graph(CONTRACT, [hang], model=model, checkpointer=None, strategy="json_object")
    before = threading.active_count()
    started = time.perf_counter()
    result = graph.invoke({"request": {"text": "hi"}})
    took = time.perf_counter() - started
    assert result["status"] == "ok"
    assert took < deadline + 1.0  # one deadline for all 16, not one per wave of 8
    assert threading.active_count() <= before + 8 + 2  # the pool's 8 workers (+ LangGraph's own)
    replies = [m for m in model.calls[1]["messages"] if "hang" in str(m.content)]
    assert replies  # the model read the 16 failures
    assert result["stats"]["tool_calls"] == 0


def test_timeouts_count_against_the_call_limits(tmp_path: Path, release: threading.Event) -> None:
    seen: list[str] = []
    hang = _hanging(release, seen, timeout_s=0.05)
    script = [call("hang", q="1"), call("hang", q="2"), call("hang", q="3"), answer(reply="gave up")]
    graph = build_graph(
        CONTRACT,
        [hang],
        model=ScriptedChatModel(script),
        checkpointer=sqlite_checkpointer(tmp_path / "threads.db"),
        effects=None,
        strategy="json_object",
        max_tool_calls=2,
    )
    config: Any = {"configurable": {"thread_id": "t"}}
    result = graph.invoke({"request": {"text": "hi"}}, config)
    assert result["status"] == "ok" and seen == ["1", "2"]  # the third call was not run
    values = graph.get_state(config).values
    last = [m for m in values["messages"] if isinstance(m, ToolMessage)][-1]
    assert "limit of 2 tool calls per turn is reached" in str(last.content)
    assert values["thread_tool_calls"] == 2 and result["stats"]["tool_calls"] == 0

    seen.clear()
    script = [call("hang", q="a"), answer(reply="a"), call("hang", q="b"), answer(reply="no more")]
    graph = build_graph(
        CONTRACT,
        [hang],
        model=ScriptedChatModel(script),
        checkpointer=sqlite_checkpointer(tmp_path / "threads2.db"),
        effects=None,
        strategy="json_object",
        max_thread_tool_calls=1,
    )
    graph.invoke({"request": {"text": "one"}}, config)
    graph.invoke({"request": {"text": "two"}}, config)
    assert seen == ["a"]  # the timed-out call of the first turn used the thread's one call


def test_a_turn_deadline_ends_the_turn_typed(release: threading.Event) -> None:
    seen: list[str] = []
    hang = _hanging(release, seen, timeout_s=10)
    model = ScriptedChatModel([call("hang", q="x"), answer(reply="never")])
    graph = build_graph(
        CONTRACT, [hang], model=model, checkpointer=None, strategy="json_object", turn_timeout_s=0.5
    )
    started = time.perf_counter()
    result = graph.invoke({"request": {"text": "hi"}})
    took = time.perf_counter() - started
    assert took < 0.5 + 1.0 and seen == ["x"]  # the tool's 10 s were capped by the turn's 0.5 s
    assert result["status"] == "failed" and len(model.calls) == 1
    failure = Failure.model_validate(result["error"])
    assert failure.type == "BudgetExceeded" and failure.problems[0].field == "turn_timeout_s"
    error = failure.to_exception()
    assert isinstance(error, BudgetExceeded) and error.unit == "seconds" and error.limit == 0.5
    assert "raise turn_timeout_s" in str(error)


def test_past_the_turn_deadline_no_call_starts_and_no_model_is_asked(release: threading.Event) -> None:
    seen: list[str] = []
    hang = _hanging(release, seen, timeout_s=10)

    def slow_step(messages: Any) -> Any:
        time.sleep(0.4)
        return call("hang", q="x")

    model = ScriptedChatModel([slow_step, answer(reply="never")])
    graph = build_graph(
        CONTRACT, [hang], model=model, checkpointer=None, strategy="json_object", turn_timeout_s=0.3
    )
    result = graph.invoke({"request": {"text": "hi"}})
    assert result["status"] == "failed" and seen == []  # the step came too late: nothing started
    assert Failure.model_validate(result["error"]).problems[0].field == "turn_timeout_s"

    def slow_draft(messages: Any) -> Any:
        time.sleep(0.4)
        return "not json"

    model = ScriptedChatModel([slow_draft, answer(reply="never")])
    graph = build_graph(
        CONTRACT, [hang], model=model, checkpointer=None, strategy="json_object", turn_timeout_s=0.3
    )
    result = graph.invoke({"request": {"text": "hi"}})
    assert result["status"] == "failed" and len(model.calls) == 1  # no repair call past the deadline
    assert Failure.model_validate(result["error"]).type == "BudgetExceeded"


@pytest.mark.parametrize(
    ("option", "value"), [("tool_workers", 0), ("turn_timeout_s", 0), ("turn_timeout_s", -1.0)]
)
def test_pool_and_deadline_options_are_checked(option: str, value: float) -> None:
    with pytest.raises(UserError, match=option):
        build_graph(CONTRACT, [], model=ScriptedChatModel([]), checkpointer=None, **{option: value})


def test_tool_pool_bench_runs_quick() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tool_pool.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "threads" in done.stdout and "16 parallel hung calls" in done.stdout
