"""Human approval of tool calls through LangGraph `interrupt()`: approve, edit, reject."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import StructuredTool
from langgraph.types import Command
from pydantic import BaseModel, Field

from keelgraph import Contract, build_graph, sqlite_checkpointer
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools import MemoryLedger, with_policy


class Ask(BaseModel):
    order_id: int


class Done(BaseModel):
    reply: str


class RefundArgs(BaseModel):
    order_id: int
    amount: float = Field(gt=0, le=500)


REFUNDS: list[tuple[int, float]] = []


def refund(order_id: int, amount: float) -> str:
    REFUNDS.append((order_id, amount))
    return f"refunded {amount:.2f} on order {order_id}"


def lookup(order_id: int) -> str:
    return f"order {order_id}: 2 mugs, 120.00 EUR"


def _tools(approval: Any = "always") -> list[Any]:
    return [
        with_policy(
            StructuredTool.from_function(refund, name="refund", description="Refund", args_schema=RefundArgs),
            side_effect="write",
            approval=approval,
            from_input=("order_id",),
        ),
        with_policy(
            StructuredTool.from_function(lookup, name="lookup", description="Look up an order"),
            approval="always",
        ),
    ]


CONTRACT = Contract(input=Ask, output=Done, instructions="Handle refunds.", repair_budget=2)


@pytest.fixture(autouse=True)
def _clear() -> None:
    REFUNDS.clear()


def _graph(tmp: Path, script: list[Any], approval: Any = "always") -> tuple[Any, ScriptedChatModel]:
    model = ScriptedChatModel(script)
    graph = build_graph(
        CONTRACT,
        _tools(approval),
        model=model,
        checkpointer=sqlite_checkpointer(tmp / "threads.db"),
        effects=MemoryLedger(),
        strategy="json_object",
    )
    return graph, model


CFG: Any = {"configurable": {"thread_id": "t"}}


def _pause(result: dict[str, Any]) -> dict[str, Any]:
    [pause] = result["__interrupt__"]
    value: dict[str, Any] = pause.value
    return value


def test_a_call_waits_for_approval_then_runs(tmp_path: Path) -> None:
    graph, _ = _graph(tmp_path, [call("refund", amount=30), answer(reply="refunded")])
    paused = graph.invoke({"request": {"order_id": 7}}, CFG)
    ask = _pause(paused)
    assert ask["type"] == "approval" and ask["problem"] is None
    [asked] = ask["calls"]
    assert asked["name"] == "refund" and asked["args"] == {"amount": 30, "order_id": 7}
    assert REFUNDS == []  # nothing ran while waiting
    assert graph.get_state(CFG).next == ("approve",)
    result = graph.invoke(Command(resume={"action": "approve"}), CFG)
    assert result["status"] == "ok" and REFUNDS == [(7, 30.0)]


def test_an_edit_replaces_the_arguments_in_the_thread(tmp_path: Path) -> None:
    graph, _ = _graph(tmp_path, [call("refund", amount=300), answer(reply="refunded 120")])
    ask = _pause(graph.invoke({"request": {"order_id": 7}}, CFG))
    call_id = ask["calls"][0]["id"]
    result = graph.invoke(Command(resume={call_id: {"action": "edit", "args": {"amount": 120}}}), CFG)
    assert result["status"] == "ok" and REFUNDS == [(7, 120.0)]
    steps = [m for m in graph.get_state(CFG).values["messages"] if isinstance(m, AIMessage) and m.tool_calls]
    assert steps[-1].tool_calls[0]["args"] == {"amount": 120, "order_id": 7}  # the thread shows what ran


def test_an_edit_is_checked_again_before_it_runs(tmp_path: Path) -> None:
    graph, _ = _graph(tmp_path, [call("refund", amount=30), answer(reply="could not refund")])
    _pause(graph.invoke({"request": {"order_id": 7}}, CFG))
    result = graph.invoke(Command(resume={"action": "edit", "args": {"amount": 9000}}), CFG)
    assert REFUNDS == []  # the edited amount breaks the schema: refused, not run
    [reply] = [m for m in graph.get_state(CFG).values["messages"] if isinstance(m, ToolMessage)]
    assert "args.amount: Input should be less than or equal to 500" in str(reply.content)
    assert result["status"] == "ok"


def test_an_edit_cannot_switch_tools_and_a_bad_answer_is_asked_again(tmp_path: Path) -> None:
    graph, _ = _graph(tmp_path, [call("refund", amount=30), answer(reply="refunded")])
    _pause(graph.invoke({"request": {"order_id": 7}}, CFG))
    again = _pause(graph.invoke(Command(resume={"action": "edit", "name": "lookup", "args": {}}), CFG))
    assert (
        "an edit cannot switch call" in again["problem"] and "from refund to another tool" in again["problem"]
    )
    again = _pause(graph.invoke(Command(resume={"action": "maybe"}), CFG))
    assert "no valid decision for call" in again["problem"]
    assert REFUNDS == []
    result = graph.invoke(Command(resume="approve"), CFG)
    assert result["status"] == "ok" and REFUNDS == [(7, 30.0)]


def test_a_rejected_call_is_remembered_for_the_thread(tmp_path: Path) -> None:
    script = [
        call("refund", amount=30),
        answer(reply="a person declined the refund"),
        call("refund", amount=30),  # next turn: the model tries the same refund again
        answer(reply="declined"),
    ]
    graph, model = _graph(tmp_path, script)
    _pause(graph.invoke({"request": {"order_id": 7}}, CFG))
    result = graph.invoke(Command(resume={"action": "reject", "reason": "refunds need a receipt"}), CFG)
    assert result["status"] == "ok" and REFUNDS == []
    values = graph.get_state(CFG).values
    assert values["rejected_calls"] == [
        {"name": "refund", "args": {"amount": 30, "order_id": 7}, "reason": "refunds need a receipt"}
    ]
    assert "REJECTED by a person: refunds need a receipt" in str(model.calls[1]["messages"][-1].content)
    second = graph.invoke({"request": {"order_id": 7}}, CFG)  # no interrupt this time
    assert "__interrupt__" not in second and second["status"] == "ok" and REFUNDS == []
    [attempt] = graph.get_state(CFG).values["attempts"]
    assert attempt["kind"] == "rejected_call"


def test_approval_when_a_predicate_holds(tmp_path: Path) -> None:
    def large(args: Any, ctx: Any) -> bool:
        return float(args["amount"]) > 100

    graph, _ = _graph(tmp_path, [call("refund", amount=50), answer(reply="refunded")], approval=large)
    result = graph.invoke({"request": {"order_id": 7}}, CFG)
    assert "__interrupt__" not in result and REFUNDS == [(7, 50.0)]
    graph, _ = _graph(tmp_path, [call("refund", amount=250), answer(reply="refunded")], approval=large)
    result = graph.invoke({"request": {"order_id": 8}}, {"configurable": {"thread_id": "t2"}})
    assert _pause(result)["calls"][0]["args"]["amount"] == 250 and REFUNDS == [(7, 50.0)]


RESUME = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    import test_approval as t
    from langgraph.types import Command
    graph, _ = t._graph(Path(sys.argv[1]), [t.answer(reply="refunded")])
    result = graph.invoke(Command(resume={"action": "approve"}), t.CFG)
    print(json.dumps({"status": result["status"], "refunds": t.REFUNDS}))
    """
)


def test_resume_in_another_process(tmp_path: Path) -> None:
    graph, _ = _graph(tmp_path, [call("refund", amount=30)])
    _pause(graph.invoke({"request": {"order_id": 7}}, CFG))
    (tmp_path / "resume.py").write_text(RESUME)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "resume.py"), str(tmp_path), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "KEELGRAPH_DATA_DIR": str(tmp_path / "data")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"status": "ok", "refunds": [[7, 30.0]]}
    assert REFUNDS == []  # it ran in the other process, once


def test_act_itself_refuses_a_call_without_a_matching_approval() -> None:
    """Defence in depth: whatever routes a step to `act`, unapproved or altered calls do not run."""
    from keelgraph.graphs.act import act
    from keelgraph.graphs.spec import AgentSpec

    tools = {t.name: t for t in _tools()}
    spec = AgentSpec(contract=CONTRACT, tools=tools, model=ScriptedChatModel([]), strategy="json_object")
    step = AIMessage(
        "", tool_calls=[{"name": "refund", "args": {"amount": 30}, "id": "c1", "type": "tool_call"}]
    )
    state: Any = {"messages": [step], "input": {"order_id": 7}, "approvals": {}}
    [reply] = act(state, spec=spec)["messages"]
    assert "it needs a person's approval, and none was given" in str(reply.content)
    approved = {"c1": {"action": "approve", "name": "refund", "args": {"amount": 10, "order_id": 7}}}
    [reply] = act({**state, "approvals": approved}, spec=spec)["messages"]
    assert "the arguments differ from the ones a person approved" in str(reply.content)
    assert REFUNDS == []
    approved["c1"]["args"]["amount"] = 30
    [reply] = act({**state, "approvals": approved}, spec=spec)["messages"]
    assert reply.status == "success" and REFUNDS == [(7, 30.0)]
