"""Load check of the served main graph: N concurrent clients x M runs over HTTP, loopback only.

A real `langgraph dev` serves the repository's langgraph.json (keelgraph's auth, SQLite
checkpointer and store) with two graphs from `bench/served_graphs.py`: keelgraph's main graph
(order support) and a plain LangGraph graph, both on the same scripted model, so what is measured
is the server plus the graph, not a model. Each client is its own user (its own bearer token) and
sends its runs one after another on its own thread; all clients run at once.

Checked after the load, per thread: every run is listed once and succeeded, and the thread holds
each request exactly once and in order (no lost and no duplicated runs).

Run: .venv/bin/python bench/serve_load.py [--clients 8] [--runs 25] [--jobs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langgraph_sdk import get_client

from keelgraph.apps.support.desk import link_user, seed_database
from keelgraph.serving.auth import TokenFile
from keelgraph.serving.serve import DevServer, write_config

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = {"support": "bench/served_graphs.py:support", "plain": "bench/served_graphs.py:plain"}


@dataclass
class Result:
    graph: str
    clients: int
    runs_per_client: int
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0

    @property
    def runs(self) -> int:
        return len(self.latencies_s)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_s) or [0.0]
        return {
            "graph": self.graph,
            "clients": self.clients,
            "runs_per_client": self.runs_per_client,
            "runs": self.runs,
            "seconds": round(self.seconds, 2),
            "runs_per_s": round(self.runs / self.seconds, 2) if self.seconds else 0.0,
            "p50_ms": round(statistics.median(ordered) * 1000),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000),
            "max_ms": round(ordered[-1] * 1000),
            "errors": len(self.errors),
            "lost": self.lost,
            "duplicated": self.duplicated,
        }


def _request(graph: str, client: int, i: int) -> dict[str, Any]:
    text = f"client {client} question {i}: any news?"
    if graph == "support":
        return {"request": {"message": text}}  # the customer is the signed-in user's (link_user)
    return {"messages": [{"role": "user", "content": text}]}


def _sent_texts(values: dict[str, Any], graph: str) -> list[str]:
    found = []
    for message in values.get("messages", []):
        if message.get("type") != "human":
            continue
        content = str(message.get("content"))
        if graph == "support":
            try:
                content = str(json.loads(content).get("message", ""))
            except (ValueError, AttributeError):
                continue
        found.append(content)
    return found


def _turn_requests(history: list[Any]) -> list[str]:
    """The message of each finished turn's request, in turn order, from a keelgraph thread's
    checkpoints (a turn's last checkpoint has nothing next; the one written when the next request
    arrives still carries the previous turn's number, so only finished turns are read)."""
    by_turn: dict[int, str] = {}
    for checkpoint in history:
        values = checkpoint["values"] if isinstance(checkpoint["values"], dict) else {}
        if checkpoint.get("next"):
            continue
        request, turn = values.get("request"), values.get("turn")
        if isinstance(turn, int) and isinstance(request, dict):
            by_turn.setdefault(turn, str(request.get("message", "")))
    return [by_turn[t] for t in sorted(by_turn)]


async def _client(
    url: str, token: str, graph: str, *, client: int, runs: int, result: Result, done: list[int]
) -> None:
    async with get_client(url=url, api_key=None, headers={"Authorization": f"Bearer {token}"}) as api:
        thread_id = (await api.threads.create())["thread_id"]
        for i in range(runs):
            started = time.perf_counter()
            try:
                out = await api.runs.wait(thread_id, graph, input=_request(graph, client, i))
                if graph == "support" and not (isinstance(out, dict) and out.get("status") == "ok"):
                    result.errors.append(f"client {client} run {i}: {str(out)[:200]}")
            except Exception as exc:  # counted and reported, the load goes on
                result.errors.append(f"client {client} run {i}: {type(exc).__name__}: {exc}")
            result.latencies_s.append(time.perf_counter() - started)
            done[0] += 1
        # Audit the thread: each request exactly once, in order; each run listed once and successful.
        if graph == "support":
            # keelgraph's state holds the turn in progress (earlier turns move to the thread's
            # archive): each turn's request is read from the thread's checkpoints, by turn number.
            history = await api.threads.get_history(thread_id, limit=runs * 12 + 10)
            sent = _turn_requests(history)
        else:
            state = await api.threads.get_state(thread_id)
            sent = _sent_texts(state["values"] if isinstance(state["values"], dict) else {}, graph)
        expected = [_request(graph, client, i) for i in range(runs)]
        wanted = [
            e["request"]["message"] if graph == "support" else e["messages"][0]["content"] for e in expected
        ]
        result.lost += sum(1 for text in wanted if text not in sent)
        result.duplicated += sum(sent.count(text) - 1 for text in wanted if sent.count(text) > 1)
        if [t for t in sent if t in wanted] != wanted and not result.lost and not result.duplicated:
            result.errors.append(f"client {client}: requests out of order")
        listed = await api.runs.list(thread_id, limit=runs + 10)
        if len(listed) != runs or any(r["status"] != "success" for r in listed):
            statuses = sorted(r["status"] for r in listed)
            result.errors.append(f"client {client}: {len(listed)} runs listed for {runs} sent: {statuses}")


async def _load(url: str, tokens: list[str], graph: str, runs: int) -> Result:
    result = Result(graph, len(tokens), runs)
    done = [0]
    total = len(tokens) * runs
    tasks = [
        asyncio.create_task(_client(url, token, graph, client=n, runs=runs, result=result, done=done))
        for n, token in enumerate(tokens)
    ]
    started = time.perf_counter()
    reported = 0
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0.5)
        if done[0] - reported >= max(1, total // 4) or (done[0] == total and reported < total):
            reported = done[0]
            print(f"  {graph}: {done[0]}/{total} runs ({time.perf_counter() - started:.1f} s)", flush=True)
    result.seconds = time.perf_counter() - started
    for task in tasks:
        task.result()
    return result


def table(rows: list[dict[str, Any]]) -> str:
    head = "| graph | clients x runs | runs/s | p50 ms | p95 ms | max ms | errors | lost | duplicated |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['graph']} | {r['clients']} x {r['runs_per_client']} | {r['runs_per_s']} | {r['p50_ms']} "
            f"| {r['p95_ms']} | {r['max_ms']} | {r['errors']} | {r['lost']} | {r['duplicated']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--runs", type=int, default=25, help="runs per client, one after another")
    parser.add_argument("--jobs", type=int, default=10, help="runs the server executes at once")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    if not (1 <= args.clients <= 64 and 1 <= args.runs <= 200):
        parser.error("bounded load: 1-64 clients and 1-200 runs per client")
    with tempfile.TemporaryDirectory(prefix="keelgraph-load-") as tmp:
        folder = Path(tmp)
        token_file = TokenFile(folder / "tokens.json")
        tokens = [token_file.create(f"user{n}") for n in range(args.clients)]
        env = {
            **os.environ,
            "KEELGRAPH_DATA_DIR": str(folder / "data"),
            "KEELGRAPH_AUTH_TOKENS": str(token_file.path),
            "KEELGRAPH_DATABASE_URL": "",
        }
        shop = seed_database(folder / "data" / "shop.db")
        for n in range(args.clients):  # each client's user acts as one of the shop's four customers
            link_user(shop, f"user{n}", n % 4 + 1)
        config = write_config(folder, ROOT / "langgraph.json", graphs=GRAPHS)
        print(
            f"langgraph dev, {args.clients} clients x {args.runs} runs, {args.jobs} jobs at once", flush=True
        )
        with DevServer(config, env=env, log=folder / "langgraph-dev.log", jobs=args.jobs) as server:
            results = [
                asyncio.run(_load(server.url, tokens, graph, args.runs)) for graph in ("plain", "support")
            ]
    rows = [r.summary() for r in results]
    plain, support = rows
    ratio = support["runs_per_s"] / plain["runs_per_s"] if plain["runs_per_s"] else 0.0
    print()
    print(table(rows))
    print(f"\nkeelgraph main graph / plain LangGraph graph, runs/s: {ratio:.2f}")
    for r in results:
        for error in r.errors[:5]:
            print(f"error ({r.graph}): {error}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"results": rows, "ratio_runs_per_s": round(ratio, 3)}, indent=2))
    failed = any(r.errors or r.lost or r.duplicated for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
