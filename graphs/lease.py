"""One writer per thread: keelgraph's checkpointers lease a thread to one run at a time.

LangGraph's savers have no compare-and-set: two runs on one thread both read its latest checkpoint,
both write a child of it, and the later one hides the other's turn (2, 3 and 4 processes x 10 turns
on one thread kept 12, 12 and 14 of 20, 30 and 40 turns, every call returned ok, and each lost turn's
tool effects still happened). `LeasedSqliteSaver`, `LeasedPostgresSaver` and their async twins
(`AsyncLeasedSqliteSaver`; the PostgreSQL ones in `keelgraph.graphs._postgres_lease`, loaded with
the postgres extra) close that gap; `keelgraph.graphs.persistence` opens them:

- **Claim at the start of a run.** The pregel loop's first call to its saver, before it writes or
  runs anything, is `get_tuple` with the run's config (a top-level run's config holds LangGraph's
  runtime and no task id; a `get_state` has neither). There the saver claims the thread's lease row
  (`keelgraph_thread_leases`, in the same database as the checkpoints) in one transaction (SQLite
  `BEGIN IMMEDIATE`, PostgreSQL `SELECT ... FOR UPDATE`), waits up to `wait_s` while another live
  run holds it, then raises `ThreadBusy` from `graph.invoke`: the refused run wrote nothing and ran
  no node. The run's `Hold` (a random owner id) is put in its config, which every later
  `put`/`put_writes` of the run receives.
- **Fence every write.** Each `put` and `put_writes` runs in one transaction with a check that the
  run still owns the lease (else `ThreadBusy`, reason "lost") and, for the run's checkpoints, that
  the thread's latest checkpoint is still the parent this run wrote on (compare-and-set; a writer
  that takes no lease shows up here, reason "changed"). The check, the write and the lease's renewal
  (`ttl_s` from now) commit together.
- **Release at the end of the run.** A checkpoint after which nothing is left to run (no pending
  trigger channel: `__start__`, `branch:to:*`, `join:*`, `__pregel_tasks`), an interrupt
  (`__interrupt__`: the person's answer is a new run, which must be able to claim the thread) or a
  failed task (`__error__`) releases the lease in the same transaction that writes it. A released
  lease keeps its owner, so the run's own last writes still land unless another run took the thread;
  LangGraph saves checkpoints in the background, so a save of the interrupted step that arrives after
  its interrupt does not take the lease back (`_Row.released_on`).
- **Expiry.** A run whose process died on this machine (its pid gone, or reused by a process that
  started later) frees the thread at once; any other run that stops without a last write holds it
  for `ttl_s` after its last write at most. A run that never writes (`invoke(None)` on a finished
  thread, an input LangGraph refuses before it writes) holds it for `claim_s` only, because a run
  that writes does so before its first node starts; with `durability="exit"` (no write until the
  end) the claim is `ttl_s`.

Limits: a graph that stops before a node with `interrupt_before`/`interrupt_after` writes no
interrupt and holds its thread until `ttl_s`; a raw `Pregel` graph whose nodes subscribe to other
channels than StateGraph's triggers would be released after its first checkpoint. A writer that
takes no lease (`update_state`, a plain LangGraph saver) is refused while a live run holds the
thread, and a run that finds such a write under it is refused at its next checkpoint.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import ChannelVersions, Checkpoint, CheckpointMetadata, CheckpointTuple
from langgraph.checkpoint.sqlite import SqliteSaver

from keelgraph.contracts.errors import ThreadBusy, UserError

if TYPE_CHECKING:
    import sqlite3

__all__ = ["LEASE_KEY", "AsyncLeasedSqliteSaver", "Hold", "LeasePolicy", "LeasedSqliteSaver", "holder_alive"]

_T = TypeVar("_T")

LEASE_KEY = "__keelgraph_lease"
"""The run's `Hold` in its config's `configurable` ("__": LangGraph keeps it out of checkpoint metadata)."""
# LangGraph's own config keys (langgraph._internal._constants), pinned by tests/test_thread_lease.py.
_RUNTIME_KEY = "__pregel_runtime"
_TASK_ID_KEY = "__pregel_task_id"
_DURABILITY_KEY = "__pregel_durability"
_ENDING_WRITES = frozenset({"__interrupt__", "__error__"})
_TRIGGERS = ("branch:to:", "join:")
_PENDING = frozenset({"__start__", "__pregel_tasks"})
_RELEASED = 0.0


@dataclass(frozen=True)
class LeasePolicy:
    """How long a run holds its thread and how long another waits for it.

    >>> LeasePolicy(ttl_s=60).claim_hold("async")
    10.0
    """

    ttl_s: float = 300.0
    """A run that has not written for this long loses its thread to the next run that asks
    (`KEELGRAPH_THREAD_LEASE_S`). Keep it above the slowest step of a turn."""
    wait_s: float = 0.0
    """How long a run waits for a held thread before `ThreadBusy` (`KEELGRAPH_THREAD_WAIT_S`)."""
    claim_s: float = 10.0
    """How long a claim lasts before the run's first write renews it to `ttl_s`."""
    poll_s: float = 0.05
    """How often a waiting run looks at the lease again."""

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or self.claim_s <= 0 or self.wait_s < 0 or self.poll_s <= 0:
            raise UserError(
                f"a thread lease needs ttl_s > 0, claim_s > 0, poll_s > 0 and wait_s >= 0, not {self}: "
                "set KEELGRAPH_THREAD_LEASE_S to a positive number of seconds and KEELGRAPH_THREAD_WAIT_S to 0 or more"
            )

    @classmethod
    def from_settings(cls) -> LeasePolicy:
        """`KEELGRAPH_THREAD_LEASE_S` and `KEELGRAPH_THREAD_WAIT_S` (see `keelgraph.settings.Settings`)."""
        from keelgraph.settings import Settings

        settings = Settings.from_env()
        return cls(ttl_s=settings.thread_lease_s, wait_s=settings.thread_wait_s)

    def claim_hold(self, durability: str) -> float:
        """Seconds a fresh claim lasts: `ttl_s` when the run writes only at its end."""
        return self.ttl_s if durability == "exit" else min(self.claim_s, self.ttl_s)


@dataclass(frozen=True)
class Hold:
    """A run's claim on its thread, carried in its config from `get_tuple` to its writes."""

    thread_id: str
    owner: str
    fenced: bool
    """Compare-and-set on the parent checkpoint: off for a run that replays an older checkpoint."""


class _Row(NamedTuple):
    owner: str
    expires_at: float
    released_on: str | None = None
    """The checkpoint whose interrupt or error ends the run: its save releases the lease if the
    interrupt came first, and saves of earlier checkpoints (made in the background, so they can come
    after the interrupt) do not renew it."""


def _entry(config: RunnableConfig) -> tuple[str, bool, str] | None:
    """(thread id, addressed, durability) when this `get_tuple` begins a top-level run, else None."""
    conf = config.get("configurable") or {}
    if _RUNTIME_KEY not in conf or _TASK_ID_KEY in conf or conf.get("checkpoint_ns"):
        return None
    thread = conf.get("thread_id")
    if thread is None:
        return None
    held = conf.get(LEASE_KEY)
    if isinstance(held, Hold) and held.thread_id == str(thread):
        return None  # the run reads its thread again (a replay's lookups)
    return str(thread), bool(conf.get("checkpoint_id")), str(conf.get(_DURABILITY_KEY, "async"))


def _hold(config: RunnableConfig, thread: str) -> Hold | None:
    held = (config.get("configurable") or {}).get(LEASE_KEY)
    return held if isinstance(held, Hold) and held.thread_id == thread else None


def _ends_turn(writes: Sequence[tuple[str, Any]]) -> bool:
    """Whether `writes` stop the run: an interrupt, or a task that failed."""
    return any(channel in _ENDING_WRITES for channel, _ in writes)


def _needs_latest(
    config: RunnableConfig, thread: str, checkpoint: Checkpoint | None, writes: Sequence[tuple[str, Any]]
) -> bool:
    """Whether `_Lease.fence` needs the thread's latest checkpoint id for this write."""
    return _hold(config, thread) is not None and (checkpoint is not None or _ends_turn(writes))


def _ends_run(checkpoint: Checkpoint) -> bool:
    """Whether nothing is left to run after `checkpoint`: no trigger channel holds a value."""
    return not any(k in _PENDING or k.startswith(_TRIGGERS) for k in checkpoint.get("channel_values", {}))


class _Unknown:
    """The thread's latest checkpoint was not looked up (no compare-and-set for this write)."""


@dataclass
class _Lease:
    """The decisions, backend-free: a backend supplies the rows inside its transaction."""

    policy: LeasePolicy

    def busy_for(self, row: _Row | None, owner: str, now: float) -> float | None:
        """Seconds another live run still holds the thread for, or None when `owner` may claim it
        (no holder, its hold expired or released, or its process on this machine is gone)."""
        if row is None or row.owner == owner or row.expires_at <= now or not _process_alive(row.owner):
            return None
        return row.expires_at - now

    def fence(
        self,
        row: _Row | None,
        config: RunnableConfig,
        now: float,
        *,
        latest: str | type[_Unknown] | None = _Unknown,
        checkpoint: Checkpoint | None = None,
        writes: Sequence[tuple[str, Any]] = (),
    ) -> _Row | None:
        """The lease row after this write (None: leave it as it is), or `ThreadBusy`."""
        conf = config["configurable"]
        thread = str(conf["thread_id"])
        root = not conf.get("checkpoint_ns")
        hold = _hold(config, thread)
        if hold is None:  # a writer without a lease (update_state, a subgraph of a non-str thread)
            if root and row is not None and (left := self.busy_for(row, "", now)) is not None:
                raise ThreadBusy(thread, remaining_s=left)
            return None
        if row is None or row.owner != hold.owner:
            raise ThreadBusy(thread, reason="lost")
        if not root:
            return None
        parent = conf.get("checkpoint_id")
        if checkpoint is not None:
            if hold.fenced and latest is not _Unknown and latest != parent:
                raise ThreadBusy(thread, reason="changed")
            if _ends_run(checkpoint) or checkpoint["id"] == row.released_on:
                return row._replace(expires_at=_RELEASED)
            if row.released_on is not None and checkpoint["id"] < row.released_on:
                return None  # an earlier step's save, which LangGraph makes in the background
            return row._replace(expires_at=now + self.policy.ttl_s, released_on=None)
        if _ends_turn(writes):
            # The step's checkpoint may still be on its way (saved in the background): until it is
            # saved, the next run would not see this interrupt, so the lease goes with that save.
            saved = latest == parent
            return row._replace(
                expires_at=_RELEASED if saved else row.expires_at, released_on=str(parent or "")
            )
        return None if row.expires_at == _RELEASED else row._replace(expires_at=now + self.policy.ttl_s)

    @contextmanager
    def fencing(self, cursor: Any) -> Iterator[None]:
        """Inside a fenced transaction: the saver's own statements (LangGraph's `put` and
        `put_writes`) run on `cursor`, in this context only (a thread, or an asyncio task)."""
        token = _FENCED.set((self, cursor))
        try:
            yield
        finally:
            _FENCED.reset(token)

    def fenced_cursor(self) -> Any:
        """The cursor of the fenced transaction this context is in, or None."""
        fenced = _FENCED.get()
        return fenced[1] if fenced is not None and fenced[0] is self else None

    def claim(self, try_claim: Callable[[str, float], float | None], thread: str, hold_s: float) -> str:
        """Claims `thread` with `try_claim(owner, hold_s) -> seconds still held or None`, waiting up to
        `wait_s`; the new owner id, or `ThreadBusy`."""
        owner = f"{_process()}/{uuid.uuid4().hex}"
        began = time.monotonic()
        while (left := try_claim(owner, hold_s)) is not None:
            time.sleep(self._pause(thread, left, time.monotonic() - began))
        return owner

    async def aclaim(
        self, try_claim: Callable[[str, float], Awaitable[float | None]], thread: str, hold_s: float
    ) -> str:
        """The async twin of `claim`."""
        owner = f"{_process()}/{uuid.uuid4().hex}"
        began = time.monotonic()
        while (left := await try_claim(owner, hold_s)) is not None:
            await asyncio.sleep(self._pause(thread, left, time.monotonic() - began))
        return owner

    def _pause(self, thread: str, left: float, waited: float) -> float:
        """How long to wait before asking again, or `ThreadBusy` once `wait_s` is spent."""
        if waited >= self.policy.wait_s:
            raise ThreadBusy(thread, remaining_s=left, waited_s=waited)
        return min(self.policy.poll_s, self.policy.wait_s - waited, left)


_FENCED: ContextVar[tuple[_Lease, Any] | None] = ContextVar("keelgraph_fenced", default=None)


def _process() -> str:
    """This process as "machine:pid:start": the machine's boot id (hostname off Linux) and the
    process's start time (clock ticks since boot), so a reused pid is not taken for the holder.
    Looked up per pid: a forked child is another process."""
    pid = os.getpid()
    if (known := _PROCESSES.get(pid)) is not None:
        return known
    try:
        machine = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        start = _start_time(pid)
    except OSError:
        machine, start = socket.gethostname(), ""
    _PROCESSES[pid] = f"{machine}:{pid}:{start}"
    return _PROCESSES[pid]


def _start_time(pid: int) -> str:
    # Field 22 of /proc/PID/stat; the command name before it may hold spaces, so split after ")".
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _process_alive(owner: str) -> bool:
    """False only when `owner`'s process ran on this machine and is gone (a run in a process that
    was killed mid-turn frees its thread at once instead of after `ttl_s`)."""
    machine, pid, start = [*owner.split("/", 1)[0].split(":"), "", "", ""][:3]
    here = _process().split(":", 1)[0]
    if machine != here or not pid.isdigit():
        return True  # another machine's: only its expiry tells
    try:
        if start:
            return _start_time(int(pid)) == start and _state(int(pid)) != "Z"
        os.kill(int(pid), 0)
    except (ProcessLookupError, FileNotFoundError):
        return False
    except (OSError, IndexError):  # not ours to signal, or unreadable: assume it runs
        return True
    return True


def holder_alive(owner: str) -> bool:
    """Whether the run that holds a lease (the `owner` column of `keelgraph_thread_leases`) may still
    be running: False only when its process ran on this machine and is gone. A server that keeps
    its own record of running runs (`keelgraph.serving.aegra`) uses it to tell a dead run's thread."""
    return _process_alive(owner)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


_PROCESSES: dict[int, str] = {}


def _claimed(config: RunnableConfig, thread: str, owner: str, addressed: bool) -> None:
    # The loop built this dict for this run and passes it (or a copy made after this call) to every
    # put and put_writes of the run; LangGraph writes its own run-time keys into it the same way.
    config["configurable"][LEASE_KEY] = Hold(thread_id=thread, owner=owner, fenced=not addressed)


_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS keelgraph_thread_leases "
    "(thread_id TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL, released_on TEXT)"
)
_SQLITE_ROW = "SELECT owner, expires_at, released_on FROM keelgraph_thread_leases WHERE thread_id = ?"
_SQLITE_SET = (
    "INSERT INTO keelgraph_thread_leases (thread_id, owner, expires_at, released_on) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (thread_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at, "
    "released_on = excluded.released_on"
)
_LATEST = (
    "SELECT checkpoint_id FROM checkpoints WHERE thread_id = {p} AND checkpoint_ns = '' "
    "ORDER BY checkpoint_id DESC LIMIT 1"
)


class LeasedSqliteSaver(SqliteSaver):
    """LangGraph's `SqliteSaver` with a lease per thread: one run writes a thread at a time.

    The module docstring has the design; `policy` defaults to the settings.

    >>> import sqlite3
    >>> saver = LeasedSqliteSaver(sqlite3.connect(":memory:", check_same_thread=False))
    >>> saver.policy.ttl_s > 0
    True
    """

    def __init__(self, conn: sqlite3.Connection, *, policy: LeasePolicy | None = None, **kwargs: Any) -> None:
        super().__init__(conn, **kwargs)
        self.policy = policy or LeasePolicy.from_settings()
        self._lease = _Lease(self.policy)

    def setup(self) -> None:
        if self.is_setup:
            return
        super().setup()
        self.conn.execute(_SQLITE_SCHEMA)
        self.conn.commit()

    @contextmanager
    def cursor(self, transaction: bool = True) -> Iterator[sqlite3.Cursor]:
        if self._lease.fenced_cursor() is None:
            with super().cursor(transaction) as own:
                yield own
            return
        cur = self.conn.cursor()  # inside `_fenced`: its lock and transaction are already held
        try:
            yield cur
        finally:
            cur.close()

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        if entry := _entry(config):
            thread, addressed, durability = entry
            owner = self._lease.claim(
                lambda owner, hold_s: self._try_claim(thread, owner, hold_s),
                thread,
                self.policy.claim_hold(durability),
            )
            _claimed(config, thread, owner, addressed)
        return super().get_tuple(config)

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        with self._fenced(config, checkpoint=checkpoint):
            return super().put(config, checkpoint, metadata, new_versions)

    def put_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        with self._fenced(config, writes=writes):
            super().put_writes(config, writes, task_id, task_path)

    def _try_claim(self, thread: str, owner: str, hold_s: float) -> float | None:
        # Looked at first without the write lock: a waiting run does not queue behind the writers.
        now = time.time()
        with super().cursor(transaction=False) as cur:
            peek = cur.execute(_SQLITE_ROW, (thread,)).fetchone()
        if (left := self._lease.busy_for(_Row(*peek) if peek else None, owner, now)) is not None:
            return left
        with self.lock:
            self.setup()
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                found = self.conn.execute(_SQLITE_ROW, (thread,)).fetchone()
                left = self._lease.busy_for(_Row(*found) if found else None, owner, now)
                if left is None:
                    self.conn.execute(_SQLITE_SET, (thread, owner, now + hold_s, None))
                self.conn.commit()
            except BaseException:
                self.conn.rollback()
                raise
        return left

    @contextmanager
    def _fenced(
        self,
        config: RunnableConfig,
        *,
        checkpoint: Checkpoint | None = None,
        writes: Sequence[tuple[str, Any]] = (),
    ) -> Iterator[None]:
        thread = str(config["configurable"]["thread_id"])
        with self.lock:
            self.setup()
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                found = self.conn.execute(_SQLITE_ROW, (thread,)).fetchone()
                latest: str | type[_Unknown] | None = _Unknown
                if _needs_latest(config, thread, checkpoint, writes):
                    top = self.conn.execute(_LATEST.format(p="?"), (thread,)).fetchone()
                    latest = top[0] if top else None
                row = _Row(*found) if found else None
                after = self._lease.fence(
                    row, config, now, latest=latest, checkpoint=checkpoint, writes=writes
                )
                with self._lease.fencing(self.conn):
                    yield
                if after is not None:
                    self.conn.execute(_SQLITE_SET, (thread, *after))
                self.conn.commit()
            except BaseException:
                self.conn.rollback()
                raise


class AsyncLeasedSqliteSaver(LeasedSqliteSaver):
    """`LeasedSqliteSaver` for async runs (`keelgraph.graphs.persistence.async_checkpointer`): each
    async call runs the sync saver's method whole on one worker thread of its own.

    LangGraph's `AsyncSqliteSaver` goes through aiosqlite, one thread hop per statement: with the
    lease's fence (a transaction, the lease row, the latest checkpoint, the write, the renewal) a
    turn took 151 hops against plain LangGraph's 37, and the hops, not SQLite, were the cost. Here a
    write is one hop, its statements run back to back under the saver's lock, and the sync API
    works from any thread (a `get_state` in async code included). Waiting for a busy thread's
    lease stays on the event loop (`asyncio.sleep` between tries), so a waiting run never holds the
    worker that the lease's holder writes through.

    >>> import sqlite3
    >>> saver = AsyncLeasedSqliteSaver(sqlite3.connect(":memory:", check_same_thread=False))
    >>> saver.close()
    """

    def __init__(self, conn: sqlite3.Connection, *, policy: LeasePolicy | None = None, **kwargs: Any) -> None:
        super().__init__(conn, policy=policy, **kwargs)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keelgraph-sqlite")

    def close(self) -> None:
        """Stop the worker thread (the connection is its opener's to close)."""
        self._worker.shutdown(wait=True)

    async def _run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(fn, *args, **kwargs))

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        if entry := _entry(config):
            thread, addressed, durability = entry
            owner = await self._lease.aclaim(
                lambda owner, hold_s: self._run(self._try_claim, thread, owner, hold_s),
                thread,
                self.policy.claim_hold(durability),
            )
            _claimed(config, thread, owner, addressed)
        return await self._run(SqliteSaver.get_tuple, self, config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        found = await self._run(lambda: list(self.list(config, filter=filter, before=before, limit=limit)))
        for item in found:
            yield item

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await self._run(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        await self._run(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await self._run(self.delete_thread, thread_id)

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, Any]:
        return await self._run(self.get_delta_channel_history, config=config, channels=channels)
