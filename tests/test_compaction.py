"""History in a real graph: the state holds only the turn in progress, the archive keeps every turn,
the model is still shown recent turns (read back from the archive), tool guards still see the last
answer, and a dangling tool call is answered before the model is asked."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import StructuredTool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.store.base import GetOp, Op, Result
from langgraph.store.memory import InMemoryStore
from langgraph.types import Command
from pydantic import BaseModel

from keelgraph import Contract, build_graph, with_policy
from keelgraph.apps.support.desk import make_contract, make_tools, seed_database
from keelgraph.graphs import history
from keelgraph.graphs.history import archive_namespace, transcript
from keelgraph.graphs.prompt import kind_of
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


class CountingStore(InMemoryStore):
    """An in-memory store that counts the archive reads it answers."""

    reads = 0

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        ops = list(ops)
        self.reads += sum(isinstance(op, GetOp) for op in ops)
        return super().batch(ops)


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


def run_turns(g: Any, n: int, thread: str = "t", first: int = 0) -> list[dict[str, Any]]:
    config = {"configurable": {"thread_id": thread}}
    return [g.invoke({"request": {"text": f"question number {i}"}}, config) for i in range(first, first + n)]


def shown_questions(prompt: list[BaseMessage]) -> list[str]:
    return [json.loads(str(m.content))["text"] for m in prompt if str(m.content).startswith('{"text"')]


def test_the_state_holds_one_turn_and_the_archive_keeps_every_message() -> None:
    store = InMemoryStore()
    g, model = graph(store)
    results = run_turns(g, 30)
    assert all(r["status"] == "ok" for r in results)
    config = {"configurable": {"thread_id": "t"}}
    state = g.get_state(config).values
    assert [kind_of(m) for m in state["messages"]] == ["request", "step", None, "answer"]  # this turn
    assert state["turn"] == 30 and state["archived_turns"] == 29 and state["archive_head"]
    whole = transcript(g.store, "t", state["messages"])
    requests = [json.loads(str(m.content))["text"] for m in whole if kind_of(m) == "request"]
    assert requests == [f"question number {i}" for i in range(30)]  # nothing lost, in order, once
    assert len({m.id for m in whole}) == len(whole)
    assert sum(1 for m in whole if kind_of(m) == "answer") == 30
    assert len(store.search(archive_namespace("t"), limit=100)) == 29  # one item per archived turn
    # The model is still shown the recent turns, as question and answer, newest within the budget.
    prompt = model.calls[-2]["messages"]
    shown = shown_questions(prompt)
    assert shown[-1] == "question number 29" and "question number 28" in shown
    assert "question number 0" not in shown
    assert shown == [f"question number {i}" for i in range(30 - len(shown), 30)]  # whole, in order
    earlier = prompt[1 : prompt.index(next(m for m in prompt if "question number 29" in str(m.content)))]
    assert all(isinstance(m, (HumanMessage, AIMessage)) for m in earlier)  # no earlier tool traffic
    assert history.estimate_prompt_tokens(earlier) <= 300


def test_every_checkpoint_of_a_turn_is_the_same_size_at_turn_3_and_at_turn_40() -> None:
    saver = InMemorySaver()
    model = ScriptedChatModel([desk], repeat_last=True)
    g = build_graph(
        Contract(input=Ask, output=Reply, instructions="Help."),
        [StructuredTool.from_function(lookup, name="lookup")],
        model=model,
        checkpointer=saver,
        store=InMemoryStore(),
        effects=None,
    )
    config: Any = {"configurable": {"thread_id": "s"}}
    sizes = {}
    for i in range(40):
        g.invoke({"request": {"text": f"question number {i:02d}"}}, config)
        latest = saver.get_tuple(config)
        assert latest is not None
        values = latest.checkpoint["channel_values"]
        sizes[i + 1] = len(saver.serde.dumps_typed(values["messages"])[1])
    assert sizes[40] <= sizes[3] * 1.02, sizes  # what a checkpoint holds does not grow with the thread


def test_without_a_store_or_a_budget_the_thread_keeps_everything() -> None:
    for store, budget in ((None, 300), (InMemoryStore(), None)):
        g, model = graph(store, budget)
        run_turns(g, 6)
        messages = g.get_state({"configurable": {"thread_id": "t"}}).values["messages"]
        assert sum(1 for m in messages if kind_of(m) == "step") == 6
        assert len(shown_questions(model.calls[-2]["messages"])) == 6


def test_earlier_turns_are_read_once_then_from_the_process_cache() -> None:
    store = CountingStore()
    g, model = graph(store)
    run_turns(g, 4)
    assert store.reads == 0  # this process archived every turn it shows: no read needed
    history._SEEN.clear()  # as if another process ran those turns (or this one restarted)
    run_turns(g, 1, first=4)
    assert 0 < store.reads <= history.READ_AHEAD  # one read request for the missing turns
    assert shown_questions(model.calls[-2]["messages"]) == [f"question number {i}" for i in range(5)]
    reads = store.reads
    run_turns(g, 3, first=5)
    assert store.reads == reads


def test_a_thread_resumed_from_an_older_checkpoint_is_shown_its_own_turns() -> None:
    store = InMemoryStore()
    g, model = graph(store)
    run_turns(g, 5, thread="f")  # questions 0..4 are turns 1..5
    config: Any = {"configurable": {"thread_id": "f"}}
    ends = {s.values.get("turn"): s for s in g.get_state_history(config) if not s.next and s.values}
    old_end = ends[5].config
    # Time travel: go on from the end of turn 2, twice. Turn 3 of the archive is overwritten.
    g.invoke({"request": {"text": "branch A"}}, ends[2].config)
    g.invoke({"request": {"text": "branch B"}}, config)
    assert shown_questions(model.calls[-2]["messages"]) == [
        "question number 0", "question number 1", "branch A", "branch B"
    ]  # fmt: skip
    whole = transcript(store, "f", g.get_state(config).values["messages"])
    assert "branch A" in str([m.content for m in whole])
    # Back to the first timeline, in a process that has not seen it: its turns 4 and 5 are still in
    # the archive, its turn 3 is not (branch A took that place), and the walk stops there.
    history._SEEN.clear()
    g.invoke({"request": {"text": "back"}}, old_end)
    shown = shown_questions(model.calls[-2]["messages"])
    assert shown == ["question number 3", "question number 4", "back"], shown


def test_a_rejected_request_is_archived_not_lost() -> None:
    store = InMemoryStore()
    g, model = graph(store)
    config = {"configurable": {"thread_id": "r"}}
    g.invoke({"request": {"text": "first"}}, config)
    assert g.invoke({"request": "not json{"}, config)["status"] == "rejected"
    g.invoke({"request": {"text": "third"}}, config)
    messages = g.get_state(config).values["messages"]
    assert not any(kind_of(m) == "rejected" for m in messages)  # left the state ...
    whole = transcript(store, "r", messages)
    assert [str(m.content) for m in whole if kind_of(m) == "rejected"] == ["not json{"]  # ... kept
    assert shown_questions(model.calls[-2]["messages"]) == ["first", "third"]  # and not shown


def test_a_dangling_tool_call_gets_a_result_before_the_model_is_asked() -> None:
    g, model = graph(InMemoryStore())
    config: Any = {"configurable": {"thread_id": "d"}}
    run_turns(g, 2, thread="d")
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
    assert shown_questions(prompt)[:2] == ["question number 0", "question number 1"]  # read back too
    calls = {c["id"] for m in prompt if isinstance(m, AIMessage) for c in m.tool_calls}
    assert calls <= {m.tool_call_id for m in prompt if isinstance(m, ToolMessage)}


def test_tool_guards_see_the_last_answer_read_back_from_the_archive(tmp_path: Path) -> None:
    """The ticket policy allows only orders named in the message or in the last answer; that
    answer has left the state, and the guard, the approval and its resume still see it."""
    path = seed_database(tmp_path / "shop.db")
    script = [
        answer(reply="Order 1002 has shipped.", order_ids=[1002]),
        call("open_ticket", customer_id=1, order_id=1001, kind="damaged", note="damaged"),
        call("open_ticket", customer_id=1, order_id=1002, kind="damaged", note="damaged"),
        answer(reply="Ticket opened for order 1002.", order_ids=[1002]),
    ]
    model = ScriptedChatModel(script)
    g = build_graph(
        make_contract(path), make_tools(path), model=model, checkpointer=InMemorySaver(),
        store=InMemoryStore(), effects=None,
    )  # fmt: skip
    config: Any = {"configurable": {"thread_id": "s", "keelgraph_user": "ada"}}
    g.invoke({"request": {"message": "Where is order 1002?"}}, config)
    paused = g.invoke({"request": {"message": "It arrived damaged, open a ticket"}}, config)
    held = [str(m.content) for m in g.get_state(config).values["messages"]]
    assert not any("Where is order 1002?" in text for text in held)  # the first turn left the state
    [ask] = paused["__interrupt__"]
    assert [c["args"]["order_id"] for c in ask.value["calls"]] == [1002]  # 1001 is refused, not asked
    history._SEEN.clear()  # resumed by another process
    result = g.invoke(Command(resume="approve"), config)
    assert result["output"]["ticket_id"] == 1 and result["output"]["order_ids"] == [1002]
    assert "NOT RUN: order_id=1001 is not allowed here; use one of [1002]" in str(
        model.calls[2]["messages"][-1].content
    )


def test_a_value_the_user_wrote_in_an_earlier_turn_is_still_the_users() -> None:
    sent: list[str] = []

    def send_email(to: str, body: str) -> str:
        """Send an e-mail."""
        sent.append(to)
        return "sent"

    tool = with_policy(
        StructuredTool.from_function(send_email, name="send_email"), side_effect="external", from_user=("to",)
    )
    script = [
        answer(reply="noted"),
        call("send_email", to="me@home.example", body="hi"),
        answer(reply="sent"),
    ]
    g = build_graph(
        Contract(input=Ask, output=Reply, instructions="Help."), [tool], model=ScriptedChatModel(script),
        checkpointer=InMemorySaver(), store=InMemoryStore(), effects=None, strategy="json_object",
    )  # fmt: skip
    config: Any = {"configurable": {"thread_id": "m"}}
    g.invoke({"request": {"text": "my address is me@home.example"}}, config)
    assert g.invoke({"request": {"text": "mail me the summary"}}, config)["status"] == "ok"
    assert sent == ["me@home.example"]


def test_default_graph_archives_in_the_default_store(tmp_path: Path) -> None:
    model = ScriptedChatModel([answer(reply="ok")], repeat_last=True)
    g = build_graph(Contract(input=Ask, output=Reply, instructions="Help."), model=model, effects=None)
    run_turns(g, 3, thread="default")
    assert g.store is not None
    messages = g.get_state({"configurable": {"thread_id": "default"}}).values["messages"]
    assert [kind_of(m) for m in transcript(g.store, "default", messages)].count("request") == 3
    assert len(shown_questions(model.calls[-1]["messages"])) == 3
