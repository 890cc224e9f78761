"""The effect ledger: a write tool's completed call is recorded, so it is never performed twice.

LangGraph checkpoints after a node finishes. A process that dies between a tool's side effect and
that checkpoint re-runs the whole `act` node on resume, and an interrupt or a repair turn can replay
a call too. So `act` keeps its own durable record per call of a `write` or `external` tool, keyed
by an idempotency key:

- `done`: the effect happened and its result is recorded. A replay returns the recorded result
  without calling the tool.
- `started`: the call began and never reported back (the process died inside it, or it timed
  out). Whether the effect happened is unknown: a tool declared `idempotent=True` (it passes
  `effect_key()` on to a system that deduplicates by it) is called again with the same key;
  any other tool is not called again, and the model is told the outcome is unknown.

The key is the thread, the turn and the call (tool name and arguments), unless the tool's policy
gives its own (`idempotency_key=`), e.g. one ticket per order and kind across all turns.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from keelgraph._sqlite import connect

__all__ = [
    "Effect",
    "EffectLedger",
    "MemoryLedger",
    "SqliteLedger",
    "default_key",
    "effect_key",
]

EffectStatus = Literal["started", "done"]
_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("keelgraph_effect_key", default=None)


@dataclass(frozen=True)
class Effect:
    """One recorded call of a side-effecting tool."""

    key: str
    tool: str
    status: EffectStatus
    output: Any = None
    thread_id: str = ""


class EffectLedger(Protocol):
    """Where completed side effects are recorded; must survive the process (or be shared by it)."""

    def lookup(self, key: str) -> Effect | None: ...

    def begin(self, key: str, tool: str, args: Mapping[str, Any], thread_id: str) -> None: ...

    def finish(self, key: str, output: Any) -> None: ...

    def forget(self, key: str) -> None:
        """Drop a call that failed before doing anything (the tool raised), so it may be retried."""
        ...


def default_key(thread_id: str, turn_id: str, tool: str, args: Mapping[str, Any]) -> str:
    """The default idempotency key: this call (tool and arguments) in this turn of this thread."""
    body = json.dumps([thread_id, turn_id, tool, args], sort_keys=True, default=str, ensure_ascii=False)
    return f"{tool}:{hashlib.sha256(body.encode()).hexdigest()[:32]}"


def effect_key() -> str | None:
    """The idempotency key of the tool call running now (None outside a side-effecting call).

    A tool that talks to a system with idempotency keys (payments, tickets, queues) passes it on,
    and declares `idempotent=True`: then even a call cut off mid-way is safely repeated.
    """
    return _CURRENT.get()


@contextmanager
def running_with_key(key: str | None) -> Iterator[None]:
    token = _CURRENT.set(key)
    try:
        yield
    finally:
        _CURRENT.reset(token)


class MemoryLedger:
    """A ledger in this process's memory: for tests, and for graphs whose effects need no replay."""

    def __init__(self) -> None:
        self._rows: dict[str, Effect] = {}
        self._lock = threading.Lock()

    def lookup(self, key: str) -> Effect | None:
        with self._lock:
            return self._rows.get(key)

    def begin(self, key: str, tool: str, args: Mapping[str, Any], thread_id: str) -> None:
        with self._lock:
            self._rows[key] = Effect(key, tool, "started", None, thread_id)

    def finish(self, key: str, output: Any) -> None:
        with self._lock:
            row = self._rows[key]
            self._rows[key] = Effect(key, row.tool, "done", output, row.thread_id)

    def forget(self, key: str) -> None:
        with self._lock:
            self._rows.pop(key, None)


class SqliteLedger:
    """The ledger in a SQLite file (table `keelgraph_effects`), safe for several processes.

    Writes are committed with `synchronous=FULL` before the graph goes on: a record of an effect
    must outlive the process and the machine's power, or it cannot stop a repeat.

    >>> ledger = SqliteLedger(":memory:")
    >>> ledger.begin("k1", "open_ticket", {"order_id": 7}, "thread-1")
    >>> ledger.finish("k1", {"ticket_id": 12})
    >>> ledger.lookup("k1").output
    {'ticket_id': 12}
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._conn = connect(self.path, synchronous="FULL", autocommit=True)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute(
                """CREATE TABLE IF NOT EXISTS keelgraph_effects (
                    key TEXT PRIMARY KEY, tool TEXT NOT NULL, args TEXT NOT NULL,
                    thread_id TEXT NOT NULL, status TEXT NOT NULL, output TEXT,
                    started REAL NOT NULL, finished REAL)"""
            )
            self._conn.execute(
                "CREATE INDEX IF NOT EXISTS keelgraph_effects_thread ON keelgraph_effects(thread_id)"
            )

    def lookup(self, key: str) -> Effect | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT tool, status, output, thread_id FROM keelgraph_effects WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        tool, status, output, thread_id = row
        return Effect(key, tool, status, None if output is None else json.loads(output), thread_id)

    def begin(self, key: str, tool: str, args: Mapping[str, Any], thread_id: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO keelgraph_effects (key, tool, args, thread_id, status, started) "
                "VALUES (?, ?, ?, ?, 'started', ?) "
                "ON CONFLICT(key) DO UPDATE SET status = 'started', started = excluded.started",
                (key, tool, json.dumps(args, default=str), thread_id, time.time()),
            )

    def finish(self, key: str, output: Any) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE keelgraph_effects SET status = 'done', output = ?, finished = ? WHERE key = ?",
                (json.dumps(output, default=str), time.time(), key),
            )

    def forget(self, key: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM keelgraph_effects WHERE key = ? AND status = 'started'", (key,))

    def prune(self, older_than_s: float, now: float | None = None) -> int:
        """Drop `done` records finished more than `older_than_s` ago; returns how many.

        Prune them with the threads they belong to (`keelgraph prune --older-than` does both): a
        record only stops a replay while its thread can still be resumed. `started` records, whose
        outcome is unknown, are kept for a person to check.
        """
        cutoff = (time.time() if now is None else now) - older_than_s
        with self._lock:
            done = self._conn.execute(
                "DELETE FROM keelgraph_effects WHERE status = 'done' AND finished < ?", (cutoff,)
            )
            return int(done.rowcount)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
