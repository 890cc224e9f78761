"""Checkpointers: a tuned SQLite file by default."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver

from keelgraph.contracts.parsing import oversized_ints, storable

__all__ = ["StorableSerializer", "sqlite_checkpointer"]


class StorableSerializer(JsonPlusSerializer):
    """LangGraph's serializer, except that integers past 64 bits are stored as decimal text.

    msgpack cannot hold them, and a request holding one is checkpointed (as the run's input)
    before any node can reject it: with the stock serializer the run dies with a `TypeError`.
    keelgraph's own nodes refuse such numbers by field; this keeps the input checkpoint writable.
    """

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        try:
            return super().dumps_typed(obj)
        except TypeError:
            if not oversized_ints(obj if isinstance(obj, (dict, list, tuple)) else []):
                raise
            return super().dumps_typed(storable(obj))


def sqlite_checkpointer(path: str | Path) -> SqliteSaver:
    """A `SqliteSaver` on `path` (created if needed) with WAL, a busy timeout and `synchronous=NORMAL`.

    WAL plus NORMAL keeps every committed turn across a process crash and costs one fsync per
    checkpoint batch instead of several; the busy timeout lets several processes share the file.

    >>> saver = sqlite_checkpointer(":memory:")
    """
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    saver = SqliteSaver(conn, serde=StorableSerializer())
    saver.setup()
    return saver
