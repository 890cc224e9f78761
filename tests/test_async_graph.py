"""Async runs: `ainvoke`/`astream` await the model and async checks on the event loop, hold no
thread while a model answers, and give the same results as the sync API on the same graph."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage
from pydantic import BaseModel

from keelgraph import CheckContext, Contract, build_graph
from keelgraph.contracts.suspend import Await, Invoke, Sleep, adrive, drive
from keelgraph.graphs.events import events, phases
from keelgraph.graphs.persistence import async_checkpointer, sqlite_checkpointer
from keelgraph.testing import ScriptedChatModel, answer, call


class Ask(BaseModel):
    question: str


class Reply(BaseModel):
    reply: str


CONTRACT = Contract(input=Ask, output=Reply, instructions="Answer.")


def lookup(query: str) -> str:
    """Look up a record."""
    return f"record for {query}"


def test_steps_receive_results_and_exceptions_where_they_waited() -> None:
    class Boom(Exception):
        pass

    class Fails:
        def invoke(self, value: Any, config: Any) -> Any:
            raise Boom(value)

        async def ainvoke(self, value: Any, config: Any) -> Any:
            raise Boom(value)

    async def seven() -> int:
        return 7

    def steps() -> Any:
        got = yield Await(seven())
        yield Sleep(0)
        try:
            yield Invoke(Fails(), "x")
        except Boom as exc:
            return (got, str(exc))
        return None

    assert drive(steps()) == (7, "x")
    assert asyncio.run(adrive(steps())) == (7, "x")


async def test_ainvoke_awaits_the_model_and_async_checks_on_the_loop(tmp_path: Any) -> None:
    loop_thread = threading.get_ident()
    seen: dict[str, int] = {}

    async def step(messages: list[BaseMessage]) -> Any:
        seen["model"] = threading.get_ident()
        return answer(reply="fine")

    async def polite(output: Reply, ctx: CheckContext[Ask]) -> str | None:
        seen["check"] = threading.get_ident()
        return None

    contract = Contract(input=Ask, output=Reply, instructions="Answer.", checks=[polite])
    async with async_checkpointer(tmp_path / "threads.db") as saver:
        graph = build_graph(contract, model=ScriptedChatModel([step]), checkpointer=saver, store=None)
        result = await graph.ainvoke({"request": {"question": "hi?"}}, {"configurable": {"thread_id": "t"}})
    assert result["status"] == "ok" and result["output"] == {"reply": "fine"}
    assert seen == {"model": loop_thread, "check": loop_thread}


async def test_model_calls_in_flight_are_not_capped_by_executor_threads(tmp_path: Any) -> None:
    """Twenty runs wait in the model at once: a sync node would hold one of the default
    executor's few threads per call (min(32, cpus + 4)), and these calls wait for each other."""
    runs = 20
    inside = 0
    all_in = asyncio.Event()

    async def step(messages: list[BaseMessage]) -> Any:
        nonlocal inside
        inside += 1
        if inside == runs:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), timeout=20)
        return answer(reply="together")

    async with async_checkpointer(tmp_path / "threads.db") as saver:
        graph = build_graph(
            CONTRACT, model=ScriptedChatModel([step], repeat_last=True), checkpointer=saver, store=None
        )
        results = await asyncio.gather(
            *(
                graph.ainvoke({"request": {"question": f"q{i}"}}, {"configurable": {"thread_id": f"t{i}"}})
                for i in range(runs)
            )
        )
    assert [r["status"] for r in results] == ["ok"] * runs


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sync_and_async_runs_give_the_same_turn(tmp_path: Any, mode: str) -> None:
    """A tool call, a rejected answer and its repair: the same messages, stats and events."""

    def rude(output: Reply, ctx: CheckContext[Ask]) -> str | None:
        return "say please" if "please" not in output.reply else None

    script = [call("lookup", query="a"), answer(reply="no"), answer(reply="please, a record")]
    contract = Contract(input=Ask, output=Reply, instructions="Answer.", checks=[rude])
    request = {"request": {"question": "a?"}}
    config: Any = {"configurable": {"thread_id": "same"}}
    if mode == "sync":
        saver = sqlite_checkpointer(tmp_path / "threads.db")
        graph = build_graph(
            contract, [lookup_tool()], model=ScriptedChatModel(script), checkpointer=saver, store=None
        )
        found = list(events(graph.stream(request, config, stream_mode="custom")))
        values = graph.get_state(config).values
    else:

        async def run() -> tuple[list[Any], dict[str, Any]]:
            async with async_checkpointer(tmp_path / "threads.db") as saver:
                graph = build_graph(
                    contract, [lookup_tool()], model=ScriptedChatModel(script), checkpointer=saver, store=None
                )
                chunks = [c async for c in graph.astream(request, config, stream_mode="custom")]
                return list(events(chunks)), (await graph.aget_state(config)).values

        found, values = asyncio.run(run())
    assert values["status"] == "ok" and values["output"] == {"reply": "please, a record"}
    assert values["stats"]["model_calls"] == 3 and values["stats"]["repairs"] == 1
    assert phases(found) == [
        "input",
        "model_started",
        "model_finished",
        "tool_started",
        "tool_finished",
        "model_started",
        "model_finished",
        "repairing",
        "model_started",
        "model_finished",
        "output",
        "final",
    ]


def lookup_tool() -> Any:
    from langchain_core.tools import StructuredTool

    return StructuredTool.from_function(lookup, name="lookup")


async def test_a_model_that_fails_then_answers_is_retried_with_an_async_pause(tmp_path: Any) -> None:
    import httpx
    import openai

    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    busy = openai.RateLimitError("busy", response=httpx.Response(429, request=request), body=None)
    model = ScriptedChatModel([busy, AIMessage('{"action": "final_answer", "answer": {"reply": "ok"}}')])
    async with async_checkpointer(tmp_path / "threads.db") as saver:
        graph = build_graph(CONTRACT, model=model, checkpointer=saver, store=None)
        result = await graph.ainvoke({"request": {"question": "x"}}, {"configurable": {"thread_id": "r"}})
    assert result["status"] == "ok"
    attempts = result["stats"]["model_attempts"]
    assert [a["outcome"] for a in attempts] == ["RateLimitError", "ok"]


async def test_an_async_tool_runs_on_the_loop_and_is_cancelled_at_its_deadline(tmp_path: Any) -> None:
    from langchain_core.tools import StructuredTool

    from keelgraph import with_policy

    loop_thread = threading.get_ident()
    seen: dict[str, Any] = {}

    async def fetch(query: str) -> str:
        """Fetch a record."""
        seen["fetch"] = threading.get_ident()
        return f"record for {query}"

    async def hang(query: str) -> str:
        """Wait for a record that never comes."""
        try:
            await asyncio.sleep(60)
        finally:
            seen["hang_cancelled"] = True
        return "never"

    tools = [
        StructuredTool.from_function(coroutine=fetch, name="fetch", description="Fetch a record."),
        with_policy(
            StructuredTool.from_function(coroutine=hang, name="hang", description="Wait."), timeout_s=0.2
        ),
    ]
    script = [call("fetch", query="a"), call("hang", query="b"), answer(reply="done")]
    async with async_checkpointer(tmp_path / "threads.db") as saver:
        graph = build_graph(
            CONTRACT, tools, model=ScriptedChatModel(script), checkpointer=saver, store=None, effects=None
        )
        result = await graph.ainvoke({"request": {"question": "x"}}, {"configurable": {"thread_id": "a"}})
        values = (await graph.aget_state({"configurable": {"thread_id": "a"}})).values
    assert result["status"] == "ok"
    assert seen == {"fetch": loop_thread, "hang_cancelled": True}
    replies = [m for m in values["messages"] if m.type == "tool"]
    assert [m.status for m in replies] == ["success", "error"]
    assert "did not finish within 0.2 s" in str(replies[1].content)


async def test_blocking_work_of_async_nodes_runs_off_the_loop_with_an_async_store(tmp_path: Any) -> None:
    """The archive (an async SQLite store, whose sync calls refuse the loop's thread), the sync
    checks and the ledger run between the awaited steps, on executor threads."""
    from keelgraph.graphs.persistence import async_store

    loop_thread = threading.get_ident()
    checked: list[int] = []

    def plain_check(output: Reply, ctx: CheckContext[Ask]) -> str | None:
        checked.append(threading.get_ident())
        return None

    def step(messages: list[BaseMessage]) -> Any:
        shown = sum(1 for m in messages if "earlier" in str(m.content))
        return answer(reply=f"earlier turns shown: {shown}")

    contract = Contract(input=Ask, output=Reply, instructions="Answer.", checks=[plain_check])
    config: Any = {"configurable": {"thread_id": "long"}}
    async with (
        async_checkpointer(tmp_path / "threads.db") as saver,
        async_store(tmp_path / "store.db") as store,
    ):
        graph = build_graph(
            contract, model=ScriptedChatModel([step], repeat_last=True), checkpointer=saver, store=store
        )
        for turn in range(4):
            result = await graph.ainvoke({"request": {"question": f"earlier question {turn}"}}, config)
            assert result["status"] == "ok", result["error"]
        values = (await graph.aget_state(config)).values
    assert values["archived_turns"] == 3
    assert checked and loop_thread not in checked
