"""History compaction in a real graph: the state stays small, the archive keeps everything, the
model still sees recent turns, and a dangling tool call is answered before the model is asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.tools import StructuredTool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.store.memory import InMemoryStore
from pydantic import BaseModel

from keelgraph import Contract, build_graph
from keelgraph.graphs._prompt import kind_of
from keelgraph.graphs.history import archive_namespace, transcript
from keelgraph.testing import ScriptedChatModel, answer, call


class Ask(BaseModel):
    text: str


class Reply(BaseModel):
    reply: str


def lookup(q: str) -> str:
    """Look something up."""
    return f"found {q}"


def desk(messages: list[BaseMessage]) -> dict[str, Any]:
    if "Data from lookup" in str(messages[-1].content) or "no result" in str(messages[-1].content):
        return answer(reply=f"answered after {len(messages)} prompt messages")
    return call("lookup", q="x")


def graph(store: InMemoryStore | None, history_tokens: int | None = 300) -> tuple[Any, ScriptedChatModel]:
    model = ScriptedChatModel([desk], repeat_last=True)
    tool = StructuredTool.from_function(lookup, name="lookup")
    built = build_graph(
        Contract(input=Ask, output=Reply, instructions="Help."),
        [tool],
        model=model,
        checkpointer=InMemorySaver(),
        store=store,
        history_tokens=history_tokens,
        effects=None,
    )
    return built, model


def run_turns(g: Any, n: int, thread: str = "t") -> list[dict[str, Any]]:
    config = {"configurable": {"thread_id": thread}}
    return [g.invoke({"request": {"text": f"question number {i}"}}, config) for i in range(n)]


def test_state_stays_bounded_and_the_archive_keeps_every_message() -> None:
    store = InMemoryStore()
    g, model = graph(store)
    results = run_turns(g, 30)
    assert all(r["status"] == "ok" for r in results)
    config = {"configurable": {"thread_id": "t"}}
    state = g.get_state(config).values
    kinds = [kind_of(m) for m in state["messages"]]
    assert kinds[-4:] == ["request", "step", None, "answer"]  # the last turn, whole
    assert set(kinds[:-4]) == {"request", "answer"}  # earlier turns: what the model is shown
    assert len(state["messages"]) < 40, len(state["messages"])  # 30 turns x 4 messages otherwise
    assert state["turn"] == 30 and state["archived_turns"] == 29
    whole = transcript(g.store, "t", state["messages"])
    requests = [json.loads(str(m.content))["text"] for m in whole if kind_of(m) == "request"]
    assert requests == [f"question number {i}" for i in range(30)]  # nothing lost, in order, once
    assert len({m.id for m in whole}) == len(whole)
    assert sum(1 for m in whole if kind_of(m) == "answer") == 30
    assert len(store.search(archive_namespace("t"), limit=100)) == 29  # one item per archived turn
    # The model still sees the recent turns, as question and answer.
    prompt = model.calls[-2]["messages"]
    shown = [str(m.content) for m in prompt if isinstance(m, HumanMessage)]
    assert any("question number 28" in text for text in shown)
    assert not any("question number 0" in text for text in shown)


def test_without_a_store_or_a_budget_the_thread_keeps_everything() -> None:
    for store, budget in ((None, 300), (InMemoryStore(), None)):
        g, _ = graph(store, budget)
        run_turns(g, 6)
        messages = g.get_state({"configurable": {"thread_id": "t"}}).values["messages"]
        assert sum(1 for m in messages if kind_of(m) == "step") == 6


def test_a_rejected_request_is_archived_not_lost() -> None:
    store = InMemoryStore()
    g, _ = graph(store)
    config = {"configurable": {"thread_id": "r"}}
    g.invoke({"request": {"text": "first"}}, config)
    assert g.invoke({"request": "not json{"}, config)["status"] == "rejected"
    g.invoke({"request": {"text": "third"}}, config)
    messages = g.get_state(config).values["messages"]
    assert not any(kind_of(m) == "rejected" for m in messages)  # left the state ...
    whole = transcript(store, "r", messages)
    assert [str(m.content) for m in whole if kind_of(m) == "rejected"] == ["not json{"]  # ... kept


def test_a_dangling_tool_call_gets_a_result_before_the_model_is_asked() -> None:
    g, model = graph(InMemoryStore())
    config: Any = {"configurable": {"thread_id": "d"}}
    g.invoke({"request": {"text": "hi"}}, config)
    # A run that stopped between the model's call and the tool (a crash, a hand edit of the state).
    orphan = AIMessage(
        "", tool_calls=[{"name": "lookup", "args": {"q": "y"}, "id": "c-orphan", "type": "tool_call"}]
    )
    g.update_state(config, {"messages": [orphan], "status": "running"}, as_node="act")
    result = g.invoke(None, config)
    assert result["status"] == "ok", result.get("error")
    messages = g.get_state(config).values["messages"]
    fixed = [m for m in messages if getattr(m, "tool_call_id", None) == "c-orphan"]
    assert len(fixed) == 1 and "effect is unknown" in str(fixed[0].content)
    prompt = model.calls[-1]["messages"]
    assert any("no result" in str(m.content) for m in prompt)


def test_default_graph_archives_in_the_default_store(tmp_path: Path) -> None:
    model = ScriptedChatModel([answer(reply="ok")], repeat_last=True)
    g = build_graph(Contract(input=Ask, output=Reply, instructions="Help."), model=model, effects=None)
    run_turns(g, 3, thread="default")
    assert g.store is not None
    messages = g.get_state({"configurable": {"thread_id": "default"}}).values["messages"]
    assert [kind_of(m) for m in transcript(g.store, "default", messages)].count("request") == 3
