"""Exactly-once side effects: the effect ledger, in one process and across a SIGKILL and a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import ToolMessage
from langchain_core.tools import StructuredTool
from pydantic import BaseModel

from keelgraph import Contract, build_graph, sqlite_checkpointer
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools import MemoryLedger, SqliteLedger, effect_key, with_policy
from keelgraph.tools.ledger import default_key


class Order(BaseModel):
    item: str


class Receipt(BaseModel):
    reply: str


CONTRACT = Contract(input=Order, output=Receipt, instructions="Place the order.", repair_budget=2)
PLACED: list[tuple[str, str | None]] = []


def _place(item: str) -> str:
    PLACED.append((item, effect_key()))
    return f"order for {item} placed"


def _tool(fn: Any = _place, **policy: Any) -> StructuredTool:
    tool = StructuredTool.from_function(fn, name="place_order", description="Place an order")
    return with_policy(tool, side_effect="write", **policy)  # type: ignore[return-value]


def _run(
    tmp: Path, ledger: Any, script: list[Any], *, tool: Any = None, thread: str = "t", item: str = "tea"
) -> tuple[dict[str, Any], list[ToolMessage]]:
    graph = build_graph(
        CONTRACT,
        [tool or _tool()],
        model=ScriptedChatModel(script),
        checkpointer=sqlite_checkpointer(tmp / "threads.db"),
        effects=ledger,
        strategy="json_object",
    )
    config: Any = {"configurable": {"thread_id": thread}}
    result = graph.invoke({"request": {"item": item}}, config)
    messages = graph.get_state(config).values["messages"]
    return result, [m for m in messages if isinstance(m, ToolMessage)]


@pytest.fixture(autouse=True)
def _clear() -> None:
    PLACED.clear()


def test_a_write_call_is_recorded_with_its_key(tmp_path: Path) -> None:
    ledger = MemoryLedger()
    result, _ = _run(tmp_path, ledger, [call("place_order", item="tea"), answer(reply="done")])
    assert result["status"] == "ok"
    [(item, key)] = PLACED
    assert item == "tea" and key is not None and key.startswith("place_order:")
    found = ledger.lookup(key)
    assert found is not None and found.status == "done" and found.output == "order for tea placed"
    assert found.thread_id == "t"


def test_a_done_call_is_replayed_not_repeated(tmp_path: Path) -> None:
    """Same key recorded as done (as after a crash before the checkpoint): the tool is not called."""
    ledger = MemoryLedger()
    key = "fixed"
    ledger.begin(key, "place_order", {"item": "tea"}, "t")
    ledger.finish(key, "order for tea placed")
    tool = _tool(idempotency_key=lambda args, ctx: key)
    result, [reply] = _run(tmp_path, ledger, [call("place_order", item="tea"), answer(reply="ok")], tool=tool)
    assert result["status"] == "ok" and PLACED == []
    assert "order for tea placed" in str(reply.content)
    assert "done earlier; it was not done again" in str(reply.content)
    assert result["stats"]["tool_calls"] == 1


def test_a_cut_off_call_is_not_repeated_unless_the_tool_is_idempotent(tmp_path: Path) -> None:
    ledger = MemoryLedger()
    ledger.begin("k", "place_order", {"item": "tea"}, "t")  # started, never finished
    script = [call("place_order", item="tea"), answer(reply="outcome unknown")]
    result, [reply] = _run(tmp_path, ledger, script, tool=_tool(idempotency_key=lambda a, c: "k"))
    assert result["status"] == "ok" and PLACED == []
    assert reply.status == "error" and "whether it took effect is unknown" in str(reply.content)

    idem = _tool(idempotency_key=lambda a, c: "k", idempotent=True)
    result, [reply] = _run(tmp_path, ledger, script, tool=idem, thread="t2")
    assert PLACED == [("tea", "k")]  # called again, with the same key for the system to dedupe
    assert reply.status == "success"
    found = ledger.lookup("k")
    assert found is not None and found.status == "done"


def test_a_failed_call_is_forgotten_and_a_hung_one_stays_open(tmp_path: Path) -> None:
    ledger = MemoryLedger()

    def broken(item: str) -> str:
        raise RuntimeError("warehouse is down")

    tool = _tool(broken, idempotency_key=lambda a, c: "k-fail")
    _run(tmp_path, ledger, [call("place_order", item="tea"), answer(reply="failed")], tool=tool)
    assert ledger.lookup("k-fail") is None  # raised: nothing done, a later call may try again

    def hung(item: str) -> str:
        time.sleep(2)
        return "late"

    tool = _tool(hung, idempotency_key=lambda a, c: "k-hung", timeout_s=0.2)
    _run(tmp_path, ledger, [call("place_order", item="tea"), answer(reply="slow")], tool=tool, thread="t2")
    found = ledger.lookup("k-hung")
    assert found is not None and found.status == "started"  # it may still take effect


def test_default_keys_separate_turns_and_threads() -> None:
    a = default_key("t1", "turn-1", "place_order", {"item": "tea"})
    assert a == default_key("t1", "turn-1", "place_order", {"item": "tea"})
    assert a != default_key("t1", "turn-2", "place_order", {"item": "tea"})
    assert a != default_key("t2", "turn-1", "place_order", {"item": "tea"})
    assert a != default_key("t1", "turn-1", "place_order", {"item": "cake"})


def test_the_same_order_in_a_new_turn_is_a_new_effect(tmp_path: Path) -> None:
    ledger = MemoryLedger()
    script = [call("place_order", item="tea"), answer(reply="done")]
    _run(tmp_path, ledger, script)
    _run(tmp_path, ledger, script)  # same thread, second turn: the customer wants another
    assert [item for item, _ in PLACED] == ["tea", "tea"]
    assert PLACED[0][1] != PLACED[1][1]


def test_sqlite_ledger_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "effects.db"
    first = SqliteLedger(path)
    first.begin("k", "place_order", {"item": "tea"}, "t")
    first.finish("k", {"id": 7, "note": "ok"})
    first.close()
    again = SqliteLedger(path).lookup("k")
    assert again is not None and (again.status, again.output, again.thread_id) == (
        "done",
        {"id": 7, "note": "ok"},
        "t",
    )


# -- crash and resume in new processes ---------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sqlite3, sys
    from pathlib import Path
    from langchain_core.tools import StructuredTool
    from pydantic import BaseModel
    from keelgraph import Contract, build_graph, sqlite_checkpointer
    from keelgraph.testing import ScriptedChatModel, answer, call
    from keelgraph.tools import SqliteLedger, effect_key, with_policy

    tmp, phase, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    rid = sys.argv[4] if len(sys.argv) > 4 else None  # the client's request id, "-" for none

    class Order(BaseModel):
        item: str

    class Receipt(BaseModel):
        reply: str

    def place(item: str) -> str:
        shop = sqlite3.connect(tmp / "shop.db", isolation_level=None)
        shop.execute("CREATE TABLE IF NOT EXISTS orders (item TEXT, key TEXT UNIQUE)")
        if mode == "idempotent":  # the shop deduplicates by the key it is given
            shop.execute("INSERT OR IGNORE INTO orders VALUES (?, ?)", (item, effect_key()))
        else:
            shop.execute("INSERT INTO orders (item) VALUES (?)", (item,))
        with (tmp / "calls.log").open("a") as log:
            log.write(f"{effect_key()}\\n")
        if phase == "crash" and mode != "after-record":
            os.kill(os.getpid(), signal.SIGKILL)  # the effect happened; nothing else did
        return f"order for {item} placed"

    class KillAfterRecord(SqliteLedger):
        def finish(self, key, output):
            super().finish(key, output)
            if phase == "crash":
                os.kill(os.getpid(), signal.SIGKILL)  # recorded, but the checkpoint never written

    ledger = None if mode == "no-ledger" else KillAfterRecord(tmp / "effects.db")
    tool = with_policy(
        StructuredTool.from_function(place, name="place_order", description="Place an order"),
        side_effect="write",
        idempotent=mode == "idempotent",
    )
    script = (
        [call("place_order", item="tea")]
        if phase == "crash"
        else [call("place_order", item="tea"), answer(reply="done")]
        if phase == "resend" and rid == "-"
        else [answer(reply="done")]
    )
    graph = build_graph(
        Contract(input=Order, output=Receipt, instructions="Place the order."),
        [tool],
        model=ScriptedChatModel(script),
        checkpointer=sqlite_checkpointer(tmp / "threads.db"),
        effects=ledger,
        strategy="json_object",
    )
    config = {"configurable": {"thread_id": "crash"}}
    sent = {"request": {"item": "tea"}, **({"request_id": rid} if rid not in (None, "-") else {})}
    result = graph.invoke(sent if phase in ("crash", "resend") else None, config)
    tools = [m.content for m in graph.get_state(config).values["messages"] if m.type == "tool"]
    print(json.dumps({"status": result["status"], "tools": tools}))
    """
)


def _phase(tmp: Path, phase: str, mode: str, *rid: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(tmp / "crash.py"), str(tmp), phase, mode, *rid],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "KEELGRAPH_DATA_DIR": str(tmp / "data")},
    )


@pytest.mark.parametrize(
    ("mode", "orders", "calls", "says"),
    [
        ("no-ledger", 2, 2, "order for tea placed"),  # the control: plain replay repeats the effect
        ("after-record", 1, 1, "done earlier; it was not done again"),
        ("plain", 1, 1, "whether it took effect is unknown"),
        ("idempotent", 1, 2, "order for tea placed"),
    ],
)
def test_sigkill_then_resume_in_a_new_process(
    tmp_path: Path, mode: str, orders: int, calls: int, says: str
) -> None:
    (tmp_path / "crash.py").write_text(SCRIPT)
    crashed = _phase(tmp_path, "crash", mode)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    resumed = _phase(tmp_path, "resume", mode)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    out = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert out["status"] == "ok"
    assert says in out["tools"][-1]
    import sqlite3

    shop = sqlite3.connect(tmp_path / "shop.db")
    assert shop.execute("SELECT count(*) FROM orders").fetchone()[0] == orders
    keys = (tmp_path / "calls.log").read_text().split()
    assert len(keys) == calls
    if mode == "idempotent":
        assert keys[0] == keys[1]  # the repeat carried the same key, so the shop deduplicated it


def test_old_completed_records_are_pruned_and_unknown_ones_kept(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "effects.db")
    for key in ("old", "new", "open"):
        ledger.begin(key, "place_order", {"item": key}, "t")
    ledger.finish("old", "x")
    ledger.finish("new", "y")
    later = time.time() + 3600
    assert ledger.prune(older_than_s=1800, now=later) == 2  # both done records are an hour old
    assert ledger.lookup("old") is None and ledger.lookup("new") is None
    found = ledger.lookup("open")
    assert found is not None and found.status == "started"  # unknown outcome: kept for a person


@pytest.mark.parametrize(
    ("rid", "orders", "says"),
    [
        ("-", 2, "order for tea placed"),  # the control: re-sent without an id, the turn runs again
        ("req-7f3a", 1, "whether it took effect is unknown"),
    ],
)
def test_a_request_re_sent_with_its_id_after_sigkill_has_no_second_effect(
    tmp_path: Path, rid: str, orders: int, says: str
) -> None:
    """A client that lost its connection to a crashed process sends the same request again, with
    the same request id: the cut-off turn goes on where it stopped (same turn, same effect key), so
    the write that may have happened is not done twice; a person is told it is unknown."""
    (tmp_path / "crash.py").write_text(SCRIPT)
    crashed = _phase(tmp_path, "crash", "plain", rid)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    again = _phase(tmp_path, "resend", "plain", rid)
    assert again.returncode == 0, again.stderr[-2000:]
    out = json.loads(again.stdout.strip().splitlines()[-1])
    assert out["status"] == "ok"
    assert says in out["tools"][-1]
    import sqlite3

    shop = sqlite3.connect(tmp_path / "shop.db")
    assert shop.execute("SELECT count(*) FROM orders").fetchone()[0] == orders
