"""Long jobs as tools: start a LangGraph subgraph or a function in the background, then ask how it is doing.

A tool call must return in seconds; a report, an import or a multi-step subgraph may take minutes.
`workflow_tools` turns such a job into two or three tools: `start_<name>` records the job in a
SQLite file and returns its id at once, a worker thread runs it, and `<name>_status` reads how far
it got and what it returned. The record outlives the process: after a restart, a graph job resumes
from its last checkpoint, a queued job still runs, and a function cut off mid-way is marked failed
with a message that says so. Nothing is silently lost or left `running` forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import math
import os
import queue
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Literal, TypeAlias

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph.state import CompiledStateGraph
from langgraph.pregel import Pregel
from pydantic import BaseModel, ConfigDict, Field

from keelgraph.contracts.errors import KeelgraphError, UserError
from keelgraph.contracts.parsing import INT64_MAX, INT64_MIN
from keelgraph.tools.execution import with_policy
from keelgraph.tools.ledger import effect_key

__all__ = [
    "Job",
    "JobCancelled",
    "JobStatus",
    "Recovery",
    "UnknownJob",
    "WorkflowError",
    "WorkflowRunner",
    "workflow_tools",
]

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
"""`queued` and `running` jobs are open; `done`, `failed` and `cancelled` ones are final."""

Job: TypeAlias = CompiledStateGraph[Any, Any, Any, Any] | Callable[..., Any]
"""What a workflow runs: a compiled LangGraph graph, or a function (sync or async) of the arguments."""

RESTART_ERROR: Final = "interrupted by a restart; start it again"
"""The error of a function job that was running when its process stopped (it cannot be resumed)."""

_log = logging.getLogger("keelgraph")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,57}$")  # start_, cancel_ and _status keep tool names within 64
_FINAL: Final = frozenset({"done", "failed", "cancelled"})
_REPORT_EVERY_S: Final = 0.1
"""A progress report this soon after the last one, with the same message, is not written."""
_MAX_ERROR_CHARS: Final = 2_000
_KEYWORD: Final = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_NAMED: Final = (inspect.Parameter.POSITIONAL_ONLY, *_KEYWORD)
"""Parameters that need a value unless they have a default (`*args` and `**kwargs` do not)."""
_HOST: Final = socket.gethostname()

_LIVE_RUNNERS: set[str] = set()
"""Ids of this process's runners that may still be running jobs (another runner must not take them)."""
_LIVE_LOCK = threading.Lock()

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS keelgraph_jobs (
        job_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, idempotency_key TEXT, args TEXT NOT NULL,
        status TEXT NOT NULL, progress REAL, message TEXT, last_node TEXT, result TEXT, error TEXT,
        owner_id TEXT NOT NULL, cancel_requested INTEGER NOT NULL DEFAULT 0,
        restarts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL, started_at REAL, finished_at REAL)""",
    # NULL keys are distinct in a SQLite unique index: jobs started without a key never collide.
    "CREATE UNIQUE INDEX IF NOT EXISTS keelgraph_jobs_key ON keelgraph_jobs(workflow, idempotency_key)",
    "CREATE INDEX IF NOT EXISTS keelgraph_jobs_open ON keelgraph_jobs(status) "
    "WHERE status IN ('queued', 'running')",
    """CREATE TABLE IF NOT EXISTS keelgraph_job_owners (
        owner_id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, process TEXT,
        heartbeat REAL NOT NULL)""",
)
_COLUMNS: Final = (
    "job_id, workflow, args, status, progress, message, last_node, result, error, restarts, "
    "created_at, started_at, finished_at"
)


class WorkflowError(KeelgraphError, ToolException):
    """A workflow tool call that cannot be done: `reason` says why and `fix` what to do instead.

    `run_tool_call` hands the message to the model as its next prompt.

    >>> str(WorkflowError("job x is done", "read its result with report_status"))
    'job x is done; read its result with report_status'
    """

    code: ClassVar[str] = "workflow_error"

    def __init__(self, reason: str, fix: str) -> None:
        self.reason = reason
        self.fix = fix
        super().__init__(f"{reason}; {fix}")


class UnknownJob(WorkflowError):
    """No job of this workflow has the given id."""

    code = "workflow_unknown_job"


class JobCancelled(BaseException):
    """Raised inside a function job by `report(...)` once its cancellation was asked for.

    A `BaseException`, like `asyncio.CancelledError`, so an `except Exception` in the job does not
    swallow it; let it propagate and the job ends `cancelled`.
    """


@dataclass(frozen=True)
class Recovery:
    """What `WorkflowRunner.recover()` did with the open jobs of processes that stopped."""

    resumed: list[str] = field(default_factory=list)
    """Graph jobs that go on from their last checkpoint."""
    requeued: list[str] = field(default_factory=list)
    """Jobs that had not started yet: they run now."""
    failed: list[str] = field(default_factory=list)
    """Jobs cut off mid-way that cannot resume (functions, graphs without a checkpointer)."""


@dataclass(frozen=True)
class _Workflow:
    name: str
    args: type[BaseModel]
    graph: Pregel[Any, Any, Any, Any] | None
    function: Callable[..., Any] | None
    resumable: bool
    """A graph job with a checkpointer: after a restart it goes on from its last checkpoint."""
    takes_report: bool


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    """`value` as JSON can carry it: models and dataclasses as objects, odd numbers and types as text.

    >>> _jsonable({"when": date(2026, 1, 2), "big": 2**70, "tags": {"a"}, "x": float("nan")})
    {'when': '2026-01-02', 'big': '1180591620717411303424', 'tags': ['a'], 'x': 'NaN'}
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(value, BaseModel):
        return _jsonable(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return str(value)


def _describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_CHARS else f"{text[:_MAX_ERROR_CHARS]}... [cut]"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'
    return fields[0], fields[19]


def _process_marker(pid: int) -> str | None:
    """Tells this process from a later one given the same pid (after it died, or after a reboot)."""
    stat = _proc_stat(pid)
    return None if stat is None else f"{_boot_id()}:{stat[1]}"


def _process_alive(pid: int, marker: str | None) -> bool:
    """Whether the process `pid` of this machine, started as `marker`, still runs."""
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C there: rely on the heartbeat instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _proc_stat(pid)
    if stat is None:
        return True
    if stat[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    return marker is None or marker == f"{_boot_id()}:{stat[1]}"


class _Progress:
    """The `report(fraction, message)` handed to a function job; raises `JobCancelled` when asked to stop."""

    def __init__(self, runner: WorkflowRunner, job_id: str) -> None:
        self._runner = runner
        self._job_id = job_id
        self._last_at = -math.inf
        self._last_message: str | None = None

    def __call__(self, fraction: float | None, message: str | None = None) -> None:
        if fraction is not None and not (
            isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 <= fraction <= 1
        ):
            raise UserError(f"report(): fraction must be a number from 0 to 1, or None; not {fraction!r}")
        now = time.monotonic()
        if now - self._last_at < _REPORT_EVERY_S and message == self._last_message:
            return
        self._last_at, self._last_message = now, message
        if self._runner._record_progress(self._job_id, fraction, message):
            raise JobCancelled(self._job_id)


class WorkflowRunner:
    """Runs workflow jobs on a few worker threads and keeps their records in a SQLite file.

    `store` is the file (created if missing; WAL, so several threads and processes can share it).
    A job is run by one of `max_workers` daemon threads: a process may exit while jobs run, and
    the next runner on the same file takes them up (see `recover`). Each runner announces itself
    in the file every `heartbeat_s`; jobs of a runner on another machine (or container) that has
    not done so for `stale_after_s` count as abandoned. A graph job is resumed at most
    `max_restarts` times (one that kills its process every time is not retried forever). Close
    the runner (or use `with`) to stop taking jobs: queued ones stay queued in the file for the
    next runner.

    >>> import tempfile
    >>> from pydantic import BaseModel
    >>> class Number(BaseModel):
    ...     n: int
    >>> def double(n: int) -> int:
    ...     return 2 * n
    >>> with WorkflowRunner(f"{tempfile.mkdtemp()}/jobs.db") as runner:
    ...     runner.register("double", double, args=Number)
    ...     runner.wait(runner.start("double", {"n": 21}))["result"]
    42
    """

    def __init__(
        self,
        store: str | Path,
        *,
        max_workers: int = 2,
        heartbeat_s: float = 5.0,
        stale_after_s: float = 60.0,
        max_restarts: int = 3,
    ) -> None:
        if str(store) == ":memory:" or str(store).startswith("file::memory:"):
            raise UserError("WorkflowRunner: job records must outlive the process; give a file path as store")
        if max_workers < 1:
            raise UserError(f"WorkflowRunner: max_workers must be at least 1, not {max_workers}")
        if not 0 < heartbeat_s < stale_after_s:
            raise UserError("WorkflowRunner: need 0 < heartbeat_s < stale_after_s")
        self.path = Path(store)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_workers = max_workers
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.max_restarts = max_restarts
        self._id = uuid.uuid4().hex
        self._flows: dict[str, _Workflow] = {}
        self._flows_lock = threading.Lock()
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._stopped = threading.Event()
        self._retired = False
        self._retire_lock = threading.Lock()
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent: set once for the file
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO keelgraph_job_owners (owner_id, host, pid, process, heartbeat) VALUES (?, ?, ?, ?, ?)",
                (self._id, _HOST, os.getpid(), _process_marker(os.getpid()), time.time()),
            )
        with _LIVE_LOCK:
            _LIVE_RUNNERS.add(self._id)
        self._workers = [
            threading.Thread(target=self._work, name=f"keelgraph-workflow-{i}", daemon=True)
            for i in range(max_workers)
        ]
        for worker in self._workers:
            worker.start()
        self._heart = threading.Thread(target=self._beat, name="keelgraph-workflow-heartbeat", daemon=True)
        self._heart.start()

    # -- the store ------------------------------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection per operation (any thread may call), autocommit, waiting out locks."""
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            # A record that says a job started must outlive a power cut, or a repeat starts it twice.
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    def _row(self, job_id: str) -> dict[str, Any] | None:
        with self._connect() as conn:
            cursor = conn.execute(f"SELECT {_COLUMNS} FROM keelgraph_jobs WHERE job_id = ?", (job_id,))
            row = cursor.fetchone()
            names = [d[0] for d in cursor.description]
        return None if row is None else dict(zip(names, row, strict=True))

    # -- declaring workflows ----------------------------------------------------------------------

    def register(
        self,
        name: str,
        job: Job,
        *,
        args: type[BaseModel],
        checkpointer: BaseCheckpointSaver[Any] | None = None,
    ) -> None:
        """Declare the workflow `name`: what it runs and the arguments it takes.

        A graph job runs with `thread_id` = the job id on `checkpointer` (or the one it was compiled
        with), so it can resume after a restart; without either it cannot. A function job gets
        the arguments as keywords, plus `report=` (`report(fraction, message)`) if it has a
        parameter of that name. Open jobs of `name` left by a process that stopped are recovered now.
        """
        where = f"workflow {name!r}"
        if not _NAME.match(name):
            raise UserError(f"{where}: a name is 1-57 letters, digits, '_' or '-' (it goes into tool names)")
        if not (isinstance(args, type) and issubclass(args, BaseModel)):
            raise UserError(f"{where}: args must be a Pydantic model class")
        if isinstance(job, Pregel):
            graph = job.copy(update={"checkpointer": checkpointer}) if checkpointer is not None else job
            flow = _Workflow(
                name,
                args,
                graph=graph,
                function=None,
                resumable=isinstance(graph.checkpointer, BaseCheckpointSaver),
                takes_report=False,
            )
        elif callable(job):
            flow = _Workflow(
                name,
                args,
                graph=None,
                function=job,
                resumable=False,
                takes_report=_check_function(where, job, args),
            )
        else:
            raise UserError(
                f"{where}: job must be a compiled LangGraph graph or a function, not {type(job).__name__}"
            )
        with self._flows_lock:
            if name in self._flows:
                raise UserError(
                    f"{where} is already registered with this runner; give each workflow its own name"
                )
            self._flows[name] = flow
        self._recover({name})

    def _flow(self, name: str) -> _Workflow:
        with self._flows_lock:
            flow = self._flows.get(name)
        if flow is None:
            raise UserError(f"no workflow {name!r} is registered with this runner; call register() first")
        return flow

    # -- starting, reading, cancelling --------------------------------------------------------------

    def start(self, name: str, args: Mapping[str, Any] | BaseModel, *, key: str | None = None) -> str:
        """Queue a job of workflow `name` and return its id at once.

        With an idempotency `key`, starting again with the same key returns the first job's id and
        starts nothing (the start tool passes `effect_key()`).
        """
        return self._submit(name, args, key)[0]

    def _submit(self, name: str, args: Mapping[str, Any] | BaseModel, key: str | None) -> tuple[str, bool]:
        """(job id, whether a new job was created)."""
        flow = self._flow(name)
        if self._closing.is_set():
            raise UserError("this WorkflowRunner is closed; create a new one to start jobs")
        values = args.model_dump() if isinstance(args, BaseModel) else dict(args)
        model = flow.args.model_validate(values)
        job_id = f"{name}-{uuid.uuid4().hex[:12]}"
        with self._connect() as conn:
            created = conn.execute(
                "INSERT INTO keelgraph_jobs (job_id, workflow, idempotency_key, args, status, owner_id, "
                "created_at) VALUES (?, ?, ?, ?, 'queued', ?, ?) "
                "ON CONFLICT(workflow, idempotency_key) DO NOTHING",
                (job_id, name, key, json.dumps(model.model_dump(mode="json")), self._id, time.time()),
            ).rowcount
            if not created:
                (job_id,) = conn.execute(
                    "SELECT job_id FROM keelgraph_jobs WHERE workflow = ? AND idempotency_key = ?",
                    (name, key),
                ).fetchone()
                return str(job_id), False
        self._queue.put(job_id)
        return job_id, True

    def status(self, job_id: str) -> dict[str, Any]:
        """The job's record as JSON data; raises `UnknownJob` for an id this store never gave out.

        Keys: job_id, workflow, args, status (queued, running, done, failed, cancelled), progress
        (0-1 or None), message (the job's latest progress message), last_node (graph jobs), result,
        error, restarts (resumptions after a restart), created_at, started_at, finished_at (ISO 8601
        UTC, or None).
        """
        row = self._row(job_id)
        if row is None:
            raise UnknownJob(f"no job has the id {job_id!r}", "use a job_id that a start tool returned")
        row["args"] = json.loads(row["args"])
        row["result"] = None if row["result"] is None else json.loads(row["result"])
        for stamp in ("created_at", "started_at", "finished_at"):
            row[stamp] = _iso(row[stamp])
        return row

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one at once; a running one at its next progress report or node.

        Returns the job's status. A function job that never calls `report` cannot be stopped: it
        runs to its end (its status then says so).
        """
        with self._connect() as conn:
            conn.execute(
                "UPDATE keelgraph_jobs SET status = 'cancelled', cancel_requested = 1, finished_at = ? "
                "WHERE job_id = ? AND status = 'queued'",
                (time.time(), job_id),
            )
            conn.execute(
                "UPDATE keelgraph_jobs SET cancel_requested = 1 WHERE job_id = ? AND status = 'running'",
                (job_id,),
            )
        return self.status(job_id)

    def wait(self, job_id: str, timeout_s: float = 60.0, poll_s: float = 0.05) -> dict[str, Any]:
        """Block until the job is done, failed or cancelled, and return its status.

        Raises `TimeoutError` if it is still open after `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.status(job_id)
            if found["status"] in _FINAL:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {found['status']} after {timeout_s:g} s")
            time.sleep(poll_s)

    # -- running ------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None or self._closing.is_set():
                return  # a job taken off the queue now stays queued in the store for the next runner
            try:
                self._run(job_id)
            except Exception:  # the store itself failed: the record stays open, recover() sees to it
                _log.exception("workflow job %s could not be run", job_id)

    def _run(self, job_id: str) -> None:
        with self._connect() as conn:
            claimed = conn.execute(
                "UPDATE keelgraph_jobs SET status = 'running', started_at = COALESCE(started_at, ?) "
                "WHERE job_id = ? AND status = 'queued' AND owner_id = ?",
                (time.time(), job_id, self._id),
            ).rowcount
            if not claimed:  # cancelled while queued, or taken over by another runner
                return
            name, stored = conn.execute(
                "SELECT workflow, args FROM keelgraph_jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        try:
            flow = self._flow(name)
            model = flow.args.model_validate(json.loads(stored))
            values = {key: getattr(model, key) for key in type(model).model_fields}
            if flow.graph is not None:
                result = self._run_graph(flow.graph, job_id, values, resume=flow.resumable)
            else:
                result = self._run_function(flow, job_id, values)
        except JobCancelled:
            self._finish(job_id, "cancelled", error="cancelled on request")
        except BaseException as exc:  # the job's own failure (SystemExit included) is its result
            _log.warning("workflow job %s failed", job_id, exc_info=exc)
            self._finish(job_id, "failed", error=_describe_error(exc))
        else:
            self._finish(job_id, "done", result=_jsonable(result))

    def _run_function(self, flow: _Workflow, job_id: str, values: dict[str, Any]) -> Any:
        assert flow.function is not None
        if flow.takes_report:
            values["report"] = _Progress(self, job_id)
        result = flow.function(**values)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
        return result

    def _run_graph(
        self, graph: Pregel[Any, Any, Any, Any], job_id: str, values: dict[str, Any], *, resume: bool
    ) -> Any:
        config: RunnableConfig = {"configurable": {"thread_id": job_id}}
        start: dict[str, Any] | None = values
        if resume and graph.get_state(config).created_at is not None:
            start = None  # a checkpoint exists: go on from it (after a restart)
        result: Any = None
        # durability="sync": each node's checkpoint is written before the next node starts, so a
        # process killed mid-graph loses at most the node it was in.
        stream = graph.stream(start, config, stream_mode=["updates", "values"], durability="sync")
        try:
            for mode, chunk in stream:
                if mode == "values":
                    result = chunk
                    continue
                if "__interrupt__" in chunk:
                    raise RuntimeError(
                        "the workflow stopped at an interrupt() to wait for a person's input, which a "
                        "background job cannot give; run this graph directly, or remove the interrupt"
                    )
                nodes = [node for node in chunk if not node.startswith("__")]
                if nodes and self._record_node(job_id, nodes[-1]):
                    raise JobCancelled(job_id)
        finally:
            close = getattr(stream, "close", None)
            if callable(close):  # stops the graph at once rather than when the generator is collected
                close()
        return result

    def _record_progress(self, job_id: str, fraction: float | None, message: str | None) -> bool:
        """Write a function job's progress; True if its cancellation was asked for."""
        with self._connect() as conn:
            conn.execute(
                "UPDATE keelgraph_jobs SET progress = ?, message = COALESCE(?, message) WHERE job_id = ?",
                (fraction, message, job_id),
            )
            (cancel,) = conn.execute(
                "SELECT cancel_requested FROM keelgraph_jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return bool(cancel)

    def _record_node(self, job_id: str, node: str) -> bool:
        """Write a graph job's last completed node; True if its cancellation was asked for."""
        with self._connect() as conn:
            conn.execute(
                "UPDATE keelgraph_jobs SET last_node = ?, message = ? WHERE job_id = ?",
                (node, f"completed node {node}", job_id),
            )
            (cancel,) = conn.execute(
                "SELECT cancel_requested FROM keelgraph_jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return bool(cancel)

    def _finish(
        self, job_id: str, status: JobStatus, *, result: Any = None, error: str | None = None
    ) -> None:
        with self._connect() as conn:
            conn.execute(
                "UPDATE keelgraph_jobs SET status = ?, result = ?, error = ?, finished_at = ?, "
                "progress = CASE WHEN ? = 'done' THEN 1.0 ELSE progress END "
                "WHERE job_id = ? AND owner_id = ? AND status = 'running'",
                (
                    status,
                    json.dumps(result) if status == "done" else None,
                    error,
                    time.time(),
                    status,
                    job_id,
                    self._id,
                ),
            )

    # -- restarts -----------------------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Take over the open jobs of this runner's workflows whose process has stopped.

        A graph job with a checkpointer resumes from its last checkpoint (up to `max_restarts`
        times); a job that had not started runs now; any other job that was running is marked
        failed with "interrupted by a restart; start it again". Runs on `register` and every `heartbeat_s`; call it to force one.
        Jobs of a workflow this runner has not registered are left for a runner that has.
        """
        with self._flows_lock:
            names = set(self._flows)
        return self._recover(names)

    def _recover(self, names: Iterable[str]) -> Recovery:
        names = list(names)
        done = Recovery()
        if not names or self._closing.is_set():
            return done
        marks = ", ".join("?" for _ in names)
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT job_id, workflow, status, owner_id, cancel_requested, restarts FROM keelgraph_jobs "
                f"WHERE status IN ('queued', 'running') AND owner_id != ? AND workflow IN ({marks}) "
                "ORDER BY created_at",
                (self._id, *names),
            ).fetchall()
            owners = {
                row[0]: row[1:]
                for row in conn.execute(
                    "SELECT owner_id, host, pid, process, heartbeat FROM keelgraph_job_owners"
                )
            }
            now = time.time()
            for job_id, name, status, owner, cancel, restarts in rows:
                if self._owner_alive(owner, owners.get(owner), now):
                    continue
                flow = self._flow(name)
                claim = "WHERE job_id = ? AND owner_id = ? AND status = ?"  # only one runner takes it
                if cancel:
                    conn.execute(
                        f"UPDATE keelgraph_jobs SET status = 'cancelled', error = 'cancelled on request', "
                        f"finished_at = ?, owner_id = ? {claim}",
                        (now, self._id, job_id, owner, status),
                    )
                elif status == "queued":
                    if conn.execute(
                        f"UPDATE keelgraph_jobs SET owner_id = ? {claim}", (self._id, job_id, owner, status)
                    ).rowcount:
                        done.requeued.append(job_id)
                elif flow.resumable and restarts < self.max_restarts:
                    if conn.execute(
                        "UPDATE keelgraph_jobs SET owner_id = ?, status = 'queued', restarts = restarts + 1, "
                        f"message = 'resuming after a restart from its last checkpoint' {claim}",
                        (self._id, job_id, owner, status),
                    ).rowcount:
                        done.resumed.append(job_id)
                else:
                    error = RESTART_ERROR
                    if flow.resumable:
                        error = (
                            f"interrupted by a restart after {restarts} resumption(s), the most allowed "
                            "(it may be what stops the process); start it again once the cause is fixed"
                        )
                    elif flow.graph is not None:
                        error = (
                            "interrupted by a restart, with no checkpointer to resume from; start it again"
                        )
                    if conn.execute(
                        f"UPDATE keelgraph_jobs SET status = 'failed', error = ?, finished_at = ?, owner_id = ? {claim}",
                        (error, now, self._id, job_id, owner, status),
                    ).rowcount:
                        done.failed.append(job_id)
        for job_id in done.resumed + done.requeued:
            self._queue.put(job_id)
        if done.resumed or done.requeued or done.failed:
            _log.info("workflow jobs recovered: %s", done)
        return done

    def _owner_alive(self, owner: str, record: tuple[Any, ...] | None, now: float) -> bool:
        with _LIVE_LOCK:
            if owner in _LIVE_RUNNERS:
                return True
        if record is None:  # a runner that closed (its row is removed once its jobs have ended)
            return False
        host, pid, marker, heartbeat = record
        if host == _HOST:
            return pid != os.getpid() and _process_alive(int(pid), marker)
        return bool(now - float(heartbeat) < self.stale_after_s)

    def _beat(self) -> None:
        while not self._stopped.wait(self.heartbeat_s):
            try:
                with self._connect() as conn:
                    conn.execute(
                        "UPDATE keelgraph_job_owners SET heartbeat = ? WHERE owner_id = ?",
                        (time.time(), self._id),
                    )
                if self._closing.is_set():
                    if not any(worker.is_alive() for worker in self._workers):
                        self._retire()
                        return
                else:
                    self.recover()
            except sqlite3.Error as exc:
                _log.warning("workflow store %s unavailable: %s", self.path, exc)

    # -- closing ------------------------------------------------------------------------------------

    def close(self, *, wait: bool = True) -> None:
        """Stop taking jobs; with `wait`, also wait for the running ones to end.

        Queued jobs stay queued in the store: the next runner on it runs them. Without `wait`,
        running jobs go on in the background and the runner retires once they end.
        """
        if not self._closing.is_set():
            self._closing.set()
            for _ in self._workers:
                self._queue.put(None)
        if wait:
            for worker in self._workers:
                if worker is not threading.current_thread():
                    worker.join()
            self._stopped.set()
            if self._heart is not threading.current_thread():
                self._heart.join()
            self._retire()

    def _retire(self) -> None:
        """Withdraw this runner from the store, so its leftover queued jobs go to the next one."""
        with self._retire_lock:
            if self._retired:
                return
            self._retired = True
        with self._connect() as conn:
            conn.execute("DELETE FROM keelgraph_job_owners WHERE owner_id = ?", (self._id,))
        with _LIVE_LOCK:
            _LIVE_RUNNERS.discard(self._id)

    def __enter__(self) -> WorkflowRunner:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _check_function(where: str, function: Callable[..., Any], args: type[BaseModel]) -> bool:
    """Check that `function` takes every field of `args` as a keyword; whether it takes `report`."""
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False  # a builtin without a signature: call it and see
    fields = set(args.model_fields)
    if "report" in fields:
        raise UserError(
            f"{where}: 'report' is reserved for the progress callback; rename that field of {args.__name__}"
        )
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    keywords = {n for n, p in params.items() if p.kind in _KEYWORD}
    missing = sorted(fields - keywords) if not takes_any else []
    required = {n for n, p in params.items() if p.default is p.empty and p.kind in _NAMED}
    needed = sorted(required - fields - {"report"})
    if missing or needed:
        problems = []
        if missing:
            problems.append(f"it has no parameter for field(s) {', '.join(missing)} of {args.__name__}")
        if needed:
            problems.append(
                f"its required parameter(s) {', '.join(needed)} are not fields of {args.__name__}"
            )
        raise UserError(
            f"{where}: the job function is called with the fields of args as keywords, but "
            + "; ".join(problems)
        )
    return "report" in keywords


class JobRef(BaseModel):
    """Which job: the id its start tool returned."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(
        min_length=1, max_length=200, description="The job_id that the start tool returned for this job."
    )


@dataclass(frozen=True)
class _WorkflowTools:
    """The bodies of one workflow's tools."""

    name: str
    runner: WorkflowRunner

    def start(self, **values: Any) -> dict[str, Any]:
        job_id, created = self.runner._submit(self.name, values, effect_key())
        found = self.runner.status(job_id)
        return {
            "job_id": job_id,
            "status": found["status"],
            "already_started": not created,
            "message": (
                f"{'started' if created else 'this request had already started it'}; "
                f"call {self.name}_status with this job_id to see its progress and result"
            ),
        }

    def status(self, job_id: str) -> dict[str, Any]:
        return self.runner.status(self._own(job_id))

    def cancel(self, job_id: str) -> dict[str, Any]:
        found = self.runner.status(self._own(job_id))
        if found["status"] in _FINAL:
            raise WorkflowError(
                f"job {job_id} is already {found['status']}; it cannot be cancelled",
                f"read its outcome with {self.name}_status",
            )
        return self.runner.cancel(found["job_id"])

    def _own(self, job_id: str) -> str:
        """`job_id`, if it is a job of this workflow; otherwise the error says which tool to use."""
        job_id = job_id.strip()
        try:
            workflow = self.runner.status(job_id)["workflow"]
        except UnknownJob:
            workflow = None
        if workflow != self.name:
            fix = (
                f"pass the job_id that start_{self.name} returned (call start_{self.name} to start a new job)"
            )
            if workflow is not None:
                fix = f"it is a {workflow} job: call {workflow}_status for it"
            raise UnknownJob(f"no {self.name} job has the id {job_id!r}", fix)
        return job_id


def workflow_tools(
    name: str,
    description: str,
    job: Job,
    *,
    args: type[BaseModel],
    store: str | Path | WorkflowRunner,
    checkpointer: BaseCheckpointSaver[Any] | None = None,
    max_workers: int = 2,
    cancellable: bool = True,
) -> list[BaseTool]:
    """Tools that start `job` in the background and report how it is doing.

    Returns `start_<name>` (a `write` tool, idempotent: called again with the same
    `keelgraph.tools.effect_key()` it returns the same job instead of starting another),
    `<name>_status` (a `read` tool: status, progress, result or error) and, if `cancellable`,
    `cancel_<name>`. `job` is a compiled LangGraph graph (run with `thread_id` = the job id on
    `checkpointer`, so it resumes after a restart) or a function of the fields of `args`, which
    may take `report` to report progress. `store` is the SQLite file for job records, or a
    `WorkflowRunner` to share (and later close) one pool of `max_workers` threads.

    >>> import tempfile
    >>> from pydantic import BaseModel
    >>> class Text(BaseModel):
    ...     text: str
    >>> def count_words(text: str) -> int:
    ...     return len(text.split())
    >>> runner = WorkflowRunner(f"{tempfile.mkdtemp()}/jobs.db")
    >>> start, status, cancel = workflow_tools(
    ...     "word_count", "Count the words of a text.", count_words, args=Text, store=runner
    ... )
    >>> job_id = start.invoke({"text": "to be or not"})["job_id"]
    >>> runner.wait(job_id)["result"]
    4
    >>> runner.close()
    """
    runner = store if isinstance(store, WorkflowRunner) else WorkflowRunner(store, max_workers=max_workers)
    runner.register(name, job, args=args, checkpointer=checkpointer)
    bodies = _WorkflowTools(name, runner)
    start = StructuredTool.from_function(
        func=bodies.start,
        name=f"start_{name}",
        description=(
            f"{description.strip()} Runs in the background: returns a job_id at once. "
            f"Then call {name}_status with that job_id for its progress and, once done, its result."
        ),
        args_schema=args,
    )
    status = StructuredTool.from_function(
        func=bodies.status,
        name=f"{name}_status",
        description=(
            f"How a {name} job started with start_{name} is doing: status (queued, running, done, "
            "failed or cancelled), progress (0 to 1, or null) with a message, and its result once done "
            "or its error once failed. A running job is still working: tell the user, or check again later."
        ),
        args_schema=JobRef,
    )
    tools = [
        with_policy(start, side_effect="write", idempotent=True, timeout_s=10.0),
        with_policy(status, side_effect="read", timeout_s=10.0),
    ]
    if cancellable:
        cancel = StructuredTool.from_function(
            func=bodies.cancel,
            name=f"cancel_{name}",
            description=(
                f"Cancel a {name} job: a queued one at once, a running one at its next step. "
                f"Returns its status; call {name}_status to see when it has stopped."
            ),
            args_schema=JobRef,
        )
        tools.append(with_policy(cancel, side_effect="write", idempotent=True, timeout_s=10.0))
    return tools
