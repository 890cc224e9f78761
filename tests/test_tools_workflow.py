"""The workflow tools: background jobs with status, progress, idempotent starts, and recovery after a restart."""

from __future__ import annotations

import doctest
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import date, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypedDict

import pytest
from langchain_core.tools import BaseTool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import interrupt
from pydantic import BaseModel, Field

from keelgraph.contracts.errors import UserError
from keelgraph.tools import workflow as workflow_module
from keelgraph.tools.execution import fence, policy_of, run_tool_call
from keelgraph.tools.ledger import running_with_key
from keelgraph.tools.workflow import (
    Recovery,
    UnknownJob,
    WorkflowError,
    WorkflowRunner,
    workflow_tools,
)

STARTED = "started; call report_status with this job_id to see its progress and result"
RESTART = "interrupted by a restart; start it again"


class Report(BaseModel):
    region: str
    rows: int = 3


class Count(BaseModel):
    n: int
    trail: list[str] = Field(default_factory=list)


class Number(BaseModel):
    n: int


class Trail(TypedDict):
    n: int
    trail: list[str]


def step_a(state: Trail, calls: list[str]) -> dict[str, Any]:
    calls.append("a")
    return {"n": state["n"] + 1, "trail": [*state["trail"], "a"]}


def step_b(state: Trail, calls: list[str], pause: threading.Event | None) -> dict[str, Any]:
    calls.append("b")
    if pause is not None:
        pause.wait(5)
    return {"n": state["n"] * 2, "trail": [*state["trail"], "b"]}


def step_c(state: Trail, calls: list[str]) -> dict[str, Any]:
    calls.append("c")
    return {"trail": [*state["trail"], "c"]}


def three_steps(
    calls: list[str] | None = None,
    pause: threading.Event | None = None,
    checkpointer: BaseCheckpointSaver[Any] | None = None,
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """START -> a -> b -> c -> END; b waits for `pause` when given; each node appends its name to `calls`."""
    seen = [] if calls is None else calls
    builder = StateGraph(Trail)
    builder.add_node("a", partial(step_a, calls=seen))
    builder.add_node("b", partial(step_b, calls=seen, pause=pause))
    builder.add_node("c", partial(step_c, calls=seen))
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", "c")
    builder.add_edge("c", END)
    return builder.compile(checkpointer=checkpointer)


def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll `check` until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s} s")
        time.sleep(0.01)


def status_of(tool: BaseTool, job_id: str) -> dict[str, Any]:
    result: dict[str, Any] = tool.invoke({"job_id": job_id})
    return result


def stored(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
def gate() -> threading.Event:
    """Holds a test's job until the test opens it (teardown opens it, so no job is left waiting)."""
    return threading.Event()


@pytest.fixture
def runner(tmp_path: Path, gate: threading.Event) -> Iterator[WorkflowRunner]:
    found = WorkflowRunner(tmp_path / "jobs.db")
    yield found
    gate.set()
    found.close()


def test_tools_names_and_policies(runner: WorkflowRunner) -> None:
    tools = workflow_tools(
        "report", "Build the sales report of a region.", lambda **_: 0, args=Report, store=runner
    )
    assert [t.name for t in tools] == ["start_report", "report_status", "cancel_report"]
    assert [(policy_of(t).side_effect, policy_of(t).idempotent) for t in tools] == [
        ("write", True),
        ("read", False),
        ("write", True),
    ]
    assert tools[0].args_schema is Report
    assert tools[0].description.startswith("Build the sales report of a region. Runs in the background")
    assert "report_status" in tools[0].description
    without_cancel = workflow_tools(
        "other", "Other.", lambda **_: 0, args=Report, store=runner, cancellable=False
    )
    assert [t.name for t in without_cancel] == ["start_other", "other_status"]


def test_start_returns_at_once_and_status_follows_the_job_to_done(
    runner: WorkflowRunner, gate: threading.Event
) -> None:
    def build_report(region: str, rows: int) -> dict[str, Any]:
        gate.wait(5)
        return {"region": region, "total": rows * 10}

    start, status, _ = workflow_tools(
        "report", "Build the sales report of a region.", build_report, args=Report, store=runner
    )
    began = time.monotonic()
    started = start.invoke({"region": "north"})
    assert time.monotonic() - began < 0.5  # the job is still waiting at the gate
    job_id = started["job_id"]
    assert re.fullmatch(r"report-[0-9a-f]{12}", job_id)
    assert started["status"] in ("queued", "running")
    assert started == {
        "job_id": job_id,
        "status": started["status"],
        "already_started": False,
        "message": STARTED,
    }

    until(lambda: status_of(status, job_id)["status"] == "running")
    running = status_of(status, job_id)
    assert running == {
        "job_id": job_id,
        "workflow": "report",
        "args": {"region": "north", "rows": 3},
        "status": "running",
        "progress": None,
        "message": None,
        "last_node": None,
        "result": None,
        "error": None,
        "restarts": 0,
        "created_at": running["created_at"],
        "started_at": running["started_at"],
        "finished_at": None,
    }
    gate.set()
    until(lambda: status_of(status, job_id)["status"] == "done")
    done = status_of(status, job_id)
    assert done == {
        **running,
        "status": "done",
        "progress": 1.0,
        "result": {"region": "north", "total": 30},
        "finished_at": done["finished_at"],
    }
    created, began_at, finished = (
        datetime.fromisoformat(done[k]) for k in ("created_at", "started_at", "finished_at")
    )
    assert created <= began_at <= finished
    assert done["finished_at"].endswith("Z")


def test_progress_reported_by_a_function(runner: WorkflowRunner, gate: threading.Event) -> None:
    def import_rows(region: str, rows: int, report: Callable[..., None]) -> int:
        report(0.5, f"imported {rows} of {2 * rows} rows")
        gate.wait(5)
        report(0.9)  # no message: the last one stays
        return 2 * rows

    start, status, _ = workflow_tools("report", "Import rows.", import_rows, args=Report, store=runner)
    job_id = start.invoke({"region": "north", "rows": 4})["job_id"]
    until(lambda: status_of(status, job_id)["progress"] == 0.5)
    halfway = status_of(status, job_id)
    assert (halfway["status"], halfway["progress"], halfway["message"]) == (
        "running",
        0.5,
        "imported 4 of 8 rows",
    )
    gate.set()
    done = runner.wait(job_id, timeout_s=5)
    assert (done["status"], done["progress"], done["message"], done["result"]) == (
        "done",
        1.0,
        "imported 4 of 8 rows",
        8,
    )


def test_async_function_job(runner: WorkflowRunner) -> None:
    async def total(n: int) -> dict[str, int]:
        return {"total": n * 3}

    start, status, _ = workflow_tools("total", "Sum.", total, args=Number, store=runner)
    job_id = start.invoke({"n": 5})["job_id"]
    runner.wait(job_id, timeout_s=5)
    assert status_of(status, job_id)["result"] == {"total": 15}


@dataclass
class Summary:
    when: date
    report: Report
    big: int


def test_results_are_stored_as_json(runner: WorkflowRunner) -> None:
    def summarise(region: str, rows: int) -> Summary:
        return Summary(date(2026, 11, 24), Report(region=region, rows=rows), 2**70)

    runner.register("summary", summarise, args=Report)
    done = runner.wait(runner.start("summary", {"region": "east"}), timeout_s=5)
    assert done["result"] == {
        "when": "2026-11-24",
        "report": {"region": "east", "rows": 3},
        "big": "1180591620717411303424",
    }


def test_a_failing_job_is_failed_with_its_error(runner: WorkflowRunner) -> None:
    def build_report(region: str, rows: int) -> None:
        raise ValueError(f"no sales data for region {region!r}")

    start, status, _ = workflow_tools("report", "Build a report.", build_report, args=Report, store=runner)
    job_id = start.invoke({"region": "mars"})["job_id"]
    until(lambda: status_of(status, job_id)["status"] == "failed")
    failed = status_of(status, job_id)
    assert (failed["error"], failed["result"], failed["progress"]) == (
        "ValueError: no sales data for region 'mars'",
        None,
        None,
    )
    assert failed["finished_at"] is not None


def test_a_bad_progress_report_fails_the_job_with_the_reason(runner: WorkflowRunner) -> None:
    def overshoot(n: int, report: Callable[..., None]) -> None:
        report(1.5, "too far")

    runner.register("overshoot", overshoot, args=Number)
    failed = runner.wait(runner.start("overshoot", {"n": 1}), timeout_s=5)
    assert (failed["status"], failed["error"]) == (
        "failed",
        "UserError: report(): fraction must be a number from 0 to 1, or None; not 1.5",
    )


def test_the_same_effect_key_starts_one_job(runner: WorkflowRunner, tmp_path: Path) -> None:
    calls: list[str] = []

    def build_report(region: str, rows: int) -> int:
        calls.append(region)
        return len(calls)

    start, _, _ = workflow_tools("report", "Build a report.", build_report, args=Report, store=runner)
    with running_with_key("k"):
        first = start.invoke({"region": "north"})
        second = start.invoke({"region": "north"})
    assert second == {
        "job_id": first["job_id"],
        "status": second["status"],
        "already_started": True,
        "message": "this request had already started it; "
        "call report_status with this job_id to see its progress and result",
    }
    assert runner.wait(first["job_id"], timeout_s=5)["result"] == 1
    assert calls == ["north"]
    with running_with_key("another turn"):
        third = start.invoke({"region": "north"})["job_id"]
    unkeyed = [start.invoke({"region": "north"})["job_id"] for _ in range(2)]  # no key: a job per call
    assert len({first["job_id"], third, *unkeyed}) == 4
    for job_id in (third, *unkeyed):
        runner.wait(job_id, timeout_s=5)
    assert calls == ["north"] * 4
    assert stored(tmp_path / "jobs.db", "SELECT idempotency_key FROM keelgraph_jobs ORDER BY created_at") == [
        ("k",),
        ("another turn",),
        (None,),
        (None,),
    ]


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_graph_job_reports_its_nodes_and_keeps_its_checkpoints(
    runner: WorkflowRunner, gate: threading.Event, tmp_path: Path, backend: Literal["memory", "sqlite"]
) -> None:
    conn = sqlite3.connect(tmp_path / "checkpoints.db", check_same_thread=False)
    saver: BaseCheckpointSaver[Any] = InMemorySaver() if backend == "memory" else SqliteSaver(conn)
    calls: list[str] = []
    start, status, _ = workflow_tools(
        "count", "Count.", three_steps(calls, pause=gate), args=Count, store=runner, checkpointer=saver
    )
    job_id = start.invoke({"n": 1})["job_id"]
    until(lambda: status_of(status, job_id)["last_node"] == "a")
    midway = status_of(status, job_id)
    assert (midway["status"], midway["last_node"], midway["message"], midway["progress"]) == (
        "running",
        "a",
        "completed node a",
        None,
    )
    gate.set()
    until(lambda: status_of(status, job_id)["status"] == "done")
    done = status_of(status, job_id)
    assert (done["last_node"], done["message"], done["progress"], done["result"]) == (
        "c",
        "completed node c",
        1.0,
        {"n": 4, "trail": ["a", "b", "c"]},
    )
    assert calls == ["a", "b", "c"]
    # The subgraph's own thread (thread_id = the job id) is in the checkpointer, finished.
    saved = three_steps(checkpointer=saver).get_state({"configurable": {"thread_id": job_id}})
    assert (saved.values, saved.next) == ({"n": 4, "trail": ["a", "b", "c"]}, ())
    conn.close()


def ask_a_person(state: Trail) -> dict[str, Any]:
    interrupt("approve?")
    return {}


def test_a_graph_that_waits_for_a_person_fails_with_the_reason(runner: WorkflowRunner) -> None:
    builder = StateGraph(Trail)
    builder.add_node("ask", ask_a_person)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    runner.register("ask", builder.compile(), args=Count, checkpointer=InMemorySaver())
    failed = runner.wait(runner.start("ask", {"n": 1}), timeout_s=5)
    assert (failed["status"], failed["error"]) == (
        "failed",
        "RuntimeError: the workflow stopped at an interrupt() to wait for a person's input, which a "
        "background job cannot give; run this graph directly, or remove the interrupt",
    )


def test_cancel_a_queued_and_a_running_job(tmp_path: Path) -> None:
    calls: list[str] = []

    def crunch(region: str, rows: int, report: Callable[..., None]) -> str:
        calls.append(region)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            report(None, "crunching")
            time.sleep(0.02)
        return "not cancelled"

    with WorkflowRunner(tmp_path / "jobs.db", max_workers=1) as one_worker:
        start, status, cancel = workflow_tools("report", "Crunch.", crunch, args=Report, store=one_worker)
        running = start.invoke({"region": "north"})["job_id"]
        queued = start.invoke({"region": "south"})["job_id"]  # waits for the only worker
        until(lambda: status_of(status, running)["status"] == "running")
        assert status_of(cancel, queued)["status"] == "cancelled"
        assert status_of(cancel, running)["status"] == "running"  # it stops at its next report
        stopped = one_worker.wait(running, timeout_s=5)
        assert (stopped["status"], stopped["error"], stopped["message"]) == (
            "cancelled",
            "cancelled on request",
            "crunching",
        )
        assert calls == ["north"]  # the queued job never ran
        with pytest.raises(WorkflowError) as caught:
            cancel.invoke({"job_id": queued})
        assert str(caught.value) == (
            f"job {queued} is already cancelled; it cannot be cancelled; read its outcome with report_status"
        )


def test_unknown_job_ids_say_where_ids_come_from(runner: WorkflowRunner) -> None:
    _, status, _ = workflow_tools("report", "Report.", lambda region, rows: 0, args=Report, store=runner)
    start_count, _, _ = workflow_tools("count", "Count.", three_steps(), args=Count, store=runner)
    with pytest.raises(UnknownJob) as caught:
        status.invoke({"job_id": "report-000000000000"})
    assert str(caught.value) == (
        "no report job has the id 'report-000000000000'; "
        "pass the job_id that start_report returned (call start_report to start a new job)"
    )
    other = start_count.invoke({"n": 1})["job_id"]
    with pytest.raises(UnknownJob) as caught:
        status.invoke({"job_id": other})
    assert (
        str(caught.value)
        == f"no report job has the id {other!r}; it is a count job: call count_status for it"
    )
    with pytest.raises(UnknownJob) as caught:
        runner.status("nope")
    assert str(caught.value) == "no job has the id 'nope'; use a job_id that a start tool returned"


def test_run_tool_call_outcomes(runner: WorkflowRunner) -> None:
    start, status, _ = workflow_tools(
        "report", "Report.", lambda region, rows: {"rows": rows}, args=Report, store=runner
    )
    began = run_tool_call(start, "call-1", {"region": "north"}, effect_key="turn-1:start_report")
    assert (began.ok, began.kind, began.name) == (True, "ok", "start_report")
    job_id = began.output["job_id"]
    assert began.output == {
        "job_id": job_id,
        "status": began.output["status"],
        "already_started": False,
        "message": STARTED,
    }
    assert began.content == fence("start_report", began.output, 4_000)
    again = run_tool_call(start, "call-2", {"region": "north"}, effect_key="turn-1:start_report")
    assert (again.output["job_id"], again.output["already_started"]) == (job_id, True)

    runner.wait(job_id, timeout_s=5)
    read = run_tool_call(status, "call-3", {"job_id": job_id})
    assert (read.ok, read.output["status"], read.output["result"]) == (True, "done", {"rows": 3})
    assert json.loads(read.content.splitlines()[1]) == read.output

    missing = run_tool_call(status, "call-4", {"job_id": "report-missing"})
    assert (missing.ok, missing.kind) == (False, "tool_error")
    assert missing.content == (
        "ERROR: report_status failed: UnknownJob: no report job has the id 'report-missing'; "
        "pass the job_id that start_report returned (call start_report to start a new job)."
    )
    assert run_tool_call(status, "call-5", {}).kind == "tool_args"


def test_a_closed_runners_queued_job_is_run_by_the_next_runner(tmp_path: Path, gate: threading.Event) -> None:
    def hold(n: int) -> int:
        gate.wait(5)
        return n

    first = WorkflowRunner(tmp_path / "jobs.db", max_workers=1, heartbeat_s=0.05)
    first.register("hold", hold, args=Number)
    running = first.start("hold", {"n": 1})
    queued = first.start("hold", {"n": 2})
    until(lambda: first.status(running)["status"] == "running")
    first.close(wait=False)  # stops taking jobs; the running one goes on
    with WorkflowRunner(tmp_path / "jobs.db", heartbeat_s=0.05) as second:
        second.register("hold", hold, args=Number)
        assert second.recover() == Recovery()  # the first runner is still running a job: hands off
        assert second.status(queued)["status"] == "queued"
        gate.set()
        assert first.wait(running, timeout_s=5)["result"] == 1
        assert second.wait(queued, timeout_s=5)["result"] == 2  # taken over once the first retired


CRASH = textwrap.dedent(
    """
    import json, sqlite3, sys, time
    from pathlib import Path
    from typing import TypedDict
    from pydantic import BaseModel, Field
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import END, START, StateGraph
    from keelgraph.tools.workflow import WorkflowRunner

    tmp = Path(sys.argv[1])

    class Trail(TypedDict):
        n: int
        trail: list[str]

    class Count(BaseModel):
        n: int
        trail: list[str] = Field(default_factory=list)

    class Report(BaseModel):
        region: str
        rows: int = 3

    class Number(BaseModel):
        n: int

    def step_a(state):
        return {"n": state["n"] + 1, "trail": [*state["trail"], "a"]}

    def step_b(state):
        (tmp / "in_b").touch()
        time.sleep(60)  # killed here

    def step_c(state):
        return {"trail": [*state["trail"], "c"]}

    def build_report(region, rows, report):
        report(0.25, "reading sales")
        (tmp / "in_report").touch()
        time.sleep(60)  # killed here

    def add_one(n):
        return n + 1

    builder = StateGraph(Trail)
    builder.add_node("a", step_a)
    builder.add_node("b", step_b)
    builder.add_node("c", step_c)
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", "c")
    builder.add_edge("c", END)
    saver = SqliteSaver(sqlite3.connect(tmp / "checkpoints.db", check_same_thread=False))
    runner = WorkflowRunner(tmp / "jobs.db", max_workers=2)
    runner.register("count", builder.compile(), args=Count, checkpointer=saver)
    runner.register("report", build_report, args=Report)
    runner.register("add", add_one, args=Number)
    ids = {
        "count": runner.start("count", {"n": 1}),
        "report": runner.start("report", {"region": "north"}),
        "add": runner.start("add", {"n": 41}),  # both workers are busy: it stays queued
    }
    (tmp / "ids.json").write_text(json.dumps(ids))
    time.sleep(60)
    """
)


@pytest.mark.parametrize("max_restarts", [3, 0])
def test_restart_resumes_graphs_reruns_queued_jobs_and_fails_cut_off_functions(
    tmp_path: Path, max_restarts: int
) -> None:
    (tmp_path / "crash.py").write_text(CRASH)
    process = subprocess.Popen(
        [sys.executable, str(tmp_path / "crash.py"), str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "KEELGRAPH_DATA_DIR": str(tmp_path / "data")},
    )
    calls: list[str] = []
    conn = sqlite3.connect(tmp_path / "checkpoints.db", check_same_thread=False)
    try:
        until(lambda: all((tmp_path / f).exists() for f in ("ids.json", "in_b", "in_report")), timeout_s=20)
        ids = json.loads((tmp_path / "ids.json").read_text())
        with WorkflowRunner(tmp_path / "jobs.db", max_restarts=max_restarts) as runner:
            runner.register("count", three_steps(calls), args=Count, checkpointer=SqliteSaver(conn))
            runner.register("report", lambda region, rows: "must not run", args=Report)
            runner.register("add", lambda n: n + 1, args=Number)
            # The other process is alive: its jobs are left alone.
            assert runner.recover() == Recovery()
            assert [runner.status(ids[k])["status"] for k in ("count", "report", "add")] == [
                "running",
                "running",
                "queued",
            ]
            assert runner.status(ids["count"])["last_node"] == "a"

            process.kill()
            assert process.wait(timeout=10) == -9
            recovered = runner.recover()
            assert runner.wait(ids["add"], timeout_s=5)["result"] == 42  # it had not started: it runs now
            cut_off = runner.status(ids["report"])
            assert (cut_off["status"], cut_off["error"], cut_off["progress"], cut_off["message"]) == (
                "failed",
                RESTART,
                0.25,
                "reading sales",
            )
            graph_job = runner.wait(ids["count"], timeout_s=5)
            if max_restarts == 0:
                assert recovered == Recovery(requeued=[ids["add"]], failed=[ids["count"], ids["report"]])
                assert (graph_job["status"], graph_job["error"], graph_job["restarts"]) == (
                    "failed",
                    "interrupted by a restart after 0 resumption(s), the most allowed (it may be what "
                    "stops the process); start it again once the cause is fixed",
                    0,
                )
                assert calls == []
                return
            assert recovered == Recovery(
                resumed=[ids["count"]], requeued=[ids["add"]], failed=[ids["report"]]
            )
            assert (
                graph_job["status"],
                graph_job["result"],
                graph_job["last_node"],
                graph_job["restarts"],
            ) == (
                "done",
                {"n": 4, "trail": ["a", "b", "c"]},
                "c",
                1,
            )
            assert calls == ["b", "c"]  # went on from the checkpoint after a; a did not run again
    finally:
        process.kill()
        process.wait(timeout=10)
        conn.close()


@pytest.mark.parametrize(
    ("name", "job", "message"),
    [
        (
            "bad name",
            lambda region, rows: 0,
            "workflow 'bad name': a name is 1-57 letters, digits, '_' or '-'",
        ),
        (
            "report",
            lambda region: 0,
            "workflow 'report': the job function is called with the fields of args as keywords, but "
            "it has no parameter for field(s) rows of Report",
        ),
        (
            "report",
            lambda region, rows, owner: 0,
            "workflow 'report': the job function is called with the fields of args as keywords, but "
            "its required parameter(s) owner are not fields of Report",
        ),
        ("report", 42, "workflow 'report': job must be a compiled LangGraph graph or a function, not int"),
    ],
)
def test_declaration_mistakes_are_caught_at_once(
    runner: WorkflowRunner, name: str, job: Any, message: str
) -> None:
    with pytest.raises(UserError) as caught:
        workflow_tools(name, "Report.", job, args=Report, store=runner)
    assert str(caught.value).startswith(message)


def test_a_name_is_registered_once_and_the_store_must_be_a_file(runner: WorkflowRunner) -> None:
    workflow_tools("report", "Report.", lambda region, rows: 0, args=Report, store=runner)
    with pytest.raises(UserError) as caught:
        workflow_tools("report", "Report.", lambda region, rows: 0, args=Report, store=runner)
    assert str(caught.value) == (
        "workflow 'report' is already registered with this runner; give each workflow its own name"
    )
    with pytest.raises(UserError) as caught:
        WorkflowRunner(":memory:")
    assert (
        str(caught.value) == "WorkflowRunner: job records must outlive the process; give a file path as store"
    )


def test_the_docstring_examples_run() -> None:
    result = doctest.testmod(workflow_module)
    assert (result.failed, result.attempted) == (0, 16)
