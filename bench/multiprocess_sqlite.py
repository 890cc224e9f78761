"""Several processes writing one SQLite checkpoint file at once: no "database is locked", no lost thread.

N processes (spawned, released together by a barrier) each run M one-turn conversations of a
keelgraph graph (scripted model, one tool call then the answer; the work of `bench/memory.py`) on one
file opened with `keelgraph.graphs.persistence.sqlite_checkpointer`, each run in its own thread id.
Then every thread is read back: its latest checkpoint must hold status ok, the answer and the turn's
four messages (request, tool call, tool result, answer).

A second phase (`--shared K`, 0 turns it off) has every process run turns on K thread ids shared by
all processes. LangGraph does not lock a thread (turns run at once on it fork its history, and only
one branch is the latest); keelgraph's checkpointer leases it to one run (`keelgraph.graphs.lease`),
so each turn is either kept or refused as `ThreadBusy`: a lost turn or a dangling tool call is a
failure, as is any other exception.

Run:   .venv/bin/python bench/multiprocess_sqlite.py            (8 processes x 100 runs; under a minute)
Quick: .venv/bin/python bench/multiprocess_sqlite.py --processes 2 --runs 3 --shared-runs 2
Writes bench/results/multiprocess_sqlite.json (or --out DIR). Exits 1 on any error or incomplete thread.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import CONTRACT, keelgraph_step, make_tool, question

from keelgraph import build_graph
from keelgraph.contracts.errors import ThreadBusy
from keelgraph.graphs.persistence import sqlite_checkpointer
from keelgraph.testing import ScriptedChatModel

RESULTS = Path(__file__).resolve().parent / "results"
MESSAGES_PER_TURN = 4  # request, tool call, tool result, answer


def graph_on(path: str) -> Any:
    model = ScriptedChatModel([keelgraph_step], repeat_last=True)
    graph = build_graph(
        CONTRACT, [make_tool()], model=model, checkpointer=sqlite_checkpointer(path), strategy="json_object"
    )
    return graph, model


def worker(index: int, spec: dict[str, Any], barrier: Any, results: Any) -> None:
    """One process: M runs on its own threads, then its share of the runs on the shared threads."""
    out: dict[str, Any] = {"index": index, "errors": [], "phases": {}, "busy": 0}
    try:
        run_phases(index, spec, barrier, out)
    except BaseException as exc:  # report it, and release the others from the barrier
        out["errors"].append(f"process {index}: {type(exc).__name__}: {exc}")
        barrier.abort()
    finally:
        results.put(out)


def run_phases(index: int, spec: dict[str, Any], barrier: Any, out: dict[str, Any]) -> None:
    os.environ["KEELGRAPH_DATA_DIR"] = spec["data_dir"]
    graph, model = graph_on(spec["db"])
    plan = {
        "own": [f"p{index}-r{run}" for run in range(spec["runs"])],
        "shared": [f"shared-{(index + run) % spec['shared']}" for run in range(spec["shared_runs"])],
    }
    for phase, threads in plan.items():
        if not threads:
            continue
        barrier.wait(timeout=300)
        latencies: list[float] = []
        began = time.time()
        for turn, thread_id in enumerate(threads):
            t0 = time.perf_counter()
            try:
                result = graph.invoke(
                    {"request": {"question": question(turn)}}, {"configurable": {"thread_id": thread_id}}
                )
                if result.get("status") != "ok":
                    out["errors"].append(f"{thread_id}: status {result.get('status')}: {result.get('error')}")
            except ThreadBusy:
                out["busy"] += 1  # another process holds the thread: refused typed, nothing written
            except Exception as exc:
                out["errors"].append(f"{thread_id}: {type(exc).__name__}: {exc}")
                if len(out["errors"]) <= 3:
                    traceback.print_exc()
            latencies.append((time.perf_counter() - t0) * 1000)
            model.calls.clear()
        out["phases"][phase] = {"began": began, "ended": time.time(), "latencies_ms": latencies}


def verify(db: str, threads: list[str]) -> list[str]:
    """Problems with the threads each run left behind (empty when every one is complete)."""
    graph, _ = graph_on(db)
    problems = []
    for thread_id in threads:
        values = graph.get_state({"configurable": {"thread_id": thread_id}}).values
        if values.get("status") != "ok" or not values.get("output"):
            problems.append(f"{thread_id}: status {values.get('status')!r}, output {values.get('output')!r}")
        elif len(values.get("messages", [])) != MESSAGES_PER_TURN:
            problems.append(
                f"{thread_id}: {len(values.get('messages', []))} messages, not {MESSAGES_PER_TURN}"
            )
    return problems


def shared_state(db: str, runs: dict[str, int]) -> dict[str, Any]:
    """What the latest checkpoint of each shared thread kept of the turns run on it."""
    graph, _ = graph_on(db)
    out: dict[str, Any] = {}
    for thread_id in sorted(runs):
        values = graph.get_state({"configurable": {"thread_id": thread_id}}).values
        messages = values.get("messages", [])
        kinds = [m.additional_kwargs.get("keelgraph") for m in messages]
        answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
        out[thread_id] = {
            "runs": runs[thread_id],
            "turns_kept": int(values.get("turn", 0)),  # turns the thread counts (archived ones too)
            "requests_kept": kinds.count("request"),
            "answers_kept": kinds.count("answer"),
            "dangling_tool_calls": sum(
                1
                for m in messages
                if isinstance(m, AIMessage)
                for c in m.tool_calls
                if c["id"] not in answered
            ),
            "messages": len(messages),
            "status": values.get("status"),
        }
    return out


def phase_summary(reports: list[dict[str, Any]], phase: str) -> dict[str, Any] | None:
    parts = [r["phases"][phase] for r in reports if phase in r["phases"]]
    if not parts:
        return None
    latencies = sorted(ms for p in parts for ms in p["latencies_ms"])
    seconds = max(p["ended"] for p in parts) - min(p["began"] for p in parts)
    return {
        "runs": len(latencies),
        "seconds": round(seconds, 2),
        "runs_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(statistics.median(latencies), 1),
        "p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
        "max_ms": round(latencies[-1], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument(
        "--runs", type=int, default=100, help="one-turn runs per process, each its own thread"
    )
    parser.add_argument("--shared", type=int, default=4, help="thread ids shared by all processes (0: skip)")
    parser.add_argument("--shared-runs", type=int, default=10, help="turns per process on the shared threads")
    parser.add_argument("--db", type=Path, help="write this (new) SQLite file instead of a temporary one")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kg-bench-mp-") as tmp:
        db = str(args.db or Path(tmp) / "threads.db")
        if Path(db).exists():
            parser.error(f"{db} exists: give a new file")
        spec = {
            "db": db,
            "runs": args.runs,
            "shared": args.shared,
            "shared_runs": args.shared_runs if args.shared else 0,
            "data_dir": str(Path(tmp) / "data"),
        }
        sqlite_checkpointer(db).conn.close()  # create the schema once, before the race
        ctx = mp.get_context("spawn")
        barrier, results = ctx.Barrier(args.processes), ctx.Queue()
        procs = [ctx.Process(target=worker, args=(i, spec, barrier, results)) for i in range(args.processes)]
        for proc in procs:
            proc.start()
        print(f"{args.processes} processes started; waiting for them", file=sys.stderr, flush=True)
        reports = [results.get(timeout=1800) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        crashed = [f"process {i} exited {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]
        errors = [e for r in sorted(reports, key=lambda r: r["index"]) for e in r["errors"]] + crashed
        own_threads = [f"p{i}-r{run}" for i in range(args.processes) for run in range(args.runs)]
        incomplete = verify(db, own_threads)
        shared_runs: dict[str, int] = {}
        for i in range(args.processes):
            for run in range(spec["shared_runs"]):
                key = f"shared-{(i + run) % args.shared}"
                shared_runs[key] = shared_runs.get(key, 0) + 1
        shared = shared_state(db, shared_runs)
        db_bytes = sum(os.path.getsize(db + s) for s in ("", "-wal") if os.path.exists(db + s))
    report = {
        "processes": args.processes,
        "runs_per_process": args.runs,
        "own_threads": phase_summary(reports, "own"),
        "shared_threads": phase_summary(reports, "shared"),
        "shared": shared,
        "errors": errors,
        "locked_errors": sum("database is locked" in e for e in errors),
        "incomplete_threads": incomplete,
        "db_bytes": db_bytes,
        "cpus": os.cpu_count(),
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.perf_counter() - started, 1),
    }
    own = report["own_threads"] or {"runs_per_s": 0, "p50_ms": 0, "p95_ms": 0}
    lines = [
        f"{args.processes} processes x {args.runs} runs on one SQLite file: {len(errors)} errors "
        f"({report['locked_errors']} 'database is locked'), {len(own_threads) - len(incomplete)}"
        f"/{len(own_threads)} threads complete, {own['runs_per_s']} runs/s "
        f"(p50 {own['p50_ms']} ms, p95 {own['p95_ms']} ms per run)",
    ]
    if report["shared_threads"]:
        total = {k: sum(s[k] for s in shared.values()) for k in ("runs", "requests_kept", "answers_kept")}
        dangling = sum(s["dangling_tool_calls"] for s in shared.values())
        busy = sum(r.get("busy", 0) for r in reports)
        lost = total["runs"] - busy - sum(s["turns_kept"] for s in shared.values())
        report["shared_busy"], report["shared_lost"] = busy, lost
        lines.append(
            f"shared threads: {total['runs']} turns from all processes on {len(shared)} threads, "
            f"{report['shared_threads']['runs_per_s']} runs/s; kept {total['requests_kept']} requests and "
            f"{total['answers_kept']} answers, {busy} refused as ThreadBusy (one writer per thread), "
            f"{lost} lost, {dangling} dangling tool calls"
        )
        if lost or dangling:
            errors.append(f"shared threads: {lost} turns lost, {dangling} dangling tool calls")
    for line in lines + errors[:10] + incomplete[:10]:
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multiprocess_sqlite.json").write_text(json.dumps(report, indent=1) + "\n")
    return 1 if errors or incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
