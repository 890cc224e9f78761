"""Checkpointers: a tuned SQLite file by default."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from langgraph.checkpoint.sqlite import SqliteSaver

__all__ = ["sqlite_checkpointer"]


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
    saver = SqliteSaver(conn)
    saver.setup()
    return saver
