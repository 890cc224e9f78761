"""Retention for the SQLite checkpoint file: keep the latest checkpoints, drop idle threads, VACUUM.

LangGraph's SQLite saver stores every channel value in every checkpoint, so the newest checkpoint
of a thread is its whole state: older ones only serve time travel (`get_state_history`) and can go.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from keelgraph.contracts.errors import UserError

__all__ = ["PruneReport", "checkpoint_time", "parse_age", "prune"]

_UUID_EPOCH = 0x01B21DD213814000
"""100-ns intervals between the UUID epoch (1582-10-15) and the Unix epoch."""


def checkpoint_time(checkpoint_id: str) -> float:
    """When a checkpoint was written (Unix seconds), read from its UUIDv6 id.

    >>> round(checkpoint_time("1f0c9d3a-3b9e-6d2c-8000-000000000000"))
    1764057127
    """
    hexits = checkpoint_id.replace("-", "")
    if len(hexits) != 32 or hexits[12] != "6":
        raise ValueError(f"not a UUIDv6 checkpoint id: {checkpoint_id!r}")
    ticks = (int(hexits[:8], 16) << 28) | (int(hexits[8:12], 16) << 12) | int(hexits[13:16], 16)
    return (ticks - _UUID_EPOCH) / 1e7


@dataclass(frozen=True)
class PruneReport:
    threads_dropped: int
    checkpoints_deleted: int
    writes_deleted: int
    checkpoints_left: int
    bytes_before: int
    bytes_after: int

    def lines(self) -> list[str]:
        return [
            f"threads dropped     : {self.threads_dropped}",
            f"checkpoints deleted : {self.checkpoints_deleted} ({self.checkpoints_left} left)",
            f"pending writes gone : {self.writes_deleted}",
            f"file size           : {self.bytes_before / 1e6:.2f} MB -> {self.bytes_after / 1e6:.2f} MB",
        ]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def parse_age(text: str) -> float:
    """Seconds in `30d`, `12h`, `90m` or `45s`.

    >>> parse_age("2d"), parse_age("90m")
    (172800.0, 5400.0)
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not found:
        raise UserError(f"age {text!r} is not like 30d, 12h, 90m or 45s")
    return float(found.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]


def prune(
    path: str | Path,
    *,
    keep_last: int | None = None,
    older_than_s: float | None = None,
    vacuum: bool = True,
    now: float | None = None,
) -> PruneReport:
    """Prune the checkpoint database at `path` (safe while graphs use it: one write transaction).

    - `keep_last=N`: keep the N newest checkpoints of each thread (and namespace); N >= 1, since
      the newest one is the thread's state.
    - `older_than_s=T`: drop whole threads whose newest checkpoint is older than T seconds.
    - `vacuum`: give the freed pages back to the file system (and truncate the WAL).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint database at {path}")
    if keep_last is not None and keep_last < 1:
        raise UserError("keep_last must be at least 1: the newest checkpoint is the thread's state")
    before = _size(path)
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"checkpoints", "writes"} <= tables:
            raise UserError(f"{path} is not a LangGraph SQLite checkpoint database")
        conn.execute("BEGIN IMMEDIATE")
        count = "SELECT (SELECT COUNT(*) FROM checkpoints), (SELECT COUNT(*) FROM writes)"
        checkpoints_before, writes_before = conn.execute(count).fetchone()
        dropped = 0
        if older_than_s is not None:
            cutoff = (time.time() if now is None else now) - older_than_s
            newest = conn.execute("SELECT thread_id, MAX(checkpoint_id) FROM checkpoints GROUP BY thread_id")
            idle = [(thread,) for thread, last in newest.fetchall() if checkpoint_time(last) < cutoff]
            conn.executemany("DELETE FROM checkpoints WHERE thread_id = ?", idle)
            dropped = len(idle)
        if keep_last is not None:
            conn.execute(
                """DELETE FROM checkpoints WHERE rowid IN (
                     SELECT rowid FROM (
                       SELECT rowid, ROW_NUMBER() OVER (
                         PARTITION BY thread_id, checkpoint_ns ORDER BY checkpoint_id DESC) AS n
                       FROM checkpoints)
                     WHERE n > ?)""",
                (keep_last,),
            )
        # Pending writes belong to a checkpoint: those of deleted checkpoints go with them.
        conn.execute(
            """DELETE FROM writes WHERE NOT EXISTS (
                 SELECT 1 FROM checkpoints c WHERE c.thread_id = writes.thread_id
                   AND c.checkpoint_ns = writes.checkpoint_ns AND c.checkpoint_id = writes.checkpoint_id)"""
        )
        checkpoints_left, writes_left = conn.execute(count).fetchone()
        conn.execute("COMMIT")
        if vacuum:
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return PruneReport(
        threads_dropped=dropped,
        checkpoints_deleted=int(checkpoints_before - checkpoints_left),
        writes_deleted=int(writes_before - writes_left),
        checkpoints_left=int(checkpoints_left),
        bytes_before=before,
        bytes_after=_size(path),
    )
