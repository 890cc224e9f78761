"""One writer per thread: a second run on a held thread is refused (or waits) before it writes or
runs a tool, every turn is kept or refused, and a dead holder's lease frees the thread."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.tools import StructuredTool
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.types import Command
from pydantic import BaseModel, Field

from keelgraph import Contract, RunError, ThreadBusy, build_graph
from keelgraph.contracts import Failure
from keelgraph.graphs import lease
from keelgraph.graphs.lease import LeasePolicy
from keelgraph.graphs.persistence import async_checkpointer, checkpointer
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools import with_policy

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import writers  # noqa: E402  (bench/writers.py)


class Order(BaseModel):
    item: str = Field(min_length=1, max_length=40)


class Receipt(BaseModel):
    reply: str


CONTRACT = Contract(input=Order, output=Receipt, instructions="Place the order, then confirm it.")
FAST = LeasePolicy(ttl_s=30, wait_s=0)


def cfg(thread: str) -> Any:
    return {"configurable": {"thread_id": thread}}


class Shop:
    """A write tool that records each call, and can hold a call until the test lets it go."""

    def __init__(self, *, approval: str = "never") -> None:
        self.placed: list[str] = []
        self.entered = threading.Event()
        self.go = threading.Event()
        self.go.set()
        self.approval = approval

    def hold(self) -> None:
        """The next call waits in the tool until `go` is set; `entered` tells when it got there."""
        self.entered.clear()
        self.go.clear()

    def tool(self) -> Any:
        def place_order(item: str) -> str:
            self.entered.set()
            assert self.go.wait(20), "the test never let the call go"
            self.placed.append(item)
            return f"placed {item}"

        tool = StructuredTool.from_function(place_order, name="place_order", description="Place an order")
        return with_policy(tool, side_effect="write", approval=self.approval)


def step(messages: list[Any]) -> Any:
    last = str(messages[-1].content)
    if last.startswith("Data from"):
        return answer(reply="done")
    return call("place_order", item=json.loads(last)["item"])


def graph_on(saver: Any, shop: Shop) -> Any:
    model = ScriptedChatModel([step], repeat_last=True)
    return build_graph(
        CONTRACT, [shop.tool()], model=model, checkpointer=saver, effects=None, strategy="json_object"
    )


def requests(graph: Any, thread: str) -> list[str]:
    return items(graph.get_state(cfg(thread)).values.get("messages", []))


def items(messages: list[Any]) -> list[str]:
    """The items of the requests among `messages`."""
    return [json.loads(str(m.content))["item"] for m in messages if m.type == "human"]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.e2e)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file, or a fresh PostgreSQL database on the session's server."""
    if request.param == "sqlite":
        return str(tmp_path / "threads.db")
    url: str = request.getfixturevalue("postgres_db")
    return url


@pytest.fixture
def two_savers(target: str) -> Iterator[tuple[Any, Any]]:
    """Two savers on one database: two writers, as two processes would have."""
    with checkpointer(target, lease=FAST) as first, checkpointer(target, lease=FAST) as second:
        yield first, second


# --- the rules -------------------------------------------------------------------------------


def test_langgraph_config_keys_are_the_ones_the_lease_reads() -> None:
    from langgraph._internal import _constants as c

    assert (lease._RUNTIME_KEY, lease._TASK_ID_KEY, lease._DURABILITY_KEY) == (
        c.CONFIG_KEY_RUNTIME,
        c.CONFIG_KEY_TASK_ID,
        c.CONFIG_KEY_DURABILITY,
    )
    from langgraph.constants import START

    assert frozenset({c.INTERRUPT, c.ERROR}) == lease._ENDING_WRITES
    assert frozenset({START, c.TASKS}) == lease._PENDING


def test_thread_busy_is_a_typed_run_error_that_says_what_to_do() -> None:
    error = ThreadBusy("t-9", remaining_s=42)
    assert isinstance(error, RunError) and error.code == "thread_busy"
    assert "'t-9'" in str(error) and "another run holds it" in str(error) and "retry later" in str(error)
    again = Failure.model_validate(error.to_failure().model_dump()).to_exception()
    assert isinstance(again, ThreadBusy) and again.thread_id == "t-9" and str(again) == str(error)


def test_a_bad_policy_is_a_user_error() -> None:
    from keelgraph import UserError

    with pytest.raises(UserError, match="KEELGRAPH_THREAD_LEASE_S"):
        LeasePolicy(ttl_s=0)


def test_the_policy_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEELGRAPH_THREAD_LEASE_S", "12.5")
    monkeypatch.setenv("KEELGRAPH_THREAD_WAIT_S", "3")
    assert LeasePolicy.from_settings() == LeasePolicy(ttl_s=12.5, wait_s=3)


# --- one process, two writers ----------------------------------------------------------------


def test_a_second_writer_is_refused_before_it_writes_or_runs_a_tool(two_savers: tuple[Any, Any]) -> None:
    first_shop, second_shop = Shop(), Shop()
    first, second = graph_on(two_savers[0], first_shop), graph_on(two_savers[1], second_shop)
    first.invoke({"request": {"item": "a1"}}, cfg("t"))
    first_shop.hold()
    outcome: dict[str, Any] = {}
    running = threading.Thread(
        target=lambda: outcome.update(r=first.invoke({"request": {"item": "a2"}}, cfg("t")))
    )
    running.start()
    try:
        assert first_shop.entered.wait(20)
        with pytest.raises(ThreadBusy) as refused:
            second.invoke({"request": {"item": "b1"}}, cfg("t"))
        assert refused.value.reason == "held" and refused.value.thread_id == "t"
        assert second_shop.placed == []  # no tool of the refused run ran
    finally:
        first_shop.go.set()
        running.join(20)
    assert outcome["r"]["status"] == "ok"
    # Released at the end of the turn: the other writer's next turn goes through.
    assert second.invoke({"request": {"item": "b2"}}, cfg("t"))["status"] == "ok"
    assert requests(second, "t") == ["a1", "a2", "b2"]  # nothing of the refused run's b1
    for snapshot in second.get_state_history(cfg("t")):  # in no checkpoint at all
        assert "b1" not in items(snapshot.values.get("messages", []))
    assert first_shop.placed + second_shop.placed == ["a1", "a2", "b2"]


def test_a_waiting_writer_gets_the_thread_when_the_turn_ends(tmp_path: Path) -> None:
    db = tmp_path / "threads.db"
    patient = LeasePolicy(ttl_s=30, wait_s=15)
    with checkpointer(db, lease=FAST) as a, checkpointer(db, lease=patient) as b:
        first_shop = Shop()
        first, second = graph_on(a, first_shop), graph_on(b, Shop())
        first_shop.hold()
        running = threading.Thread(target=lambda: first.invoke({"request": {"item": "a1"}}, cfg("w")))
        running.start()
        assert first_shop.entered.wait(20)
        threading.Timer(0.5, first_shop.go.set).start()
        began = time.monotonic()
        assert second.invoke({"request": {"item": "b1"}}, cfg("w"))["status"] == "ok"
        assert time.monotonic() - began >= 0.4  # it waited for the first turn
        running.join(20)
        assert requests(second, "w") == ["a1", "b1"]


def test_concurrent_writers_in_threads_lose_no_turn(tmp_path: Path) -> None:
    db = tmp_path / "threads.db"
    shops = [Shop() for _ in range(3)]
    outcomes: dict[str, str] = {}
    savers = [checkpointer(db, lease=FAST) for _ in shops]
    graphs = [graph_on(s.__enter__(), shop) for s, shop in zip(savers, shops, strict=True)]

    def send(index: int) -> None:
        for turn in range(4):
            item = f"w{index}-{turn}"
            try:
                outcomes[item] = graphs[index].invoke({"request": {"item": item}}, cfg("c"))["status"]
            except ThreadBusy:
                outcomes[item] = "refused"

    try:
        workers = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        kept = requests(graphs[0], "c")
        ok = sorted(item for item, status in outcomes.items() if status == "ok")
        assert set(outcomes.values()) <= {"ok", "refused"} and len(outcomes) == 12
        assert sorted(kept) == ok  # every turn that returned ok is kept, no refused one is
        assert sorted(item for shop in shops for item in shop.placed) == ok  # effects == kept turns
    finally:
        for s in savers:
            s.__exit__(None, None, None)


def test_an_interrupted_turn_releases_the_thread_and_its_approval_resumes_it(
    two_savers: tuple[Any, Any],
) -> None:
    shop = Shop(approval="always")
    first, second = graph_on(two_savers[0], shop), graph_on(two_savers[1], shop)
    paused = first.invoke({"request": {"item": "tea"}}, cfg("i"))
    assert paused["__interrupt__"] and shop.placed == []
    # The person's answer is a new run, from another writer: the paused turn does not hold the thread.
    done = second.invoke(Command(resume={"action": "approve"}), cfg("i"))
    assert done["status"] == "ok" and shop.placed == ["tea"]
    assert first.invoke({"request": {"item": "milk"}}, cfg("i"))["__interrupt__"]


def test_reading_a_thread_takes_no_lease(two_savers: tuple[Any, Any]) -> None:
    shop = Shop()
    first, second = graph_on(two_savers[0], shop), graph_on(two_savers[1], shop)
    first.invoke({"request": {"item": "a1"}}, cfg("r"))
    for _ in range(3):
        second.get_state(cfg("r"))
        list(second.get_state_history(cfg("r")))
    assert first.invoke({"request": {"item": "a2"}}, cfg("r"))["status"] == "ok"


def test_a_writer_without_a_lease_is_refused_while_a_turn_runs(tmp_path: Path) -> None:
    db = tmp_path / "threads.db"
    with checkpointer(db, lease=FAST) as a, checkpointer(db, lease=FAST) as b:
        shop = Shop()
        first, other = graph_on(a, shop), graph_on(b, Shop())
        first.invoke({"request": {"item": "a1"}}, cfg("u"))
        shop.hold()
        running = threading.Thread(target=lambda: first.invoke({"request": {"item": "a2"}}, cfg("u")))
        running.start()
        try:
            assert shop.entered.wait(20)
            with pytest.raises(ThreadBusy):
                other.update_state(cfg("u"), {"status": "ok"})
        finally:
            shop.go.set()
            running.join(20)
        other.update_state(cfg("u"), {"status": "ok"})  # once the turn is over, it may


def test_a_run_finds_a_write_made_under_it_and_is_refused(tmp_path: Path) -> None:
    """The compare-and-set fence: LangGraph's plain saver takes no lease, so only the parent
    checkpoint check sees that it wrote the thread while a keelgraph run was on it."""
    db = tmp_path / "threads.db"
    with checkpointer(db, lease=FAST) as leased:
        plain = SqliteSaver(sqlite3.connect(db, check_same_thread=False))
        shop = Shop()
        first, intruder = graph_on(leased, shop), graph_on(plain, Shop())
        first.invoke({"request": {"item": "a1"}}, cfg("x"))
        shop.hold()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                first.invoke({"request": {"item": "a2"}}, cfg("x"))
            except ThreadBusy as exc:
                outcome["error"] = exc

        running = threading.Thread(target=run)
        running.start()
        assert shop.entered.wait(20)
        intruder.invoke({"request": {"item": "z1"}}, cfg("x"))
        shop.go.set()
        running.join(20)
        plain.conn.close()
    assert outcome["error"].reason == "changed"


# --- several processes -----------------------------------------------------------------------


def hold_forever(item: str) -> str:
    """The holder process's tool: says it is in its tool, then never returns (until killed)."""
    print("holding", flush=True)
    time.sleep(120)
    return f"placed {item}"


HOLDER = """
import sys
from langchain_core.tools import StructuredTool
from keelgraph import build_graph
from keelgraph.graphs.persistence import async_checkpointer, checkpointer
from keelgraph.testing import ScriptedChatModel
from keelgraph.tools import with_policy
from tests.test_thread_lease import CONTRACT, cfg, hold_forever, step
tool = with_policy(StructuredTool.from_function(hold_forever, name="place_order"), side_effect="write")
with checkpointer(sys.argv[1]) as saver:
    graph = build_graph(CONTRACT, [tool], model=ScriptedChatModel([step], repeat_last=True),
                        checkpointer=saver, effects=None, strategy="json_object")
    graph.invoke({"request": {"item": "held"}}, cfg("k"))
"""


def _holder(target: str, tmp_path: Path, lease_s: str) -> subprocess.Popen[str]:
    env = {**os.environ, "KEELGRAPH_THREAD_LEASE_S": lease_s, "KEELGRAPH_DATA_DIR": str(tmp_path / "d")}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, target], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "holding", "the holder never reached its tool"
    return proc


def test_a_killed_holder_frees_the_thread(target: str, tmp_path: Path) -> None:
    holder = _holder(target, tmp_path, "300")
    try:
        with checkpointer(target, lease=FAST) as saver:
            shop = Shop()
            graph = graph_on(saver, shop)
            with pytest.raises(ThreadBusy, match="another run holds it"):
                graph.invoke({"request": {"item": "b1"}}, cfg("k"))
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
            # Its process is gone (same machine): the thread is free at once, not after 300 s.
            assert graph.invoke({"request": {"item": "b2"}}, cfg("k"))["status"] == "ok"
            assert shop.placed == ["b2"]
    finally:
        holder.kill()
        holder.wait(10)


def test_a_lease_from_another_machine_expires(tmp_path: Path) -> None:
    """A holder on another machine cannot be looked at: its lease frees the thread after `ttl_s`."""
    db = tmp_path / "threads.db"
    with checkpointer(db, lease=FAST) as saver:
        shop = Shop()
        graph = graph_on(saver, shop)
        graph.invoke({"request": {"item": "a1"}}, cfg("m"))
        conn = sqlite3.connect(db)
        conn.execute(
            "UPDATE keelgraph_thread_leases SET owner = 'elsewhere:1:1/x', expires_at = ? WHERE thread_id = 'm'",
            (time.time() + 1.0,),
        )
        conn.commit()
        conn.close()
        with pytest.raises(ThreadBusy) as refused:
            graph.invoke({"request": {"item": "a2"}}, cfg("m"))
        assert refused.value.remaining_s is not None and 0 < refused.value.remaining_s <= 1.0
        time.sleep(1.1)
        assert graph.invoke({"request": {"item": "a3"}}, cfg("m"))["status"] == "ok"
        assert shop.placed == ["a1", "a3"]


def test_the_writers_benchmark_loses_no_turn_across_processes(tmp_path: Path) -> None:
    assert (
        writers.main(["--writers", "2", "--turns", "3", "--backends", "sqlite", "--out", str(tmp_path)]) == 0
    )
    [row] = json.loads((tmp_path / "writers.json").read_text())["rows"]
    assert row["sent"] == row["kept"] + row["refused"] and row["lost"] == 0 and row["effects_match"]


@pytest.mark.e2e
def test_the_writers_benchmark_on_postgres(postgres_db: str, tmp_path: Path) -> None:
    argv = ["--writers", "2", "--turns", "3", "--backends", "postgres", "--postgres-url", postgres_db]
    assert writers.main([*argv, "--out", str(tmp_path)]) == 0
    [row] = json.loads((tmp_path / "writers.json").read_text())["rows"]
    assert row["sent"] == row["kept"] + row["refused"] and row["lost"] == 0 and row["effects_match"]


def test_doctests() -> None:
    import doctest

    from keelgraph.contracts import errors

    assert doctest.testmod(lease).failed == 0
    assert doctest.testmod(errors).failed == 0


# --- async savers (`async_checkpointer`) -----------------------------------------------------


async def test_async_writers_in_one_event_loop_lose_no_turn(target: str) -> None:
    """Turns sent as asyncio tasks through one async saver and through a second one: each is kept
    or refused, and the tool ran for the kept ones only."""
    import asyncio

    shop = Shop()
    outcomes: dict[str, str] = {}
    async with async_checkpointer(target, lease=FAST) as a, async_checkpointer(target, lease=FAST) as b:
        graphs = [graph_on(a, shop), graph_on(a, shop), graph_on(b, shop)]

        async def send(index: int) -> None:
            for turn in range(3):
                item = f"w{index}-{turn}"
                try:
                    result = await graphs[index].ainvoke({"request": {"item": item}}, cfg("as"))
                    outcomes[item] = result["status"]
                except ThreadBusy:
                    outcomes[item] = "refused"

        await asyncio.gather(*(send(i) for i in range(3)))
        kept = items((await graphs[2].aget_state(cfg("as"))).values.get("messages", []))
    ok = sorted(item for item, status in outcomes.items() if status == "ok")
    assert set(outcomes.values()) <= {"ok", "refused"} and len(outcomes) == 9 and ok
    assert sorted(kept) == ok and sorted(shop.placed) == ok


async def test_an_async_turn_is_refused_while_a_sync_one_holds_the_thread(target: str) -> None:
    import asyncio

    first_shop, second_shop = Shop(), Shop()
    with checkpointer(target, lease=FAST) as sync_saver:
        first = graph_on(sync_saver, first_shop)
        first_shop.hold()
        running = asyncio.get_running_loop().run_in_executor(
            None, lambda: first.invoke({"request": {"item": "a1"}}, cfg("mix"))
        )
        try:
            assert await asyncio.to_thread(first_shop.entered.wait, 20)
            async with async_checkpointer(target, lease=FAST) as async_saver:
                second = graph_on(async_saver, second_shop)
                with pytest.raises(ThreadBusy):
                    await second.ainvoke({"request": {"item": "b1"}}, cfg("mix"))
                assert second_shop.placed == []
                first_shop.go.set()
                assert (await running)["status"] == "ok"
                assert (await second.ainvoke({"request": {"item": "b2"}}, cfg("mix")))["status"] == "ok"
                assert items((await second.aget_state(cfg("mix"))).values["messages"]) == ["a1", "b2"]
        finally:
            first_shop.go.set()


def test_an_interrupt_written_before_its_checkpoint_is_saved_releases_with_that_save() -> None:
    """LangGraph saves checkpoints in the background: the interrupt of step C can reach the database
    before C itself, and the save of the step before it after both. The thread is released only
    once C is saved (a run that came earlier would not see the interrupt), and stays released."""
    book = lease._Lease(FAST)
    hold = lease.Hold("t", "T", fenced=True)

    def config(parent: str) -> Any:
        return {
            "configurable": {
                "thread_id": "t",
                "checkpoint_ns": "",
                "checkpoint_id": parent,
                lease.LEASE_KEY: hold,
            }
        }

    def checkpoint(id_: str) -> Any:
        return {"id": id_, "channel_values": {"branch:to:approve": None}}

    held = lease._Row("T", time.time() + 30)
    interrupt = [("__interrupt__", ())]
    pending = book.fence(held, config("c"), time.time(), latest="b", writes=interrupt)
    assert pending is not None and pending.expires_at > time.time() and pending.released_on == "c"
    assert book.fence(pending, config("a"), time.time(), latest="a", checkpoint=checkpoint("b")) is None
    released = book.fence(pending, config("b"), time.time(), latest="b", checkpoint=checkpoint("c"))
    assert released is not None and released.expires_at == 0
    at_once = book.fence(held, config("c"), time.time(), latest="c", writes=interrupt)  # C already saved
    assert at_once is not None and at_once.expires_at == 0
    with pytest.raises(ThreadBusy, match="written by another writer"):  # the compare-and-set
        book.fence(held, config("b"), time.time(), latest="z", checkpoint=checkpoint("c"))
