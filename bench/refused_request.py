"""What a thread keeps of a refused request: bytes written to SQLite for one 50 MB request, keelgraph
against plain LangGraph in the same run.

Plain LangGraph (a one-node graph that rejects the request) keeps the body in the input
checkpoint, the start task's write and its own state, so the file grows by a multiple of the body;
keelgraph keeps its size, SHA-256 and first characters (see `keelgraph.contracts.boundary.
stored_request` and `keelgraph.graphs.persistence.StorableSerializer`).

Run: .venv/bin/python bench/refused_request.py [--mb 50]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel

from keelgraph import Contract, build_graph, sqlite_checkpointer
from keelgraph.testing import ScriptedChatModel, answer

LIMIT = 64 * 1024
"""The bar: bytes a refused request may leave in the thread."""


class Ask(BaseModel):
    city: str


class Reply(BaseModel):
    city: str


class Plain(TypedDict, total=False):
    request: Any
    status: str


def _reject(state: Plain) -> Plain:
    return {"status": "rejected" if len(str(state.get("request", ""))) > 20_000 else "ok"}


def stored_bytes(path: Path) -> int:
    """Bytes of checkpoint data in a SQLite checkpointer file (checkpoints and writes)."""
    db = sqlite3.connect(path)
    try:
        checkpoints = db.execute(
            "SELECT COALESCE(SUM(LENGTH(checkpoint) + LENGTH(metadata)), 0) FROM checkpoints"
        )
        writes = db.execute("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM writes")
        return int(checkpoints.fetchone()[0]) + int(writes.fetchone()[0])
    finally:
        db.close()


def run_keelgraph(folder: Path, body: str) -> tuple[int, float, str]:
    path = folder / "keelgraph.db"
    graph = build_graph(
        Contract(input=Ask, output=Reply, instructions="Answer."),
        model=ScriptedChatModel([answer(city="Oslo")]),
        checkpointer=sqlite_checkpointer(path),
        store=None,
    )
    began = time.perf_counter()
    result = graph.invoke({"request": body}, {"configurable": {"thread_id": "t"}})
    return stored_bytes(path), time.perf_counter() - began, str(result["status"])


def run_plain(folder: Path, body: str) -> tuple[int, float, str]:
    path = folder / "plain.db"
    builder = StateGraph(Plain)
    builder.add_node("reject", _reject)
    builder.add_edge(START, "reject")
    builder.add_edge("reject", END)
    conn = sqlite3.connect(path, check_same_thread=False)
    graph = builder.compile(checkpointer=SqliteSaver(conn))
    began = time.perf_counter()
    result = graph.invoke({"request": body}, {"configurable": {"thread_id": "t"}})
    conn.close()
    return stored_bytes(path), time.perf_counter() - began, str(result["status"])


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mb", type=float, default=50.0, help="size of the request body in MB")
    args = parser.parse_args(argv)
    body = json.dumps({"city": "x" * int(args.mb * 1024 * 1024)})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plain = run_plain(folder, body)
        keel = run_keelgraph(folder, body)
    print(f"request body: {len(body):,} characters")
    print(f"{'':<12}{'stored bytes':>16}{'seconds':>10}  status")
    for name, (stored, seconds, status) in (("plain", plain), ("keelgraph", keel)):
        print(f"{name:<12}{stored:>16,}{seconds:>10.2f}  {status}")
    verdict = "ok" if keel[0] <= LIMIT else "OVER"
    print(f"keelgraph/plain bytes: {keel[0] / max(plain[0], 1):.5f}; bar <= {LIMIT:,} bytes: {verdict}")
    return {"plain": plain[0], "keelgraph": keel[0]}


if __name__ == "__main__":
    main()
