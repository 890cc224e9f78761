"""The one way keelgraph opens its SQLite files: WAL, a busy timeout, usable from any thread."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

__all__ = ["connect", "pragmas"]


def pragmas(synchronous: Literal["NORMAL", "FULL"] = "NORMAL") -> tuple[str, ...]:
    """The statements `connect` runs on a new connection (also for aiosqlite connections)."""
    return ("PRAGMA journal_mode=WAL", f"PRAGMA synchronous={synchronous}", "PRAGMA busy_timeout=30000")


def connect(
    path: str | Path,
    *,
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    autocommit: bool = False,
) -> sqlite3.Connection:
    """A connection to `path` (its folder created; `:memory:` works too) with WAL, a 30 s busy
    timeout and `synchronous` as given, shareable between threads (callers serialise use).

    NORMAL keeps every committed transaction across a process crash with one fsync per WAL
    checkpoint; FULL also across a power cut (the effect ledger: a record that a call started must
    not be lost). `autocommit` gives `isolation_level=None` (LangGraph's stores expect it).
    """
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0)
    if autocommit:
        conn.isolation_level = None
    for pragma in pragmas(synchronous):
        conn.execute(pragma)
    return conn
