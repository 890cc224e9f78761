"""Streaming that tells the truth (issue 17, item 3): the turn's phases as typed custom events, the
validated output as its own event, and the model's raw text marked as drafts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langchain_core.tools import StructuredTool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from langgraph_sdk.schema import StreamPart
from pydantic import BaseModel

from keelgraph import Contract, build_graph, with_policy
from keelgraph.graphs import events as events_module
from keelgraph.graphs.events import DRAFT_TAG, Event, aevents, as_event, emit, events, phases
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools import MemoryLedger


class Ask(BaseModel):
    order_id: int


class Done(BaseModel):
    reply: str


SECRET = "sk-live-0123456789abcdef"
REJECTED_DRAFT = "all done, nothing to see"
GOOD = "refunded 30.00 on order 7"


def lookup(order_id: int) -> str:
    """Look up an order."""
    return f"order {order_id}: 2 mugs, 30.00 EUR (card token {SECRET})"


def refund(order_id: int, amount: float) -> str:
    """Refund an amount on an order."""
    return f"refunded {amount:.2f} on order {order_id}"


def says_what_was_refunded(out: Done, ctx: Any) -> str | None:
    return None if "refunded" in out.reply else "reply must say what was refunded"


CONTRACT = Contract(
    input=Ask, output=Done, instructions="Handle refunds.", checks=[says_what_was_refunded], repair_budget=2
)
SCRIPT = [
    call("lookup"),
    call("refund", amount=30),
    answer(reply=REJECTED_DRAFT),  # fails the check once: a repair
    answer(reply=GOOD),
]
FIRST_RUN = [
    "input",
    "model_started",
    "model_finished",
    "tool_started",
    "tool_finished",
    "model_started",
    "model_finished",
    "waiting_for_approval",
]
RESUMED = [
    "decided",
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
CFG: Any = {"configurable": {"thread_id": "t"}}


def _graph(script: list[Any] = SCRIPT, checkpointer: Any = None) -> Any:
    tools = [
        with_policy(StructuredTool.from_function(lookup), from_input=("order_id",)),
        with_policy(
            StructuredTool.from_function(refund),
            side_effect="write",
            approval="always",
            from_input=("order_id",),
        ),
    ]
    return build_graph(
        CONTRACT,
        tools,
        model=ScriptedChatModel(script),
        checkpointer=checkpointer or InMemorySaver(),
        effects=MemoryLedger(),
        strategy="json_object",
    )


def _check_turn(first: list[Event], resumed: list[Event]) -> None:
    assert phases(first) == FIRST_RUN
    assert phases(resumed) == RESUMED
    by_phase: dict[str, list[Any]] = {}
    for event in [*first, *resumed]:
        by_phase.setdefault(str(event.get("phase", "output")), []).append(event)
    assert by_phase["input"] == [
        {"keelgraph": "phase", "phase": "input", "valid": True, "problems": [], "replayed": False}
    ]
    finished = by_phase["model_finished"]
    assert [(e["decision"], e["tools"]) for e in finished] == [
        ("tool_calls", ["lookup"]),
        ("tool_calls", ["refund"]),
        ("answer", []),
        ("answer", []),
    ]
    assert all(e["model"] == "keelgraph-scripted" for e in finished), finished
    assert [e["call"] for e in by_phase["model_started"]] == [1, 2, 3, 4]
    assert [e["repair"] for e in by_phase["model_started"]] == [False, False, False, True]
    tools = by_phase["tool_finished"]
    assert [(e["name"], e["outcome"]) for e in tools] == [("lookup", "ok"), ("refund", "ok")]
    assert [e["call_id"] for e in by_phase["tool_started"]] == [e["call_id"] for e in tools]
    [waiting] = by_phase["waiting_for_approval"]
    assert [(c["name"], c["args"]) for c in waiting["calls"]] == [("refund", {"amount": 30, "order_id": 7})]
    assert waiting["problem"] is None
    [decided] = by_phase["decided"]
    assert [(d["name"], d["action"]) for d in decided["decisions"]] == [("refund", "approve")]
    [repairing] = by_phase["repairing"]
    assert repairing["attempt"] == 1 and repairing["kind"] == "check"
    assert [p["reason"] for p in repairing["problems"]] == ["reply must say what was refunded"]
    [output] = by_phase["output"]
    assert output == {"keelgraph": "output", "output": {"reply": GOOD}}
    [final] = by_phase["final"]
    assert final["status"] == "ok" and final["error"] is None and not final["replayed"]
    assert final["stats"]["model_calls"] == 4 and final["stats"]["tool_calls"] == 2
    assert final["stats"]["repairs"] == 1
    text = json.dumps([*first, *resumed])
    assert REJECTED_DRAFT not in text  # no rejected draft in any event, let alone an output one
    assert SECRET not in text  # tool events carry no arguments or results


def test_a_turn_streams_its_phases_in_order() -> None:
    graph = _graph()
    first = list(events(graph.stream({"request": {"order_id": 7}}, CFG, stream_mode="custom")))
    resumed = list(events(graph.stream(Command(resume={"action": "approve"}), CFG, stream_mode="custom")))
    _check_turn(first, resumed)
    assert graph.get_state(CFG).values["output"] == {"reply": GOOD}


async def test_astream_streams_the_same_phases() -> None:
    graph = _graph()
    modes = ["updates", "custom"]
    first = [e async for e in aevents(graph.astream({"request": {"order_id": 7}}, CFG, stream_mode=modes))]
    resume = Command(resume={"action": "approve"})
    resumed = [e async for e in aevents(graph.astream(resume, CFG, stream_mode=modes, subgraphs=True))]
    _check_turn(first, resumed)


def test_model_tokens_are_marked_as_drafts() -> None:
    """The messages stream still shows what the model wrote, each call tagged as a draft."""
    graph = _graph()
    chunks = list(graph.stream({"request": {"order_id": 7}}, CFG, stream_mode=["messages", "custom"]))
    chunks += graph.stream(Command(resume={"action": "approve"}), CFG, stream_mode=["messages", "custom"])
    drafts = [
        (msg, meta)
        for mode, data in chunks
        if mode == "messages"
        for msg, meta in [data]
        if DRAFT_TAG in (meta.get("tags") or [])
    ]
    assert len(drafts) == 4  # one per model call
    assert all(meta["keelgraph"] == "draft" and meta["langgraph_node"] == "reason" for _, meta in drafts)
    assert any(REJECTED_DRAFT in str(msg.content) for msg, _ in drafts)  # visible, but as a draft
    # Nothing untagged carries the rejected draft; the answer comes as the output event only.
    for mode, data in chunks:
        if mode == "messages" and DRAFT_TAG not in (data[1].get("tags") or []):
            assert REJECTED_DRAFT not in str(data[0].content)
    outputs = [e for e in events(chunks) if e["keelgraph"] == "output"]
    assert outputs == [{"keelgraph": "output", "output": {"reply": GOOD}}]


def test_updates_streaming_is_unaffected_and_adds_no_checkpoint() -> None:
    saver_plain, saver_streamed = InMemorySaver(), InMemorySaver()
    plain, streamed = _graph(checkpointer=saver_plain), _graph(checkpointer=saver_streamed)
    request, resume = {"request": {"order_id": 7}}, Command(resume={"action": "approve"})
    updates = [*plain.stream(request, CFG, stream_mode="updates")]
    updates += plain.stream(resume, CFG, stream_mode="updates")
    assert all(isinstance(u, dict) and "keelgraph" not in u for u in updates)
    nodes = [next(iter(u)) for u in updates]
    assert nodes == [
        "validate_input", "reason", "act", "reason", "__interrupt__",
        "approve", "act", "reason", "check_output", "reason", "check_output",
    ]  # fmt: skip
    list(streamed.stream(request, CFG, stream_mode=["custom", "updates", "messages"]))
    list(streamed.stream(resume, CFG, stream_mode=["custom", "updates", "messages"]))
    assert len(list(saver_streamed.list(CFG))) == len(list(saver_plain.list(CFG)))
    assert streamed.get_state(CFG).values["output"] == plain.get_state(CFG).values["output"]


def test_a_rejected_request_streams_input_and_final() -> None:
    graph = _graph([])
    found = list(events(graph.stream({"request": {"order_id": "seven"}}, CFG, stream_mode="custom")))
    assert phases(found) == ["input", "final"]
    checked, final = found
    assert checked["keelgraph"] == "phase" and checked["phase"] == "input"
    assert not checked["valid"] and checked["problems"][0]["field"] == "order_id"
    assert final["keelgraph"] == "phase" and final["phase"] == "final"
    assert final["status"] == "rejected" and final["error"] is not None
    assert final["error"]["type"] == "InputRejected"


def test_a_failed_turn_never_streams_an_output() -> None:
    graph = _graph([answer(reply="no"), answer(reply="nope"), answer(reply="never")])
    found: list[Any] = list(events(graph.stream({"request": {"order_id": 7}}, CFG, stream_mode="custom")))
    assert "output" not in phases(found)
    assert phases(found).count("repairing") == 2
    assert found[-1]["keelgraph"] == "phase" and found[-1]["phase"] == "final"
    assert found[-1]["status"] == "failed" and found[-1]["error"]["type"] == "RepairExhausted"
    assert "attempts" not in found[-1]["error"]  # the drafts stay in the thread


def test_a_person_rejecting_a_call_is_a_rejected_tool_call() -> None:
    graph = _graph([call("lookup"), call("refund", amount=30), answer(reply="not refunded")])
    list(graph.stream({"request": {"order_id": 7}}, CFG, stream_mode="custom"))
    resume = Command(resume={"action": "reject", "reason": "too much"})
    found: list[Any] = list(events(graph.stream(resume, CFG, stream_mode="custom")))
    [decided] = [e for e in found if e.get("phase") == "decided"]
    assert decided["decisions"][0]["action"] == "reject"
    tools = [e for e in found if e.get("phase") == "tool_finished"]
    assert [(e["name"], e["outcome"]) for e in tools] == [("refund", "rejected")]
    assert "tool_started" not in phases(found)


def test_emitting_never_fails_a_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    emit({"keelgraph": "output", "output": {}})  # outside a run: nothing happens

    def broken() -> Any:
        def write(_: Any) -> None:
            raise OSError("the client went away")

        return write

    monkeypatch.setattr(events_module, "get_stream_writer", broken)
    graph = _graph()
    list(graph.stream({"request": {"order_id": 7}}, CFG, stream_mode="custom"))
    result = graph.invoke(Command(resume={"action": "approve"}), CFG)
    assert result["status"] == "ok" and result["output"] == {"reply": GOOD}


@pytest.mark.parametrize(
    "chunk",
    [
        {"keelgraph": "output", "output": {}},
        ("custom", {"keelgraph": "output", "output": {}}),
        ((), "custom", {"keelgraph": "output", "output": {}}),
        (("sub:1",), {"keelgraph": "output", "output": {}}),
        {"type": "custom", "ns": (), "data": {"keelgraph": "output", "output": {}}},
        StreamPart("custom", {"keelgraph": "output", "output": {}}),
        StreamPart("custom|sub:1", {"keelgraph": "output", "output": {}}),
    ],
    ids=["custom", "modes", "subgraphs-modes", "subgraphs", "v2", "sdk", "sdk-subgraph"],
)
def test_as_event_reads_every_stream_shape(chunk: Any) -> None:
    assert as_event(chunk) == {"keelgraph": "output", "output": {}}


@pytest.mark.parametrize(
    "chunk",
    [
        ("updates", {"keelgraph": {"status": "ok"}}),
        ("messages", (AIMessage("x"), {})),
        {"reason": {"status": "ok"}},
        StreamPart("updates", {"keelgraph": "output"}),
        {"keelgraph": "something else"},
    ],
)
def test_as_event_skips_everything_else(chunk: Any) -> None:
    assert as_event(chunk) is None


def test_doctests() -> None:
    import doctest

    result = doctest.testmod(events_module)
    assert result.attempted > 0 and result.failed == 0
