"""Several writer processes on one thread: keelgraph's lease keeps or refuses every turn, none is lost.

For each backend (a SQLite file; PostgreSQL when its binaries are installed, on a throwaway local
server, or `--postgres-url`) and each writer count (2, 3, 4 by default), that many processes
(spawned once, released together at an agreed time) each send `--turns` turns to ONE thread of a
keelgraph graph with a scripted model (model-free): every turn calls a write tool, `place_order`,
which inserts the turn's id into an effects table, then answers. Afterwards the thread's latest
checkpoint is read back and each turn is counted once:

- kept: its request is in the thread;  refused: `graph.invoke` raised `ThreadBusy`;
- lost: `graph.invoke` returned ok but the thread does not keep it;  errors: anything else;
- effects: rows the write tool inserted; `effects == kept` when they are exactly the kept turns.

The control runs the same workload on LangGraph's plain `SqliteSaver` (no lease): there turns are
lost while their effects stay. Exits 1 if keelgraph's saver lost a turn, raised anything but
`ThreadBusy`, or left effects that differ from the kept turns.

Run:   .venv/bin/python bench/writers.py            (2/3/4 writers x 10 turns, both backends and the control)
Quick: .venv/bin/python bench/writers.py --writers 2 --turns 3 --backends sqlite
Writes bench/results/writers.json (or --out DIR). `--wait S` lets a refused writer wait S seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, Field

from keelgraph import Contract, ThreadBusy, build_graph
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools import with_policy

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("sqlite", "postgres", "control")
START_DELAY_S = 1.0  # every writer of a round starts at the same wall-clock time, this far ahead


class Order(BaseModel):
    item: str = Field(min_length=1, max_length=40)


class Receipt(BaseModel):
    reply: str


CONTRACT = Contract(
    input=Order, output=Receipt, instructions="Place the order with the tool, then confirm it."
)


def step(messages: list[BaseMessage]) -> Any:
    """The scripted model: place the requested order, then confirm it with the tool's result."""
    last = str(messages[-1].content)
    if last.startswith("Data from"):
        return answer(reply=last.split("\n", 1)[-1][:200])
    return call("place_order", item=json.loads(last)["item"])


def order_tool(effects_db: str) -> BaseTool:
    """A write tool whose effect is a row in `effects_db` (shared by every writer process)."""

    def place_order(item: str) -> str:
        conn = sqlite3.connect(effects_db, timeout=30.0, isolation_level=None)
        try:
            conn.execute("INSERT INTO effects (item) VALUES (?)", (item,))
        finally:
            conn.close()
        return f"placed {item}"

    tool = StructuredTool.from_function(place_order, name="place_order", description="Place an order")
    return with_policy(tool, side_effect="write")


@contextlib.contextmanager
def saver_for(job: dict[str, Any]) -> Iterator[Any]:
    """keelgraph's checkpointer for the job's target, or LangGraph's plain `SqliteSaver` (the control)."""
    if job["backend"] == "control":
        from langgraph.checkpoint.sqlite import SqliteSaver

        from keelgraph._sqlite import connect

        plain = SqliteSaver(connect(job["target"]))
        plain.setup()
        try:
            yield plain
        finally:
            plain.conn.close()
        return
    from keelgraph.graphs.persistence import checkpointer

    with checkpointer(job["target"]) as saver:
        yield saver


def run_job(index: int, job: dict[str, Any]) -> dict[str, str]:
    """One writer's turns on the shared thread: each turn's outcome by its id."""
    outcomes: dict[str, str] = {}
    with saver_for(job) as saver:
        graph = build_graph(
            CONTRACT,
            [order_tool(job["effects_db"])],
            model=ScriptedChatModel([step], repeat_last=True),
            checkpointer=saver,
            effects=None,
            strategy="json_object",
        )
        config = {"configurable": {"thread_id": job["thread"]}}
        time.sleep(max(0.0, job["start_at"] - time.time()))
        for turn in range(job["turns"]):
            item = f"w{index}-t{turn}"
            try:
                result = graph.invoke({"request": {"item": item}}, config)
                outcomes[item] = str(result.get("status"))
            except ThreadBusy:
                outcomes[item] = "refused"
            except Exception as exc:
                outcomes[item] = f"error: {type(exc).__name__}: {exc}"
    return outcomes


def writer(index: int, jobs: Any, results: Any, env: dict[str, str]) -> None:
    """A writer process: runs the jobs it is sent until it gets None."""
    os.environ.update(env)
    # Build a graph once before the first round, so imports do not stagger the writers' starts.
    build_graph(CONTRACT, [], model=ScriptedChatModel([]), checkpointer=None, effects=None)
    results.put({"ready": index})
    while (job := jobs.get()) is not None:
        try:
            results.put({"index": index, "outcomes": run_job(index, job)})
        except BaseException as exc:
            traceback.print_exc()
            results.put({"index": index, "outcomes": {}, "crash": f"{type(exc).__name__}: {exc}"})


def kept_items(job: dict[str, Any]) -> list[str]:
    """The turn ids whose request the thread's latest checkpoint keeps."""
    with saver_for(job) as saver:
        graph = build_graph(CONTRACT, [], model=ScriptedChatModel([]), checkpointer=saver, effects=None)
        messages = graph.get_state({"configurable": {"thread_id": job["thread"]}}).values.get("messages", [])
    items = []
    for message in messages:
        if message.type == "human":
            with contextlib.suppress(ValueError, TypeError, KeyError):
                items.append(json.loads(str(message.content))["item"])
    return items


def effect_items(effects_db: str) -> list[str]:
    conn = sqlite3.connect(effects_db)
    try:
        return [row[0] for row in conn.execute("SELECT item FROM effects ORDER BY rowid")]
    finally:
        conn.close()


def run_round(
    backend: str, target: str, *, writers: int, turns: int, pool: list[Any], results: Any, tmp: Path
) -> dict[str, Any]:
    """`writers` processes x `turns` turns on one fresh thread; the counted outcome."""
    effects_db = str(tmp / f"effects-{backend}-{writers}.db")
    conn = sqlite3.connect(effects_db)
    conn.execute("CREATE TABLE effects (item TEXT NOT NULL)")
    conn.commit()
    conn.close()
    job = {
        "backend": backend,
        "target": target,
        "thread": f"{backend}-{writers}-writers",
        "effects_db": effects_db,
        "turns": turns,
    }
    with saver_for(job):  # the schema, once, before the race (as bench/multiprocess_sqlite.py does)
        pass
    job["start_at"] = time.time() + START_DELAY_S
    began = time.perf_counter()
    for jobs in pool[:writers]:
        jobs.put(job)
    reports = [results.get(timeout=600) for _ in range(writers)]
    seconds = time.perf_counter() - began
    outcomes = {item: status for report in reports for item, status in report["outcomes"].items()}
    crashes = [report["crash"] for report in reports if "crash" in report]
    kept = kept_items(job)
    effects = effect_items(effects_db)
    returned_ok = [item for item, status in outcomes.items() if status == "ok"]
    refused = [item for item, status in outcomes.items() if status == "refused"]
    errors = [f"{item}: {status}" for item, status in outcomes.items() if status not in ("ok", "refused")]
    return {
        "backend": backend,
        "saver": "LangGraph SqliteSaver" if backend == "control" else "keelgraph",
        "writers": writers,
        "sent": writers * turns,
        "ok": len(returned_ok),
        "refused": len(refused),
        "kept": len(kept),
        "lost": len(set(returned_ok) - set(kept)),
        "refused_but_kept": len(set(refused) & set(kept)),
        "errors": len(errors) + len(crashes),
        "effects": len(effects),
        "effects_match": sorted(effects) == sorted(kept),
        "seconds": round(seconds, 2),
        "error_samples": (crashes + errors)[:5],
    }


def failed(row: dict[str, Any]) -> bool:
    """A keelgraph row that breaks the promise: a lost turn, an error, or effects that differ."""
    if row["saver"] != "keelgraph":
        return False
    return bool(row["lost"] or row["errors"] or row["refused_but_kept"] or not row["effects_match"])


HEAD = (
    "backend",
    "saver",
    "writers",
    "sent",
    "kept",
    "refused",
    "lost",
    "errors",
    "effects",
    "effects==kept",
    "s",
)
WIDTHS = (-8, -21, 7, 4, 4, 7, 4, 6, 7, 13, 5)  # negative: left-aligned


def table(rows: list[dict[str, Any]], *, head: bool = True) -> str:
    """The rows as a fixed-width table (`head=False`: the rows only)."""

    def line(cells: list[Any]) -> str:
        return "  ".join(
            f"{c!s:<{-w}}" if w < 0 else f"{c!s:>{w}}" for c, w in zip(cells, WIDTHS, strict=True)
        )

    lines = [line(list(HEAD))] if head else []
    for r in rows:
        cells = [r["backend"], r["saver"], r["writers"], r["sent"], r["kept"], r["refused"], r["lost"]]
        lines.append(
            line([*cells, r["errors"], r["effects"], "yes" if r["effects_match"] else "NO", r["seconds"]])
        )
    return "\n".join(lines)


@contextlib.contextmanager
def postgres_url(given: str | None, needed: bool) -> Iterator[str | None]:
    """`given`, else a throwaway local server's database; None when not needed or not installed."""
    from keelgraph.testing.postgres import LocalPostgres, create_database, find_pg_bin

    if not needed:
        yield None
        return
    if given:
        yield given
        return
    if find_pg_bin() is None:
        yield None
        return
    # Its own folder: when we are root, the server runs as the `postgres` user and is handed it.
    with (
        tempfile.TemporaryDirectory(prefix="kg-bench-pg-") as base,
        LocalPostgres(Path(base), fsync=False) as pg,
    ):
        yield create_database(pg.url, f"writers_{os.getpid()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--writers", type=int, nargs="+", default=[2, 3, 4], help="writer processes per round"
    )
    parser.add_argument("--turns", type=int, default=10, help="turns each writer sends")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--wait", type=float, default=0.0, help="KEELGRAPH_THREAD_WAIT_S for the writers")
    parser.add_argument("--postgres-url", help="an existing server's database (default: a throwaway one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kg-bench-writers-") as name:
        tmp = Path(name)
        env = {"KEELGRAPH_DATA_DIR": str(tmp / "data"), "KEELGRAPH_THREAD_WAIT_S": str(args.wait)}
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        pool = [ctx.Queue() for _ in range(max(args.writers))]
        procs = [ctx.Process(target=writer, args=(i, q, results, env)) for i, q in enumerate(pool)]
        for proc in procs:
            proc.start()
        try:
            for _ in procs:
                results.get(timeout=300)  # each writer's "ready"
            with postgres_url(args.postgres_url, "postgres" in args.backends) as url:
                for backend in args.backends:
                    target = str(tmp / f"{backend}.db") if backend != "postgres" else url
                    if target is None:
                        notes.append("postgres: skipped (PostgreSQL is not installed)")
                        continue
                    for writers in args.writers:
                        rows.append(
                            run_round(
                                backend,
                                target,
                                writers=writers,
                                turns=args.turns,
                                pool=pool,
                                results=results,
                                tmp=tmp,
                            )
                        )
                        print(table(rows[-1:], head=False), file=sys.stderr, flush=True)
        finally:
            for jobs in pool:
                jobs.put(None)
            for proc in procs:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
    report = {
        "turns_per_writer": args.turns,
        "wait_s": args.wait,
        "rows": rows,
        "notes": notes,
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(table(rows))
    for line in notes + [s for r in rows if failed(r) for s in r["error_samples"]]:
        print(line)
    broken = [r for r in rows if failed(r)]
    print(
        f"keelgraph: {sum(r['lost'] for r in rows if r['saver'] == 'keelgraph')} turns lost, "
        f"{len(broken)} rounds broke the promise; control: "
        f"{sum(r['lost'] for r in rows if r['saver'] != 'keelgraph')} turns lost "
        f"({report['seconds']} s, wait {args.wait} s)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "writers.json").write_text(json.dumps(report, indent=1) + "\n")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
