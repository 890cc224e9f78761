"""Retention of the SQLite checkpoint file: keep the latest checkpoints, drop idle threads, VACUUM."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from keelgraph import UserError, build_graph, sqlite_checkpointer
from keelgraph.commands.cli import EXIT_ERROR, main
from keelgraph.graphs.retention import checkpoint_time, prune
from keelgraph.testing import ScriptedChatModel, answer
from keelgraph.tools import SqliteLedger
from tests.test_graph import CONTRACT


def _fill(db: Path, threads: int = 3, turns: int = 4) -> Any:
    script = [answer(city=f"City{i}", celsius=i % 30) for i in range(threads * turns)]
    graph = build_graph(CONTRACT, [], model=ScriptedChatModel(script), checkpointer=sqlite_checkpointer(db))
    for turn in range(turns):
        for t in range(threads):
            graph.invoke({"request": {"city": f"City{turn}"}}, {"configurable": {"thread_id": f"t{t}"}})
    return graph


def _count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_keep_last_keeps_every_thread_whole_and_usable(tmp_path: Path) -> None:
    db = tmp_path / "threads.db"
    graph = _fill(db)
    config: Any = {"configurable": {"thread_id": "t1"}}
    state_before = graph.get_state(config).values
    total = _count(db, "checkpoints")
    report = prune(db, keep_last=1)
    assert report.checkpoints_left == 3 and report.checkpoints_deleted == total - 3
    assert _count(db, "writes") == 0 or report.writes_deleted > 0
    assert report.bytes_after < report.bytes_before
    assert graph.get_state(config).values == state_before  # the newest checkpoint is the whole state
    assert len(list(graph.get_state_history(config))) == 1
    graph2 = build_graph(
        CONTRACT,
        [],
        model=ScriptedChatModel([answer(city="Oslo", celsius=2)]),
        checkpointer=sqlite_checkpointer(db),
    )
    result = graph2.invoke({"request": {"city": "Oslo"}}, config)
    assert result["status"] == "ok"
    kinds = [m.additional_kwargs.get("keelgraph") for m in graph2.get_state(config).values["messages"]]
    assert kinds.count("request") == 5  # the thread goes on with all of its history


def test_idle_threads_are_dropped_by_age(tmp_path: Path) -> None:
    db = tmp_path / "threads.db"
    _fill(db, threads=2, turns=1)
    assert prune(db, older_than_s=3600).threads_dropped == 0  # written a moment ago
    report = prune(db, older_than_s=3600, now=time.time() + 7200)
    assert report.threads_dropped == 2 and report.checkpoints_left == 0 and _count(db, "writes") == 0


def test_checkpoint_ids_carry_their_time(tmp_path: Path) -> None:
    db = tmp_path / "threads.db"
    _fill(db, threads=1, turns=1)
    with sqlite3.connect(db) as conn:
        newest = conn.execute("SELECT MAX(checkpoint_id) FROM checkpoints").fetchone()[0]
    assert abs(checkpoint_time(newest) - time.time()) < 60


def test_bad_arguments_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no checkpoint database"):
        prune(tmp_path / "missing.db", keep_last=1)
    db = tmp_path / "threads.db"
    _fill(db, threads=1, turns=1)
    with pytest.raises(UserError, match="at least 1"):
        prune(db, keep_last=0)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(UserError, match="not a LangGraph SQLite checkpoint database"):
        prune(other, keep_last=1)


def test_cli(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fill(data / "threads.db", threads=2, turns=30)
    ledger = SqliteLedger(data / "effects.db")
    ledger.begin("k", "open_ticket", {}, "t")
    ledger.finish("k", "done")
    ledger.close()
    with sqlite3.connect(data / "effects.db") as conn:  # finished 40 days ago
        conn.execute("UPDATE keelgraph_effects SET finished = finished - 40 * 86400")
    assert main(["prune", "--keep-last", "20", "--older-than", "30d"]) == 0  # the README's command
    out = capsys.readouterr().out
    assert f"pruned {data / 'threads.db'}" in out and "(40 left)" in out and "MB ->" in out
    assert f"pruned {data / 'effects.db'}: 1 completed effect records older than 30d" in out
    assert main(["prune", "--older-than", "soon"]) == EXIT_ERROR
    assert "is not like 30d" in capsys.readouterr().err
    assert main(["prune", "--db", str(data / "threads.db"), "--older-than", "1d", "--no-vacuum"]) == 0


@pytest.fixture
def data(_data_dir: Path) -> Path:
    _data_dir.mkdir(parents=True, exist_ok=True)
    return _data_dir
