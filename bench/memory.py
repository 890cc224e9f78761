"""Checkpoint storage, turn time and memory as a thread grows: keelgraph vs plain LangGraph.

Both sides do the same work per turn with a zero-latency scripted model (`keelgraph.testing`): the
user asks, the model calls one trivial tool, reads the result and answers. Both run on the same
backend, in one command:

- plain:     `langchain.agents.create_agent(model, [tool], checkpointer=...)` on LangGraph's default
             saver (`SqliteSaver.from_conn_string` / `AsyncSqliteSaver.from_conn_string`, or
             `PostgresSaver` / `AsyncPostgresSaver.from_conn_string` with `--backend postgres`);
- keelgraph: `build_graph(Contract(...), [tool], model=...)` on keelgraph's savers
             (`keelgraph.graphs.persistence.sqlite_checkpointer` / `checkpointer` / `async_checkpointer`).

Measured per variant, each in its own process (so peak RSS is its own):
- growth: one thread driven for `--turns` turns; per turn the wall ms of `invoke` and the bytes the
  turn added to the thread's checkpoint data (SQLite: `LENGTH(checkpoint)+LENGTH(metadata)` of
  `checkpoints` plus `LENGTH(value)` of `writes`; PostgreSQL: `checkpoints`, `checkpoint_blobs` and
  `checkpoint_writes`), measured outside the timed call; the database file size; and which state
  channels the latest checkpoint's bytes belong to (each channel re-serialized with the saver's serde);
- concurrency: `--threads` threads at once, `--concurrent-turns` turns each, with `ainvoke` on the
  async saver: turns/s and per-turn latency; once with the zero-latency model (the framework's own
  cost) and once with a model that answers in `--model-ms` (awaited, as a served endpoint is).

Run:   .venv/bin/python bench/memory.py                     (--turns 200 --threads 50; about a minute on 2 cores)
Quick: .venv/bin/python bench/memory.py --quick             (12 turns, 4 threads: the smoke test)
       .venv/bin/python bench/memory.py --backend postgres  (starts a throwaway local PostgreSQL)
Writes bench/results/memory.{json,md,png} (or --out DIR); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel

from keelgraph import Contract
from keelgraph.testing import ScriptedChatModel, answer, call

Variant = Literal["plain", "keelgraph"]
Backend = Literal["sqlite", "postgres"]
VARIANTS: tuple[Variant, ...] = ("plain", "keelgraph")
POINTS = (10, 50, 100, 200)
RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("langgraph", "langgraph-checkpoint", "langgraph-checkpoint-sqlite", "langchain", "langchain-core")


# --- the work of one turn, the same on both sides ---------------------------------------------


def lookup(query: str) -> str:
    """Look up the stock record for a question."""
    return f"record for {query}: 42 units in stock"


class Ask(BaseModel):
    question: str


class Reply(BaseModel):
    reply: str


def question(turn: int) -> str:
    return f"question {turn}: how many units of item {turn} are in stock?"


def make_tool() -> BaseTool:
    return StructuredTool.from_function(lookup, name="lookup")


def plain_step(messages: list[BaseMessage]) -> AIMessage:
    """Native tool calling: call `lookup` with the question, then answer with its result."""
    last = messages[-1]
    if isinstance(last, ToolMessage):
        return AIMessage(f"Answer: {last.content}")
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    return AIMessage("", tool_calls=[{"name": "lookup", "args": {"query": str(last.content)}, "id": call_id}])


def keelgraph_step(messages: list[BaseMessage]) -> Any:
    """The same two steps in keelgraph's JSON strategy: the tool result comes back as 'Data from'."""
    last = str(messages[-1].content)
    if last.startswith("Data from"):
        return answer(reply=f"Answer: {last.split(chr(10), 1)[-1]}")
    return call("lookup", query=json.loads(last)["question"])


def keelgraph_step_native(messages: list[BaseMessage]) -> AIMessage:
    """keelgraph's `tool_calling` strategy: the answer is a call to `final_answer`."""
    last = messages[-1]
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    if isinstance(last, ToolMessage):
        args: dict[str, Any] = {"reply": f"Answer: {last.content}"}
        return AIMessage("", tool_calls=[{"name": "final_answer", "args": args, "id": call_id}])
    query = json.loads(str(last.content))["question"]
    return AIMessage("", tool_calls=[{"name": "lookup", "args": {"query": query}, "id": call_id}])


CONTRACT = Contract(input=Ask, output=Reply, instructions="Answer from the lookup tool.")


def scripted(variant: Variant, strategy: str, latency_ms: float = 0) -> ScriptedChatModel:
    if variant == "plain":
        step: Any = plain_step
    else:
        step = keelgraph_step_native if strategy == "tool_calling" else keelgraph_step
    if latency_ms:
        # A model that takes its time, awaited (`_agenerate`): what a served endpoint costs a run.
        fast = step

        async def step(messages: list[BaseMessage]) -> Any:
            await asyncio.sleep(latency_ms / 1000)
            return fast(messages)

    return ScriptedChatModel([step], repeat_last=True)


def turn_input(variant: Variant, turn: int) -> dict[str, Any]:
    if variant == "plain":
        return {"messages": [HumanMessage(question(turn))]}
    return {"request": {"question": question(turn)}}


def check_result(variant: Variant, result: dict[str, Any]) -> None:
    if variant == "keelgraph":
        if result.get("status") != "ok":
            raise RuntimeError(f"keelgraph turn did not end ok: {result.get('error')}")
    elif not isinstance(result["messages"][-1], AIMessage) or result["messages"][-1].tool_calls:
        raise RuntimeError("plain turn did not end with an answer")


def build(
    variant: Variant, saver: Any, strategy: str, store: Any = None, latency_ms: float = 0
) -> tuple[Any, ScriptedChatModel]:
    model = scripted(variant, strategy, latency_ms)
    if variant == "plain":
        from langchain.agents import create_agent

        return create_agent(model, [make_tool()], checkpointer=saver), model
    from keelgraph import build_graph

    # keelgraph's default pairs the checkpointer with a store (the threads' archives) on the same backend.
    graph = build_graph(
        CONTRACT, [make_tool()], model=model, checkpointer=saver, store=store, strategy=strategy
    )  # type: ignore[arg-type]
    return graph, model


# --- savers, as each side sets them up --------------------------------------------------------


@contextmanager
def sync_saver(variant: Variant, backend: Backend, target: str) -> Iterator[Any]:
    if variant == "plain" and backend == "sqlite":
        from langgraph.checkpoint.sqlite import SqliteSaver

        with SqliteSaver.from_conn_string(target) as saver:
            yield saver
    elif variant == "plain":
        from langgraph.checkpoint.postgres import PostgresSaver

        with PostgresSaver.from_conn_string(target) as saver:
            saver.setup()
            yield saver
    elif backend == "sqlite":
        from keelgraph.graphs.persistence import sqlite_checkpointer

        saver = sqlite_checkpointer(target)
        try:
            yield saver
        finally:
            saver.conn.close()
    else:
        from keelgraph.graphs.persistence import checkpointer

        with checkpointer(target) as saver:
            yield saver


def async_saver(variant: Variant, backend: Backend, target: str) -> Any:
    """An async context manager yielding the async saver each side would use."""
    if variant == "plain" and backend == "sqlite":
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        return AsyncSqliteSaver.from_conn_string(target)
    if variant == "plain":
        from contextlib import asynccontextmanager

        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

        @asynccontextmanager
        async def postgres() -> Any:
            async with AsyncPostgresSaver.from_conn_string(target) as saver:
                await saver.setup()
                yield saver

        return postgres()
    from keelgraph.graphs.persistence import async_checkpointer

    return async_checkpointer(target)


@contextmanager
def sync_store(variant: Variant, target: str) -> Iterator[Any]:
    """keelgraph's store on the same database (plain LangGraph has none)."""
    if variant == "plain":
        yield None
        return
    from keelgraph.graphs.persistence import store

    with store(target) as opened:
        yield opened


@asynccontextmanager
async def async_store_for(variant: Variant, target: str) -> AsyncIterator[Any]:
    if variant == "plain":
        yield None
        return
    from keelgraph.graphs.persistence import async_store

    async with async_store(target) as opened:
        yield opened


# --- measuring what a thread has stored ---------------------------------------------------------


class Meter:
    """Bytes, rows and file size of one thread's checkpoint data, read on a separate connection."""

    def __init__(self, backend: Backend, target: str) -> None:
        self.backend = backend
        self.target = target
        if backend == "sqlite":
            self.sqlite = sqlite3.connect(target)
        else:
            import psycopg

            self.pg = psycopg.connect(target, autocommit=True)

    def thread(self, thread_id: str) -> dict[str, int]:
        try:
            return self._thread(thread_id)
        except sqlite3.OperationalError as exc:  # LangGraph's SqliteSaver creates its tables lazily
            if "no such table" not in str(exc):
                raise
            return {"bytes": 0, "checkpoints": 0, "writes": 0, "blobs": 0, "db_bytes": 0}

    def _thread(self, thread_id: str) -> dict[str, int]:
        if self.backend == "sqlite":
            ck = self.sqlite.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(checkpoint) + LENGTH(metadata)), 0) "
                "FROM checkpoints WHERE thread_id = ?",
                (thread_id,),
            ).fetchone()
            wr = self.sqlite.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(value)), 0) FROM writes WHERE thread_id = ?",
                (thread_id,),
            ).fetchone()
            blobs = (0, 0)
            size = sum(
                os.path.getsize(self.target + suffix)
                for suffix in ("", "-wal")
                if os.path.exists(self.target + suffix)
            )
        else:
            ck = self.pg.execute(
                "SELECT COUNT(*), COALESCE(SUM(pg_column_size(checkpoint) + pg_column_size(metadata)), 0) "
                "FROM checkpoints WHERE thread_id = %s",
                (thread_id,),
            ).fetchone()
            wr = self.pg.execute(
                "SELECT COUNT(*), COALESCE(SUM(octet_length(blob)), 0) FROM checkpoint_writes WHERE thread_id = %s",
                (thread_id,),
            ).fetchone()
            blobs = self.pg.execute(
                "SELECT COUNT(*), COALESCE(SUM(octet_length(blob)), 0) FROM checkpoint_blobs WHERE thread_id = %s",
                (thread_id,),
            ).fetchone()
            size = self.pg.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        assert ck is not None and wr is not None and blobs is not None
        archived = self._archive_bytes(thread_id)
        return {
            "bytes": int(ck[1]) + int(wr[1]) + int(blobs[1]) + archived,
            "archive_bytes": archived,
            "checkpoints": int(ck[0]),
            "writes": int(wr[0]),
            "blobs": int(blobs[0]),
            "db_bytes": int(size),
        }

    def _archive_bytes(self, thread_id: str) -> int:
        """Bytes of keelgraph's archive of the thread (the store's `keelgraph.archive.<thread>`)."""
        prefix = f"keelgraph.archive.{thread_id}"
        try:
            if self.backend == "sqlite":
                row = self.sqlite.execute(
                    "SELECT COALESCE(SUM(LENGTH(value)), 0) FROM store WHERE prefix = ?", (prefix,)
                ).fetchone()
            else:
                row = self.pg.execute(
                    "SELECT COALESCE(SUM(pg_column_size(value)), 0) FROM store WHERE prefix = %s", (prefix,)
                ).fetchone()
        except Exception:  # no store table: plain LangGraph, or nothing archived yet
            if self.backend != "sqlite":
                self.pg.rollback()
            return 0
        return int(row[0]) if row else 0

    def close(self) -> None:
        (self.sqlite if self.backend == "sqlite" else self.pg).close()


def channel_sizes(saver: Any, thread_id: str) -> dict[str, int]:
    """Bytes of each channel in the thread's latest checkpoint, re-serialized with the saver's serde."""
    latest = saver.get_tuple({"configurable": {"thread_id": thread_id}})
    values = latest.checkpoint["channel_values"] if latest else {}
    sizes = {name: len(saver.serde.dumps_typed(value)[1]) for name, value in values.items()}
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


def rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the two workers, each run in its own process ---------------------------------------------


def growth(variant: Variant, backend: Backend, target: str, turns: int, strategy: str) -> dict[str, Any]:
    started_rss = rss_mb()
    thread_id = f"growth-{variant}"
    config: Any = {"configurable": {"thread_id": thread_id}}
    rows: list[dict[str, Any]] = []
    channels: dict[str, dict[str, int]] = {}
    meter = Meter(backend, target)
    with sync_saver(variant, backend, target) as saver, sync_store(variant, target) as store:
        graph, model = build(variant, saver, strategy, store)
        before = meter.thread(thread_id)
        for turn in range(1, turns + 1):
            t0 = time.perf_counter()
            result = graph.invoke(turn_input(variant, turn), config)
            ms = (time.perf_counter() - t0) * 1000
            check_result(variant, result)
            model.calls.clear()  # the scripted model keeps every prompt otherwise: O(turns^2) memory
            after = meter.thread(thread_id)
            rows.append(
                {
                    "turn": turn,
                    "ms": round(ms, 2),
                    "bytes": after["bytes"] - before["bytes"],
                    "checkpoints": after["checkpoints"] - before["checkpoints"],
                    "writes": after["writes"] - before["writes"],
                    "total_bytes": after["bytes"],
                    "db_bytes": after["db_bytes"],
                }
            )
            before = after
            if turn in (10, turns):
                channels[str(turn)] = channel_sizes(saver, thread_id)
            if turn % 25 == 0 or turn == turns:
                log(
                    f"{variant} growth: turn {turn}/{turns}, {ms:.0f} ms, "
                    f"{rows[-1]['bytes'] / 1024:.1f} KB this turn, {after['bytes'] / 1e6:.2f} MB in all"
                )
        kept = graph.get_state(config).values["messages"]
        messages = len(kept)
        whole = messages
        if store is not None:  # keelgraph: the archive plus the state is the whole conversation
            from keelgraph.graphs.history import transcript

            whole = len(transcript(store, thread_id, kept))
    meter.close()
    return {
        "rows": rows,
        "channels": channels,
        "messages": messages,
        "transcript_messages": whole,
        "rss_start_mb": started_rss,
        "peak_rss_mb": rss_mb(),
    }


async def concurrency(
    variant: Variant,
    backend: Backend,
    target: str,
    *,
    threads: int,
    turns: int,
    strategy: str,
    latency_ms: float = 0,
) -> dict[str, Any]:
    started_rss = rss_mb()
    latencies: list[float] = []
    async with async_saver(variant, backend, target) as saver, async_store_for(variant, target) as store:
        graph, model = build(variant, saver, strategy, store, latency_ms)
        warm: Any = {"configurable": {"thread_id": "warm-up"}}
        check_result(variant, await graph.ainvoke(turn_input(variant, 0), warm))

        async def drive(index: int) -> None:
            config: Any = {"configurable": {"thread_id": f"concurrent-{variant}-{index}"}}
            for turn in range(1, turns + 1):
                t0 = time.perf_counter()
                result = await graph.ainvoke(turn_input(variant, turn), config)
                latencies.append((time.perf_counter() - t0) * 1000)
                check_result(variant, result)
                model.calls.clear()  # repeat_last: the script index does not depend on it

        t0 = time.perf_counter()
        await asyncio.gather(*(drive(i) for i in range(threads)))
        elapsed = time.perf_counter() - t0
    done = threads * turns
    log(f"{variant} concurrency: {done} turns on {threads} threads in {elapsed:.1f} s")
    ordered = sorted(latencies)
    return {
        "threads": threads,
        "turns_per_thread": turns,
        "seconds": round(elapsed, 2),
        "turns_per_s": round(done / elapsed, 1),
        "p50_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 1),
        "rss_start_mb": started_rss,
        "peak_rss_mb": rss_mb(),
    }


def worker(spec: dict[str, Any]) -> None:
    os.environ["KEELGRAPH_DATA_DIR"] = spec["data_dir"]  # never the user's data folder
    if spec["kind"] == "growth":
        out = growth(spec["variant"], spec["backend"], spec["target"], spec["turns"], spec["strategy"])
    else:
        out = asyncio.run(
            concurrency(
                spec["variant"],
                spec["backend"],
                spec["target"],
                threads=spec["threads"],
                turns=spec["turns"],
                strategy=spec["strategy"],
                latency_ms=spec.get("latency_ms", 0),
            )
        )
    Path(spec["result"]).write_text(json.dumps(out))


# --- the parent: run the workers, summarise, plot ----------------------------------------------


def window(rows: list[dict[str, Any]], point: int) -> list[dict[str, Any]]:
    """The turns around `point` (point-2..point+2, shifted left at the end of the run)."""
    last = len(rows)
    hi = min(last, point + 2)
    lo = max(1, min(point - 2, hi - 4))
    return rows[lo - 1 : hi]


def summarise(rows: list[dict[str, Any]], points: list[int]) -> dict[str, Any]:
    at: dict[str, dict[str, float]] = {}
    for point in points:
        near = window(rows, point)
        at[str(point)] = {
            "bytes": round(statistics.mean(r["bytes"] for r in near)),
            "ms": round(statistics.median(r["ms"] for r in near), 2),
            "checkpoints": round(statistics.mean(r["checkpoints"] for r in near), 1),
        }
    first, last = at[str(points[0])], at[str(points[-1])]
    steady = rows[1:] or rows  # turn 1 pays for imports and first-call setup
    return {
        "at": at,
        "bytes_ratio": round(last["bytes"] / first["bytes"], 2) if first["bytes"] else None,
        "ms_ratio": round(last["ms"] / first["ms"], 2) if first["ms"] else None,
        "mean_ms": round(statistics.mean(r["ms"] for r in steady), 2),
        "total_bytes": rows[-1]["total_bytes"],
        "db_bytes": rows[-1]["db_bytes"],
    }


def human(n: float) -> str:
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def table(report: dict[str, Any]) -> str:
    points = report["points"]
    out = report["variants"]
    last = points[-1]
    lines = [
        f"| {report['backend']}, {report['turns']} turns | plain LangGraph | keelgraph |",
        "|---|---:|---:|",
    ]

    def row(label: str, fn: Any) -> None:
        lines.append(f"| {label} | {fn(out['plain'])} | {fn(out['keelgraph'])} |")

    for p in points:
        row(f"bytes/turn @ turn {p}", lambda v, p=p: human(v["summary"]["at"][str(p)]["bytes"]))
    row(f"bytes ratio {last}/{points[0]} (target <= 1.5)", lambda v: f"{v['summary']['bytes_ratio']}x")
    for p in points:
        row(f"ms/turn @ turn {p} (median)", lambda v, p=p: f"{v['summary']['at'][str(p)]['ms']:.1f}")
    row(f"ms ratio {last}/{points[0]} (target <= 1.3)", lambda v: f"{v['summary']['ms_ratio']}x")
    row("mean ms/turn, turns 2..T", lambda v: f"{v['summary']['mean_ms']:.1f}")
    row("checkpoints/turn", lambda v: f"{v['summary']['at'][str(last)]['checkpoints']:g}")
    row(f"checkpoint data after {last} turns", lambda v: human(v["summary"]["total_bytes"]))
    row("database size", lambda v: human(v["summary"]["db_bytes"]))
    row("peak RSS, growth run (MB)", lambda v: f"{v['growth']['peak_rss_mb']:.0f}")
    conc = f"{report['threads']} threads x {report['concurrent_turns']} turns"
    row(f"turns/s, {conc} (async)", lambda v: f"{v['concurrency']['turns_per_s']:.1f}")
    row(
        "latency p50 / p95 ms (async)",
        lambda v: f"{v['concurrency']['p50_ms']:.0f} / {v['concurrency']['p95_ms']:.0f}",
    )
    row("peak RSS, concurrent run (MB)", lambda v: f"{v['concurrency']['peak_rss_mb']:.0f}")
    if "slow_model" in out["plain"]:
        slow = f"model answering in {report['model_ms']:g} ms"
        row(f"turns/s, {conc}, {slow}", lambda v: f"{v['slow_model']['turns_per_s']:.1f}")
        row(
            f"latency p50 / p95 ms, {slow}",
            lambda v: f"{v['slow_model']['p50_ms']:.0f} / {v['slow_model']['p95_ms']:.0f}",
        )
    return "\n".join(lines)


def channel_table(report: dict[str, Any]) -> str:
    lines = [
        "| variant | channel | " + " | ".join(f"bytes @ turn {t}" for t in report["channel_turns"]) + " |"
    ]
    lines.append("|---|---|" + "---:|" * len(report["channel_turns"]))
    for variant in VARIANTS:
        sizes = report["variants"][variant]["growth"]["channels"]
        final = sizes[str(report["channel_turns"][-1])]
        for name in list(final)[:8]:
            cells = " | ".join(str(sizes[str(t)].get(name, 0)) for t in report["channel_turns"])
            lines.append(f"| {variant} | {name} | {cells} |")
    return "\n".join(lines)


def verdict(report: dict[str, Any]) -> list[str]:
    kg, plain = report["variants"]["keelgraph"]["summary"], report["variants"]["plain"]["summary"]
    last, first = report["points"][-1], report["points"][0]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = report["variants"]
    ratios = [
        f"keelgraph/plain turns/s, {kind.replace('_', ' ')}: {ratio:.2f}x (>= 1.0: {mark(ratio >= 1.0)})"
        for kind in ("concurrency", "slow_model")
        if kind in out["plain"]
        and (ratio := out["keelgraph"][kind]["turns_per_s"] / max(out["plain"][kind]["turns_per_s"], 1e-9))
    ]
    return [
        *ratios,
        f"keelgraph bytes/turn {last}/{first}: {kg['bytes_ratio']}x (<= 1.5x: {mark((kg['bytes_ratio'] or 0) <= 1.5)})",
        f"keelgraph ms/turn {last}/{first}: {kg['ms_ratio']}x (<= 1.3x: {mark((kg['ms_ratio'] or 0) <= 1.3)})",
        f"keelgraph mean ms/turn {kg['mean_ms']:.1f} vs plain {plain['mean_ms']:.1f} "
        f"(no more than plain: {mark(kg['mean_ms'] <= plain['mean_ms'])})",
    ]


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for variant, color in zip(VARIANTS, ("tab:gray", "tab:blue"), strict=True):
        rows = report["variants"][variant]["growth"]["rows"]
        turns = [r["turn"] for r in rows]
        label = "plain LangGraph" if variant == "plain" else "keelgraph"
        top.plot(turns, [r["bytes"] / 1024 for r in rows], color=color, label=label)
        bottom.plot(turns, [r["ms"] for r in rows], color=color, alpha=0.35, linewidth=0.8)
        smooth = [statistics.median(r["ms"] for r in window(rows, r["turn"])) for r in rows]
        bottom.plot(turns, smooth, color=color, label=f"{label} (median of 5)")
    top.set_ylabel("KB written per turn")
    top.set_title(f"One thread on {report['backend']}: checkpoint bytes and time per turn")
    top.legend()
    bottom.set_ylabel("ms per turn")
    bottom.set_xlabel("turn")
    bottom.set_ylim(bottom=0)
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"the {spec['variant']} {spec['kind']} worker failed ({done.returncode})")
    return dict(json.loads(Path(spec["result"]).read_text()))


@contextmanager
def targets(backend: Backend, workdir: Path, postgres_url: str | None) -> Iterator[Any]:
    """A function giving each (variant, kind) a fresh database of the backend."""
    if backend == "sqlite":
        yield lambda name: str(workdir / f"{name}.db")
        return
    from keelgraph.testing.postgres import LocalPostgres, create_database

    with ExitStack() as stack:
        if postgres_url is None:
            # The postgres user must reach the folder, so not under a private temp dir.
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kg-bench-pg-", dir="/tmp")))
            os.chmod(base, 0o755)
            postgres_url = stack.enter_context(LocalPostgres(base / "pg")).url
            log(f"PostgreSQL started at {postgres_url}")
        url = postgres_url
        suffix = uuid.uuid4().hex[:8]
        yield lambda name: create_database(url, f"bench_{name.replace('-', '_')}_{suffix}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--threads", type=int, default=50)
    parser.add_argument(
        "--concurrent-turns", type=int, default=5, help="turns per thread in the concurrent run"
    )
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres-url", help="use this server instead of starting a local one")
    parser.add_argument("--strategy", default="json_object", help="keelgraph's output strategy")
    parser.add_argument(
        "--model-ms",
        type=float,
        default=200,
        help="the slow model's answer time in the second concurrent run",
    )
    parser.add_argument("--quick", action="store_true", help="12 turns, 4 threads x 2 turns")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.quick:
        args.turns, args.threads, args.concurrent_turns = 12, 4, 2
    if args.backend == "postgres":
        try:
            import langgraph.checkpoint.postgres  # noqa: F401

            from keelgraph.graphs.persistence import checkpointer  # noqa: F401
            from keelgraph.testing.postgres import LocalPostgres  # noqa: F401
        except ImportError as exc:
            print(f"skipped: --backend postgres needs {exc.name}", file=sys.stderr)
            return 0
    points = sorted({p for p in POINTS if p <= args.turns} | {args.turns})
    started = time.perf_counter()
    report: dict[str, Any] = {
        "backend": args.backend,
        "turns": args.turns,
        "threads": args.threads,
        "concurrent_turns": args.concurrent_turns,
        "model_ms": args.model_ms,
        "strategy": args.strategy,
        "points": points,
        "channel_turns": sorted({min(10, args.turns), args.turns}),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_before": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {p: metadata.version(p) for p in PACKAGES},
        "variants": {v: {} for v in VARIANTS},
    }
    with tempfile.TemporaryDirectory(prefix="kg-bench-memory-") as tmp:
        work = Path(tmp)
        with targets(args.backend, work, args.postgres_url) as target:
            for kind in ("growth", "concurrency", "slow_model"):
                for variant in VARIANTS:
                    log(f"{variant} {kind} ...")
                    spec = {
                        "kind": "concurrency" if kind == "slow_model" else kind,
                        "latency_ms": args.model_ms if kind == "slow_model" else 0,
                        "variant": variant,
                        "backend": args.backend,
                        "target": target(f"{variant}-{kind}"),
                        "turns": args.turns if kind == "growth" else args.concurrent_turns,
                        "threads": args.threads,
                        "strategy": args.strategy,
                        "data_dir": str(work / "data"),
                        "result": str(work / f"{variant}-{kind}.json"),
                    }
                    report["variants"][variant][kind] = run_worker(spec)
    for variant in VARIANTS:
        report["variants"][variant]["summary"] = summarise(
            report["variants"][variant]["growth"]["rows"], points
        )
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    text = "\n\n".join([table(report), channel_table(report), "\n".join(verdict(report))])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "memory" if args.backend == "sqlite" else "memory.postgres"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(text + "\n")
    plot(report, args.out / f"{stem}.png")
    log(f"done in {report['seconds']:.0f} s; wrote {args.out}/{stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
