"""The main job's contract and tools against its real SQLite database."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from langgraph.types import Command

from keelgraph import sqlite_checkpointer
from keelgraph.apps.support.desk import make_graph, reports_problem, seed_database
from keelgraph.testing import ScriptedChatModel, answer, call


def graph(tmp: Path, script: list[Any]) -> tuple[Any, ScriptedChatModel]:
    model = ScriptedChatModel(script)
    return make_graph(
        tmp / "shop.db", model=model, checkpointer=sqlite_checkpointer(tmp / "threads.db")
    ), model


CFG: Any = {"configurable": {"thread_id": "s", "keelgraph_user": "ada"}}  # ada is customer 1


def test_orders_are_preloaded_and_facts_are_cross_checked(tmp_path: Path) -> None:
    wrong = answer(reply="Order 1002 was delivered.", order_ids=[1002])
    right = answer(reply="Order 1002 has shipped.", order_ids=[1002])
    g, model = graph(tmp_path, [wrong, right])
    result = g.invoke({"request": {"message": "Where is order 1002?"}}, CFG)
    assert result["status"] == "ok" and result["output"]["order_ids"] == [1002]
    first_prompt = "\n".join(str(m.content) for m in model.calls[0]["messages"])
    assert (
        "order 1002: Mechanical keyboard | status shipped" in first_prompt
    )  # preloaded, no model call needed
    assert "order 1002 is shipped, not delivered" in model.calls[1]["messages"][-1].content


def test_foreign_and_unknown_orders_are_rejected(tmp_path: Path) -> None:
    script = [
        answer(reply="Your orders.", order_ids=[1004, 9999]),
        answer(reply="Your orders.", order_ids=[1001]),
    ]
    g, model = graph(tmp_path, script)
    result = g.invoke({"request": {"message": "my orders?"}}, CFG)
    assert result["status"] == "ok"
    correction = model.calls[1]["messages"][-1].content
    assert (
        "order 1004 belongs to another customer" in correction and "order 9999 does not exist" in correction
    )


def test_ticket_tool_is_offered_only_for_reported_problems(tmp_path: Path) -> None:
    g, model = graph(tmp_path, [answer(reply="Hello!")])
    g.invoke({"request": {"message": "hello there"}}, CFG)
    assert "open_ticket" not in str(model.calls[0]["kwargs"])
    assert reports_problem({"message": "My keyboard arrived damaged"})
    assert not reports_problem({"message": "Where is my keyboard?"})


def test_ticket_is_opened_once_for_the_right_customer(tmp_path: Path) -> None:
    script = [
        call("open_ticket", customer_id=2, order_id=1002, kind="damaged", note="arrived damaged"),
        answer(reply="I opened a ticket for order 1002.", order_ids=[1002]),
    ]
    g, _ = graph(tmp_path, script)
    paused = g.invoke({"request": {"message": "Order 1002 arrived damaged"}}, CFG)
    [ask] = paused["__interrupt__"]  # a ticket waits for a person
    assert ask.value["calls"][0]["args"] == {
        "customer_id": 1,
        "order_id": 1002,
        "kind": "damaged",
        "note": "arrived damaged",
    }
    result = g.invoke(Command(resume="approve"), CFG)
    # customer_id comes from the signed-in user, not from the model; action and ticket id from the tool
    assert result["output"]["action"] == "ticket_opened" and result["output"]["ticket_id"] == 1
    g2, _ = graph(tmp_path, script)
    again = g2.invoke(
        {"request": {"message": "Order 1002 arrived damaged"}},
        {"configurable": {"thread_id": "x", "keelgraph_user": "ada"}},
    )
    # Another thread asks for the same ticket: the ledger replays it, so no one is asked again.
    assert "__interrupt__" not in again and again["output"]["ticket_id"] == 1
    rows = (
        sqlite3.connect(tmp_path / "shop.db").execute("SELECT order_id, customer_id FROM tickets").fetchall()
    )
    assert rows == [(1002, 1)]


def test_claiming_a_ticket_that_was_not_opened_is_caught(tmp_path: Path) -> None:
    script = [
        answer(reply="I have opened a ticket for you."),
        answer(reply="Please tell me which order."),
    ]
    g, model = graph(tmp_path, script)
    result = g.invoke({"request": {"message": "It is broken"}}, CFG)
    assert result["status"] == "ok"
    assert "none was" in model.calls[1]["messages"][-1].content


def test_seed_is_idempotent(tmp_path: Path) -> None:
    db = seed_database(tmp_path / "shop.db")
    seed_database(db)
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM orders").fetchone() == (8,)


SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from keelgraph import sqlite_checkpointer
    from keelgraph.apps.support.desk import make_graph
    from keelgraph.testing import ScriptedChatModel, answer
    tmp = Path(sys.argv[1])
    model = ScriptedChatModel([answer(reply="Turn " + sys.argv[2])])
    graph = make_graph(tmp / "shop.db", model=model, checkpointer=sqlite_checkpointer(tmp / "threads.db"))
    graph.invoke({"request": {"message": "message " + sys.argv[2]}},
                 {"configurable": {"thread_id": "across", "keelgraph_user": "ada"}})
    print(sum("Turn 1" in str(m.content) for m in model.calls[0]["messages"]))
    """
)


@pytest.mark.parametrize("_", [None])
def test_thread_continues_in_a_new_process(tmp_path: Path, _: None) -> None:
    outputs = [
        subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path), str(turn)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for turn in (1, 2)
    ]
    assert outputs == ["0", "1"]  # the second process's model saw the first process's answer


def test_ticket_for_an_order_the_conversation_is_not_about_is_refused(tmp_path: Path) -> None:
    script = [
        answer(reply="Order 1002 has shipped.", order_ids=[1002]),
        call("open_ticket", customer_id=1, order_id=1001, kind="damaged", note="damaged"),
        call("open_ticket", customer_id=1, order_id=1002, kind="damaged", note="damaged"),
        answer(reply="Ticket opened for order 1002.", order_ids=[1002]),
    ]
    g, model = graph(tmp_path, script)
    g.invoke({"request": {"message": "Where is order 1002?"}}, CFG)
    paused = g.invoke({"request": {"message": "It arrived damaged, open a ticket"}}, CFG)
    [ask] = paused["__interrupt__"]
    assert [c["args"]["order_id"] for c in ask.value["calls"]] == [1002]  # 1001 is refused, not asked
    result = g.invoke(Command(resume="approve"), CFG)
    assert result["output"]["ticket_id"] == 1 and result["output"]["order_ids"] == [1002]
    refused = model.calls[2]["messages"][-1].content
    assert "NOT RUN: order_id=1001 is not allowed here; use one of [1002]" in refused
    # The model is shown the ticket's arguments without customer_id: it is bound to the signed-in user.
    assert "open_ticket(order_id: 1002, kind:" in model.calls[1]["messages"][0].content
    rows = sqlite3.connect(tmp_path / "shop.db").execute("SELECT order_id FROM tickets").fetchall()
    assert rows == [(1002,)]


def test_a_delivery_date_is_caught_whether_the_order_is_named_by_id_or_by_item() -> None:
    """The eval's "When does my monitor arrive?" was answered "The monitor arrives on 2026-11-20."
    (the date it was placed): the shop has no delivery dates, so the check refuses it."""
    from keelgraph import CheckContext
    from keelgraph.apps.support.desk import (
        NO_DELIVERY_DATE,
        NO_DELIVERY_DATES,
        SupportReply,
        SupportRequest,
        claims_are_true,
    )

    orders = [
        {"order_id": 1006, "status": "shipped", "total": "349.00 EUR", "items": "27-inch monitor"},
        {"order_id": 1007, "status": "delivered", "total": "19.99 EUR", "items": "Mouse pad"},
    ]
    ctx = CheckContext(
        input=SupportRequest(message="When does my monitor arrive?"),
        tool_results=[{"name": "list_orders", "args": {}, "output": {"orders": orders}}],
    )

    def problems(text: str) -> list[str]:
        return claims_are_true(SupportReply(reply=text, order_ids=[1006]), ctx)

    assert problems("The monitor arrives on 2026-11-20.") == [NO_DELIVERY_DATE.format(**orders[0])]
    assert problems("Both will arrive on 2026-11-20.") == [NO_DELIVERY_DATES]
    assert problems("Order 1006 (27-inch monitor) is shipped; it was placed on 2026-11-20.") == []
