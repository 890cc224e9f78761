"""Persistence on every backend (a SQLite file, PostgreSQL), and the local PostgreSQL cluster."""

from __future__ import annotations

import asyncio
import doctest
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import StructuredTool
from langgraph.types import Command
from pydantic import BaseModel, Field

import keelgraph.testing.postgres
from keelgraph import Contract, InputRejected, UserError, build_graph, unwrap
from keelgraph.graphs import persistence
from keelgraph.graphs.persistence import async_checkpointer, async_store, checkpointer, default_target, store
from keelgraph.settings import install_hint
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.testing.postgres import LocalPostgres, find_pg_bin
from keelgraph.tools import MemoryLedger, with_policy

ROOT = Path(__file__).parents[1]


class Question(BaseModel):
    city: str = Field(min_length=1, max_length=40)


class Forecast(BaseModel):
    city: str
    celsius: int


class Ask(BaseModel):
    order_id: int


class Done(BaseModel):
    reply: str


class RefundArgs(BaseModel):
    order_id: int
    amount: float = Field(gt=0, le=500)


CONTRACT = Contract(input=Question, output=Forecast, instructions="Report the weather.")
REFUNDS = Contract(input=Ask, output=Done, instructions="Handle refunds.", repair_budget=2)
DONE: list[tuple[int, float]] = []


def refund(order_id: int, amount: float) -> str:
    DONE.append((order_id, amount))
    return f"refunded {amount:.2f} on order {order_id}"


def _refund_tool() -> Any:
    tool = StructuredTool.from_function(refund, name="refund", description="Refund", args_schema=RefundArgs)
    return with_policy(tool, side_effect="write", approval="always", from_input=("order_id",))


def cfg(thread: str) -> Any:
    return {"configurable": {"thread_id": thread}}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.e2e)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file, or a fresh PostgreSQL database on the session's server."""
    if request.param == "sqlite":
        return str(tmp_path / "db" / "keelgraph.db")
    url: str = request.getfixturevalue("postgres_db")
    return url


def _contents(graph: Any, thread: str) -> list[str]:
    return [str(m.content) for m in graph.get_state(cfg(thread)).values["messages"]]


# --- the same behaviour on every backend ---------------------------------------------------


def test_a_thread_keeps_its_messages_across_turns(target: str) -> None:
    model = ScriptedChatModel([answer(city="Oslo", celsius=21), answer(city="Bergen", celsius=12)])
    with checkpointer(target) as saver:
        graph = build_graph(CONTRACT, model=model, checkpointer=saver, effects=None)
        graph.invoke({"request": {"city": "Oslo"}}, cfg("m"))
        second = graph.invoke({"request": {"city": "Bergen"}}, cfg("m"))
        assert unwrap(second, Forecast) == Forecast(city="Bergen", celsius=12)
        assert '{"city":"Oslo"}' in [m.content for m in model.calls[1]["messages"]]  # turn 1 was sent
        kept = _contents(graph, "m")
        assert kept[0] == '{"city":"Oslo"}' and '{"city":"Bergen"}' in kept
        assert graph.get_state(cfg("other")).values == {}  # threads do not mix


def test_a_thread_survives_a_new_saver_and_a_new_process(target: str) -> None:
    with checkpointer(target) as saver:
        graph = build_graph(
            CONTRACT, model=ScriptedChatModel([answer(city="Oslo", celsius=21)]), checkpointer=saver
        )
        graph.invoke({"request": {"city": "Oslo"}}, cfg("s"))
        before = _contents(graph, "s")
    with checkpointer(target) as saver:  # a new saver: nothing is cached in memory
        graph = build_graph(CONTRACT, model=ScriptedChatModel([]), checkpointer=saver)
        assert _contents(graph, "s") == before
    script = (
        "import json, sys\n"
        "from keelgraph import build_graph\n"
        "from keelgraph.graphs.persistence import checkpointer\n"
        "from keelgraph.testing import ScriptedChatModel\n"
        "from tests.test_postgres import CONTRACT, _contents\n"
        "with checkpointer(sys.argv[1]) as saver:\n"
        "    graph = build_graph(CONTRACT, model=ScriptedChatModel([]), checkpointer=saver)\n"
        "    print(json.dumps(_contents(graph, 's')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == before


def test_a_rejected_request_is_recorded_in_the_thread(target: str) -> None:
    model = ScriptedChatModel([])
    with checkpointer(target) as saver:
        graph = build_graph(CONTRACT, model=model, checkpointer=saver)
        result = graph.invoke({"request": {"city": "", "big": 2**70}}, cfg("r"))
    assert result["status"] == "rejected" and model.calls == []
    with pytest.raises(InputRejected):
        unwrap(result, Forecast)
    with checkpointer(target) as saver:
        state = build_graph(CONTRACT, model=model, checkpointer=saver).get_state(cfg("r"))
    [kept] = state.values["messages"]
    assert kept.additional_kwargs["keelgraph"] == "rejected"
    assert json.loads(str(kept.content)) == {"city": "", "big": 2**70}  # past 64 bits, still stored
    assert state.values["error"]["type"] == "InputRejected"


async def test_an_approval_paused_in_one_saver_is_resumed_from_another(target: str) -> None:
    DONE.clear()
    ledger = MemoryLedger()

    def graph(saver: Any, script: list[Any]) -> Any:
        return build_graph(
            REFUNDS, [_refund_tool()], model=ScriptedChatModel(script), checkpointer=saver,
            effects=ledger, strategy="json_object",
        )  # fmt: skip

    with checkpointer(target) as saver:  # the sync saver pauses...
        paused = graph(saver, [call("refund", amount=30)]).invoke({"request": {"order_id": 7}}, cfg("a"))
    [pause] = paused["__interrupt__"]
    assert pause.value["type"] == "approval" and DONE == []
    async with async_checkpointer(target) as saver:  # ...the async one (a server's) resumes
        resumed = graph(saver, [answer(reply="refunded")])
        assert (await resumed.aget_state(cfg("a"))).next == ("approve",)
        result = await resumed.ainvoke(Command(resume={"action": "approve"}), cfg("a"))
    assert result["status"] == "ok" and DONE == [(7, 30.0)]


async def test_async_saver_keeps_a_thread(target: str) -> None:
    async with async_checkpointer(target) as saver:
        graph = build_graph(
            CONTRACT, model=ScriptedChatModel([answer(city="Oslo", celsius=21)]), checkpointer=saver
        )
        await graph.ainvoke({"request": {"city": "Oslo"}}, cfg("x"))
    async with async_checkpointer(target) as saver:
        graph = build_graph(CONTRACT, model=ScriptedChatModel([]), checkpointer=saver)
        state = await graph.aget_state(cfg("x"))
        assert state.values["output"] == {"city": "Oslo", "celsius": 21}
        assert isinstance(state.values["messages"][0], HumanMessage)


def test_the_store_puts_gets_and_searches_by_namespace(target: str) -> None:
    with store(target) as memory:
        memory.put(("u1", "prefs"), "lang", {"value": "fr"})
        memory.put(("u1", "prefs"), "units", {"value": "metric"})
        memory.put(("u1", "facts"), "pet", {"value": "cat"})
        memory.put(("u2", "prefs"), "lang", {"value": "de"})
    with store(target) as memory:  # reopened: nothing was only in memory
        item = memory.get(("u1", "prefs"), "lang")
        assert item is not None and item.value == {"value": "fr"}
        assert sorted(i.key for i in memory.search(("u1", "prefs"))) == ["lang", "units"]
        assert sorted(i.key for i in memory.search(("u1",))) == ["lang", "pet", "units"]
        assert [i.value for i in memory.search(("u1",), filter={"value": "cat"})] == [{"value": "cat"}]
        assert memory.get(("u3", "prefs"), "lang") is None
        memory.delete(("u1", "prefs"), "lang")
        assert memory.get(("u1", "prefs"), "lang") is None


async def test_the_async_store_shares_the_sync_stores_data(target: str) -> None:
    async with async_store(target) as memory:
        await memory.aput(("u1", "prefs"), "lang", {"value": "fr"})
        await memory.aput(("u2", "prefs"), "lang", {"value": "de"})
        found = await memory.asearch(("u1",))
        assert [(i.namespace, i.key, i.value) for i in found] == [(("u1", "prefs"), "lang", {"value": "fr"})]
        assert sorted(await memory.alist_namespaces(prefix=("u2",))) == [("u2", "prefs")]
    with store(target) as memory:
        item = memory.get(("u2", "prefs"), "lang")
        assert item is not None and item.value == {"value": "de"}


@pytest.mark.e2e
@pytest.mark.timeout(120)  # a deadlock here must fail fast, not hold CI for the default 600 s
async def test_replicas_that_start_together_set_up_one_fresh_database(postgres_db: str) -> None:
    async def open_both() -> None:
        async with async_checkpointer(postgres_db), async_store(postgres_db):
            pass

    await asyncio.gather(*(open_both() for _ in range(6)))  # LangGraph's setup() alone races


# --- choosing a backend --------------------------------------------------------------------


def test_targets_come_from_settings() -> None:
    assert default_target(env={"KEELGRAPH_DATA_DIR": "/d"}) == Path("/d/threads.db")
    assert default_target("store", env={"KEELGRAPH_DATA_DIR": "/d"}) == Path("/d/store.db")
    url = "postgresql://app@db:5432/app"
    assert default_target("store", env={"KEELGRAPH_DATABASE_URL": url}) == url


def test_no_target_means_the_data_dir() -> None:
    data_dir = Path(os.environ["KEELGRAPH_DATA_DIR"])  # conftest gives each test its own
    with checkpointer() as saver, store() as memory:
        assert type(saver).__name__ == "LeasedSqliteSaver" and type(memory).__name__ == "SqliteStore"
    assert (data_dir / "threads.db").exists() and (data_dir / "store.db").exists()


async def test_unknown_schemes_are_user_errors() -> None:
    with pytest.raises(UserError, match=r"mysql:// URL: use a postgresql:// URL or a SQLite file path"):
        async with async_checkpointer("mysql://db/app"):
            pass
    with pytest.raises(UserError, match="redis://"), store("redis://cache"):
        pass


def test_a_missing_postgres_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg_pool", None)
    with (
        pytest.raises(UserError, match=re.escape(install_hint("postgres"))),
        checkpointer("postgresql://x/y"),
    ):
        pass


async def test_an_unreachable_database_is_a_user_error_without_the_password() -> None:
    url = "postgresql://app:s3cret@127.0.0.1:1/app"  # nothing listens on port 1
    with pytest.raises(
        UserError, match=r"could not connect to PostgreSQL at postgresql://app:\*\*\*@"
    ) as caught:
        async with async_checkpointer(url):
            pass
    assert "s3cret" not in str(caught.value)
    with pytest.raises(UserError, match="could not connect"), store(url):
        pass


def test_the_module_examples_run() -> None:
    assert doctest.testmod(persistence).failed == 0
    assert doctest.testmod(keelgraph.testing.postgres).failed == 0


# --- the local cluster ---------------------------------------------------------------------


def test_no_postgresql_is_a_clear_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(keelgraph.testing.postgres, "find_pg_bin", lambda: None)
    with pytest.raises(UserError, match=r"PostgreSQL is not installed: run `bash .ci/setup`"):
        LocalPostgres(tmp_path).start()
    with pytest.raises(UserError, match="not running"):
        _ = LocalPostgres(tmp_path).url


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL is not installed")
    with tempfile.TemporaryDirectory(prefix="keelgraph-pg-") as tmp:
        yield Path(tmp)


@pytest.mark.e2e
def test_a_cluster_starts_restarts_and_keeps_its_data(pg_dir: Path) -> None:
    import psycopg

    pg = LocalPostgres(pg_dir)
    with pg:
        assert pg.url.startswith("postgresql://postgres@127.0.0.1:") and pg.url.endswith(
            "/postgres?sslmode=disable"
        )
        assert pg.started_in_s is not None and pg.started_in_s < 30
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (v int)")
            conn.execute("INSERT INTO kept VALUES (42)")
            assert conn.execute("SHOW fsync").fetchone() == ("on",)  # durable unless asked otherwise
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
    with pg, psycopg.connect(pg.url) as conn:  # the same cluster again: no initdb, the row is kept
        assert conn.execute("SELECT v FROM kept").fetchone() == (42,)
    assert not _listening(pg)


@pytest.mark.e2e
def test_a_cluster_dies_with_the_process_that_started_it(pg_dir: Path) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from keelgraph.testing.postgres import LocalPostgres\n"
        "pg = LocalPostgres(Path(sys.argv[1]), fsync=False)\n"
        "print(pg.start(), flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(pg_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().startswith("postgresql://")
        postmaster = int((pg_dir / "data" / "postmaster.pid").read_text().split()[0])
        os.kill(child.pid, signal.SIGKILL)  # no atexit runs
        child.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and keelgraph.testing.postgres._alive(postmaster):
            time.sleep(0.1)
        assert not keelgraph.testing.postgres._alive(postmaster)
        assert "database system is shut down" in (pg_dir / "postgres.log").read_text()
    finally:
        if child.poll() is None:
            child.kill()


def _listening(pg: LocalPostgres) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", pg.port or 0)) == 0
