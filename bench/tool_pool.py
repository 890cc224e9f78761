"""Bounded tool execution: what hung tools cost a process, and how long they hold up a turn.

Printed: threads and resident memory (VmRSS) before and after 100 hung sync tool calls on one
graph's pool of 8 workers (and after the hung calls finally return); the turn time of one step with
16 parallel hung calls against their deadline; how long an async tool that ignores cancellation is
waited on; and a turn with `turn_timeout_s` whose tool would hang ten times longer. Every hung tool
blocks on an event set at the end, so the process ends clean.

Run: .venv/bin/python bench/tool_pool.py [--quick]
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from pathlib import Path

from langchain_core.messages import AIMessage
from langchain_core.tools import BaseTool, StructuredTool, tool
from pydantic import BaseModel

from keelgraph import Contract, build_graph
from keelgraph.contracts.errors import Failure
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools import run_tool_call, with_policy
from keelgraph.tools.pool import DEFAULT_WORKERS, ToolPool

RELEASE = threading.Event()


class Ask(BaseModel):
    text: str


class Reply(BaseModel):
    reply: str


CONTRACT = Contract(input=Ask, output=Reply, instructions="Help.", repair_budget=2)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _hang(q: str) -> str:
    RELEASE.wait(60)
    return "late"


@tool
async def stubborn(q: str) -> str:
    """Look something up (async, ignores cancellation)."""
    while not RELEASE.is_set():
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            continue
    return "late"


def hung_tool(timeout_s: float) -> BaseTool:
    return with_policy(StructuredTool.from_function(_hang, name="hang", description="x"), timeout_s=timeout_s)


def hundred_hung_calls(timeout_s: float) -> None:
    pool = ToolPool(DEFAULT_WORKERS)  # what a graph gets by default (`tool_workers`)
    hang = hung_tool(timeout_s)
    threads, rss = threading.active_count(), rss_mb()
    started = time.perf_counter()
    kinds = [run_tool_call(hang, f"c{i}", {"q": str(i)}, pool=pool).kind for i in range(100)]
    took = time.perf_counter() - started
    print(f"100 hung sync calls (timeout {timeout_s:g} s, {pool.size} workers), {took:.2f} s in all:")
    print(f"  threads {threads} -> {threading.active_count()}, RSS {rss:.1f} -> {rss_mb():.1f} MB")
    print(
        f"  {kinds.count('timeout')} timed out, {kinds.count('tool_error')} refused at once (pool full of hung calls)"
    )


def parallel_step(deadline: float) -> None:
    calls = [{"name": "hang", "args": {"q": str(i)}, "id": f"c{i}", "type": "tool_call"} for i in range(16)]
    model = ScriptedChatModel([AIMessage("", tool_calls=calls), answer(reply="nothing came back")])
    graph = build_graph(
        CONTRACT, [hung_tool(deadline)], model=model, checkpointer=None, strategy="json_object"
    )
    threads = threading.active_count()
    started = time.perf_counter()
    result = graph.invoke({"request": {"text": "hi"}})
    took = time.perf_counter() - started
    print(
        f"16 parallel hung calls in one step (deadline {deadline:g} s): turn {took:.2f} s "
        f"= {took / deadline:.2f}x the deadline, status {result['status']}, "
        f"threads {threads} -> {threading.active_count()}"
    )


def async_ignoring_cancel(deadline: float) -> None:
    started = time.perf_counter()
    outcome = run_tool_call(with_policy(stubborn, timeout_s=deadline), "c1", {"q": "x"}, pool=ToolPool(2))
    took = time.perf_counter() - started
    print(f"async tool ignoring cancellation (deadline {deadline:g} s): {outcome.kind} after {took:.2f} s")


def turn_deadline(limit: float) -> None:
    model = ScriptedChatModel([call("hang", q="x"), answer(reply="never")])
    tools = [hung_tool(limit * 10)]
    graph = build_graph(
        CONTRACT, tools, model=model, checkpointer=None, strategy="json_object", turn_timeout_s=limit
    )
    started = time.perf_counter()
    result = graph.invoke({"request": {"text": "hi"}})
    took = time.perf_counter() - started
    error = Failure.model_validate(result["error"]) if result.get("error") else None
    ended = f"{error.type} ({error.problems[0].field})" if error else result["status"]
    print(
        f"turn_timeout_s={limit:g}, tool timeout {limit * 10:g} s: turn {took:.2f} s, ended {result['status']}: {ended}"
    )


def _tool_threads() -> int:
    return sum(t.name.startswith("keelgraph-tool-") for t in threading.enumerate())


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    logging.getLogger("keelgraph").setLevel(logging.ERROR)  # one warning per refused call otherwise
    hundred_hung_calls(0.05)
    parallel_step(0.3 if quick else 1.0)
    async_ignoring_cancel(0.2 if quick else 0.5)
    turn_deadline(0.3 if quick else 1.0)
    RELEASE.set()
    end = time.monotonic() + 5
    while _tool_threads() and time.monotonic() < end:
        time.sleep(0.02)
    print(
        f"after the hung calls return: threads {threading.active_count()} "
        f"({_tool_threads()} tool workers), RSS {rss_mb():.1f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
