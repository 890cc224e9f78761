"""Client idempotency: a request re-sent with its `request_id` returns the first result instead of
running again (the model is not asked, no tool runs, the thread does not grow), in process and
through the config; the same id with another request, or a malformed id, is rejected, typed.
(Across a SIGKILL: `tests/test_effects.py::test_a_request_re_sent_with_its_id_after_sigkill_has_no_second_effect`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.tools import StructuredTool
from pydantic import BaseModel

from keelgraph import Contract, build_graph, sqlite_checkpointer
from keelgraph.graphs.validate import ANSWERED_KEPT
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools import with_policy


class Ask(BaseModel):
    question: str


class Reply(BaseModel):
    text: str


CONTRACT = Contract(input=Ask, output=Reply, instructions="Answer.")


def _graph(script: list[Any], tmp: Path, tools: list[Any] | None = None) -> Any:
    model = ScriptedChatModel(script)
    graph = build_graph(
        CONTRACT,
        tools or [],
        model=model,
        checkpointer=sqlite_checkpointer(tmp / "t.db"),
        strategy="json_object",
    )
    return graph, model


def _config(thread: str = "t1", **extra: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread, **extra}}


def test_a_re_sent_request_returns_the_first_result_without_running(tmp_path: Path) -> None:
    graph, model = _graph([answer(text="one")], tmp_path)  # a second model call would find no script
    first = graph.invoke({"request": {"question": "q?"}, "request_id": "r-1"}, _config())
    again = graph.invoke({"request": {"question": "q?"}, "request_id": "r-1"}, _config())
    assert first["status"] == again["status"] == "ok"
    assert again["output"] == first["output"] == {"text": "one"}
    assert again["replayed"] is True and first["replayed"] is False
    assert len(model.calls) == 1
    state = graph.get_state(_config()).values
    assert state["turn"] == 1 and sum(m.type == "human" for m in state["messages"]) == 1


def test_an_older_request_id_is_answered_from_the_record(tmp_path: Path) -> None:
    graph, model = _graph([answer(text="one"), answer(text="two")], tmp_path)
    graph.invoke({"request": {"question": "a?"}, "request_id": "r-1"}, _config())
    graph.invoke({"request": {"question": "b?"}, "request_id": "r-2"}, _config())
    again = graph.invoke({"request": {"question": "a?"}, "request_id": "r-1"}, _config())
    assert again["output"] == {"text": "one"} and again["replayed"] is True
    assert len(model.calls) == 2
    # The next new request is a new turn, and the replay did not touch the record of r-2.
    graph2, _ = _graph([answer(text="three")], tmp_path)
    third = graph2.invoke({"request": {"question": "c?"}, "request_id": "r-3"}, _config())
    assert third["output"] == {"text": "three"} and third["replayed"] is False
    assert graph2.invoke({"request": {"question": "b?"}, "request_id": "r-2"}, _config())["output"] == {
        "text": "two"
    }


def test_requests_without_an_id_run_every_time(tmp_path: Path) -> None:
    graph, model = _graph([answer(text="one"), answer(text="two")], tmp_path)
    graph.invoke({"request": {"question": "q?"}, "request_id": "r-1"}, _config())
    second = graph.invoke({"request": {"question": "q?"}}, _config())  # the id is not carried over
    assert second["output"] == {"text": "two"} and second["replayed"] is False
    assert len(model.calls) == 2


def test_the_id_may_come_in_the_config(tmp_path: Path) -> None:
    graph, model = _graph([answer(text="one")], tmp_path)
    config = _config(keelgraph_request_id="cfg-1")
    graph.invoke({"request": {"question": "q?"}}, config)
    again = graph.invoke({"request": {"question": "q?"}}, config)
    assert again["replayed"] is True and again["output"] == {"text": "one"}
    assert len(model.calls) == 1


def test_the_same_id_with_another_request_is_rejected_and_the_first_kept(tmp_path: Path) -> None:
    graph, model = _graph([answer(text="one")], tmp_path)
    graph.invoke({"request": {"question": "q?"}, "request_id": "r-1"}, _config())
    other = graph.invoke({"request": {"question": "something else"}, "request_id": "r-1"}, _config())
    assert other["status"] == "rejected"
    assert [p["field"] for p in other["error"]["problems"]] == ["request_id"]
    assert "different request" in other["error"]["problems"][0]["reason"]
    same = graph.invoke({"request": {"question": "q?"}, "request_id": "r-1"}, _config())
    assert same["output"] == {"text": "one"}
    assert len(model.calls) == 1


@pytest.mark.parametrize("bad", [42, "", "x" * 201, "tab\there", ["r-1"]])
def test_a_malformed_request_id_is_rejected_typed(tmp_path: Path, bad: Any) -> None:
    graph, model = _graph([answer(text="one")], tmp_path)
    out = graph.invoke({"request": {"question": "q?"}, "request_id": bad}, _config())
    assert out["status"] == "rejected"
    assert [p["field"] for p in out["error"]["problems"]] == ["request_id"]
    assert "same one only when re-sending" in out["error"]["problems"][0]["fix"]
    assert not model.calls


def test_a_re_sent_request_runs_no_tool_twice(tmp_path: Path) -> None:
    placed: list[str] = []

    def place(item: str) -> str:
        placed.append(item)
        return f"order for {item} placed"

    tool = with_policy(
        StructuredTool.from_function(place, name="place_order", description="Place an order"),
        side_effect="write",
    )
    graph, model = _graph([call("place_order", item="tea"), answer(text="placed")], tmp_path, [tool])
    for _ in range(3):
        out = graph.invoke({"request": {"question": "tea please"}, "request_id": "buy-1"}, _config())
        assert out["status"] == "ok" and out["output"] == {"text": "placed"}
    assert placed == ["tea"] and len(model.calls) == 2


def test_the_record_is_bounded(tmp_path: Path) -> None:
    n = ANSWERED_KEPT + 3
    graph, model = _graph([answer(text=f"a{i}") for i in range(n + 1)], tmp_path)
    for i in range(n):
        graph.invoke({"request": {"question": f"q{i}?"}, "request_id": f"r{i}"}, _config())
    state = graph.get_state(_config()).values
    assert len(state["answered_requests"]) <= ANSWERED_KEPT
    oldest = graph.invoke({"request": {"question": "q0?"}, "request_id": "r0"}, _config())
    assert oldest["replayed"] is False  # forgotten: it ran again
    assert len(model.calls) == n + 1
