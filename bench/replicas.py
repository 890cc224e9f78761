"""Load check across Aegra replicas on one PostgreSQL: N clients x M runs for 1, 2 and 3 replicas.

Real Aegra processes (`keelgraph.serving.aegra`: keelgraph's auth, checkpointer, store and lease)
serve keelgraph's main graph (order support) with its scripted model, on a private PostgreSQL
(`keelgraph.testing.postgres.LocalPostgres`), loopback only. Each client is its own user with its
own thread and sends its runs one after another; run i of client n goes to replica (n + i) % R, so
every thread moves between replicas from turn to turn. All clients run at once.

Checked after the load, per thread (as `bench/serve_load.py` does): every run is listed once and
succeeded, and the thread's checkpoints hold each request exactly once and in order.

Run: .venv/bin/python bench/replicas.py [--clients 12] [--runs 10] [--replicas 1,2,3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from langgraph_sdk import get_client

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import Result, _request, _turn_requests

from keelgraph.apps.support.desk import link_user, seed_database
from keelgraph.serving.aegra import AEGRA_VERSION, Replicas, write_aegra_config
from keelgraph.serving.auth import TokenFile
from keelgraph.testing.postgres import LocalPostgres, create_database

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = {"support": f"{ROOT / 'bench' / 'served_graphs.py'}:support"}
GRAPH = "support"


async def _client(urls: list[str], token: str, *, client: int, runs: int, result: Result) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    apis = [get_client(url=url, api_key=None, headers=headers) for url in urls]
    try:
        thread_id = (await apis[client % len(apis)].threads.create())["thread_id"]
        for i in range(runs):
            api = apis[(client + i) % len(apis)]
            started = time.perf_counter()
            try:
                out = await api.runs.wait(thread_id, GRAPH, input=_request(GRAPH, client, i))
                if not (isinstance(out, dict) and out.get("status") == "ok"):
                    result.errors.append(f"client {client} run {i}: {str(out)[:200]}")
            except Exception as exc:  # counted and reported, the load goes on
                result.errors.append(f"client {client} run {i}: {type(exc).__name__}: {exc}")
            result.latencies_s.append(time.perf_counter() - started)
        # The audit reads from another replica than the last run's.
        audit = apis[(client + runs) % len(apis)]
        history = await audit.threads.get_history(thread_id, limit=runs * 12 + 10)
        sent = _turn_requests(history)
        wanted = [_request(GRAPH, client, i)["request"]["message"] for i in range(runs)]
        result.lost += sum(1 for text in wanted if text not in sent)
        result.duplicated += sum(sent.count(text) - 1 for text in wanted if sent.count(text) > 1)
        if [t for t in sent if t in wanted] != wanted and not result.lost and not result.duplicated:
            result.errors.append(f"client {client}: requests out of order")
        listed = await audit.runs.list(thread_id, limit=runs + 10)
        if len(listed) != runs or any(r["status"] != "success" for r in listed):
            statuses = sorted(r["status"] for r in listed)
            result.errors.append(f"client {client}: {len(listed)} runs listed for {runs} sent: {statuses}")
    finally:
        for api in apis:
            await api.aclose()


async def _load(urls: list[str], tokens: list[str], runs: int) -> Result:
    result = Result(f"{len(urls)} replica{'s' if len(urls) > 1 else ''}", len(tokens), runs)
    started = time.perf_counter()
    await asyncio.gather(
        *(_client(urls, token, client=n, runs=runs, result=result) for n, token in enumerate(tokens))
    )
    result.seconds = time.perf_counter() - started
    return result


def table(rows: list[dict[str, Any]]) -> str:
    head = "| replicas | clients x runs | runs/s | p50 ms | p95 ms | max ms | errors | lost | duplicated |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['replicas']} | {r['clients']} x {r['runs_per_client']} | {r['runs_per_s']} | {r['p50_ms']} "
            f"| {r['p95_ms']} | {r['max_ms']} | {r['errors']} | {r['lost']} | {r['duplicated']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--runs", type=int, default=10, help="runs per client, one after another")
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to measure, e.g. 1,2,3")
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.replicas.split(",")]
    if not (1 <= args.clients <= 64 and 1 <= args.runs <= 100 and all(1 <= c <= 4 for c in counts)):
        parser.error("bounded load: 1-64 clients, 1-100 runs per client, 1-4 replicas")
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="keelgraph-replicas-") as tmp:
        folder = Path(tmp)
        os.chmod(folder, 0o755)  # the PostgreSQL server runs as `postgres` when this runs as root
        token_file = TokenFile(folder / "tokens.json")
        tokens = [token_file.create(f"user{n}") for n in range(args.clients)]
        shop = seed_database(folder / "data" / "shop.db")
        for n in range(args.clients):  # each client's user acts as one of the shop's four customers
            link_user(shop, f"user{n}", n % 4 + 1)
        env = {
            **os.environ,
            "KEELGRAPH_DATA_DIR": str(folder / "data"),
            "KEELGRAPH_AUTH_TOKENS": str(token_file.path),
        }
        with LocalPostgres(folder / "pg") as postgres:
            for count in counts:
                database = create_database(postgres.url, f"bench_{uuid.uuid4().hex[:10]}")
                config = write_aegra_config(folder / f"r{count}", ROOT / "langgraph.json", graphs=GRAPHS)
                print(
                    f"Aegra {AEGRA_VERSION}: {count} replica(s), {args.clients} x {args.runs} runs",
                    flush=True,
                )
                with Replicas(config, database, count, env=env, log_dir=folder / f"r{count}") as replicas:
                    # Warm-up (threads of their own): every replica loads and compiles the graph.
                    asyncio.run(_load(replicas.urls, tokens[:count], 2))
                    result = asyncio.run(_load(replicas.urls, tokens, args.runs))
                row = {"replicas": count, **result.summary()}
                del row["graph"]
                rows.append(row)
                errors += result.errors
                print(table(rows[-1:]), flush=True)
    print()
    print(table(rows))
    for error in errors[:10]:
        print(f"error: {error}", file=sys.stderr)
    if args.out:
        machine = f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
        args.out.with_suffix(".json").write_text(
            json.dumps({"aegra": AEGRA_VERSION, "machine": machine, "results": rows}, indent=2) + "\n"
        )
        args.out.with_suffix(".md").write_text(
            f"Aegra {AEGRA_VERSION} replicas on one PostgreSQL, {machine}, "
            f"`bench/replicas.py --clients {args.clients} --runs {args.runs}`\n\n{table(rows)}\n"
        )
    return 1 if errors or any(r["lost"] or r["duplicated"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
