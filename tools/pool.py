"""A bounded pool of threads for tool calls: a hung call keeps its thread until it returns, and no
more threads are started than the pool has workers.

A Python thread cannot be killed, so a tool call that runs past its deadline is abandoned, not
stopped. Each abandoned call still holds one of the pool's `size` workers until it returns; when
every worker is held by such a call, a new call is refused at once (`PoolFull`) instead of
starting one more thread that may never end. A graph has one pool (`GraphOptions.tool_workers`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

__all__ = ["DEFAULT_WORKERS", "Job", "PoolFull", "ToolPool", "bounds", "running_in", "shared_pool"]

DEFAULT_WORKERS = 8
"""Workers of a graph's pool (`GraphOptions.tool_workers`) and of the pool shared by calls made
outside a graph."""

HUNG = (
    "{name} was not started: all {size} tool workers are held by earlier calls that did not finish "
    "(a hung tool keeps its worker until it returns)"
)
HUNG_FIX = "answer with what you know; the operator must fix the tool that hangs, or raise tool_workers"
BUSY = "{name} was not started within {wait:g} s: all {size} tool workers were busy"
BUSY_FIX = "answer with what you know, or ask for fewer tool calls at once"


class PoolFull(Exception):
    """No worker was free for a call; `reason` and `fix` are written for the model."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason, self.fix = reason, fix


@dataclass(eq=False)
class Job:
    """One call running on a worker of a `ToolPool`."""

    run: Callable[[], None]
    name: str = "call"
    done: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False
    """Its caller stopped waiting (the deadline passed); it holds its worker until it returns."""
    finished: bool = False


IDLE_S = 2.0
"""Seconds a worker whose call returned waits for the next call before its thread ends: in a busy
stretch calls reuse threads (starting one took about 1 ms a call), and an idle graph keeps none."""


@dataclass(eq=False)
class _Idle:
    """A worker thread between calls, waiting for `job`."""

    ready: threading.Event = field(default_factory=threading.Event)
    job: Job | None = None


class ToolPool:
    """At most `size` threads running tool calls at a time; a thread whose call returned takes the
    next call if one comes within `IDLE_S`, and ends otherwise.

    >>> pool = ToolPool(2)
    >>> job = pool.start(lambda: None, name="noop", wait_s=1)
    >>> pool.wait(job, 1), pool.held
    (True, 0)
    """

    def __init__(self, size: int = DEFAULT_WORKERS) -> None:
        if size < 1:
            raise ValueError(f"a tool pool needs at least one worker, got {size}")
        self.size = size
        self._cond = threading.Condition()
        self._held = 0
        self._hung = 0
        self._idle: list[_Idle] = []

    @property
    def held(self) -> int:
        """Workers running a call now, abandoned ones included (each is one thread)."""
        return self._held

    @property
    def hung(self) -> int:
        """Workers held by calls whose callers gave up on them."""
        return self._hung

    def start(self, run: Callable[[], None], *, name: str, wait_s: float) -> Job:
        """Run `run` on a worker thread. With every worker busy, wait up to `wait_s` for one to come
        free; raise `PoolFull` when none does, or at once when every worker is held by a call that
        did not finish (waiting would not help)."""
        end = time.monotonic() + max(wait_s, 0.0)
        with self._cond:
            while self._held >= self.size:
                if self._hung >= self.size:
                    raise PoolFull(HUNG.format(name=name, size=self.size), HUNG_FIX)
                left = end - time.monotonic()
                if left <= 0:
                    raise PoolFull(BUSY.format(name=name, wait=round(wait_s, 2), size=self.size), BUSY_FIX)
                self._cond.wait(left)
            self._held += 1
            job = Job(run, name)
            if self._idle:
                idle = self._idle.pop()
                idle.job = job
                idle.ready.set()
                return job
        try:
            threading.Thread(
                target=self._work, args=(job,), name=f"keelgraph-tool-{name}", daemon=True
            ).start()
        except RuntimeError as exc:  # the process cannot start another thread
            with self._cond:
                self._held -= 1
                self._cond.notify_all()
            raise PoolFull(f"{name} was not started: {exc}", HUNG_FIX) from exc
        return job

    def wait(self, job: Job, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for `job`; False when it is still running, and then it is
        abandoned: its worker stays held until it returns, and counts as hung."""
        if job.done.wait(max(timeout_s, 0.0)):
            return True
        with self._cond:
            if job.finished:
                return True
            if not job.abandoned:
                job.abandoned = True
                self._hung += 1
                self._cond.notify_all()  # waiters may now see every worker hung
        return False

    def _work(self, job: Job) -> None:
        idle = _Idle()
        current: Job | None = job
        while current is not None:
            threading.current_thread().name = f"keelgraph-tool-{current.name}"
            try:
                current.run()
            finally:
                with self._cond:
                    current.finished = True
                    self._held -= 1
                    self._hung -= current.abandoned
                    idle.job = None
                    idle.ready.clear()
                    self._idle.append(idle)
                    self._cond.notify_all()
                current.done.set()
            if not idle.ready.wait(IDLE_S):
                with self._cond:
                    if idle in self._idle:  # no call came: this thread ends
                        self._idle.remove(idle)
                        return
            current = idle.job  # handed over by `start` (under the lock) as the wait ended


_SHARED: list[ToolPool] = []
_SHARED_LOCK = threading.Lock()
_BOUNDS: ContextVar[tuple[ToolPool, float | None] | None] = ContextVar("keelgraph_tool_bounds", default=None)


def shared_pool() -> ToolPool:
    """The pool of tool calls made outside a graph (`run_tool_call` called directly)."""
    with _SHARED_LOCK:
        if not _SHARED:
            _SHARED.append(ToolPool(DEFAULT_WORKERS))
        return _SHARED[0]


@contextmanager
def running_in(pool: ToolPool, deadline: float | None = None) -> Iterator[None]:
    """Tool calls made in this block (`run_tool_call`, also through `run_once`) run on `pool`, and
    none runs past `deadline` (epoch seconds; None: only the tools' own deadlines)."""
    token = _BOUNDS.set((pool, deadline))
    try:
        yield
    finally:
        _BOUNDS.reset(token)


def bounds() -> tuple[ToolPool, float | None]:
    """The pool and turn deadline of the calls made here (see `running_in`)."""
    found = _BOUNDS.get()
    return found if found is not None else (shared_pool(), None)
