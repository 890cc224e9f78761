"""The embedded model's speed by server thread count, on a quiet machine and beside busy neighbours.

On a 2-core machine a llama.cpp server that takes every core stalls when anything else runs: its
threads wait for each other at every layer, and a busy neighbour holds one of them. This measures
generation tokens/s for each thread count with 0, 1 and 2 CPU-bound neighbour processes (a pure
Python busy loop each), so the default (`KEELGRAPH_LLAMA_THREADS`, see `keelgraph.settings`) is chosen
from numbers, not guessed.

Run: .venv/bin/python bench/model_threads.py [--threads 1,2] [--neighbours 0,1,2] [--runs 3]
(about 4 minutes; nothing else should run on the machine meanwhile). Writes
bench/results/model_threads.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import httpx

from keelgraph.local.embedded import LocalModelServer
from keelgraph.local.processes import free_port
from keelgraph.settings import Settings

PROMPT = "Write a Python function that checks whether a string is a palindrome, with a docstring."
OUT = Path(__file__).parent / "results" / "model_threads.json"


def _burn(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def measure(url: str, model: str, runs: int, max_tokens: int, limit_s: float) -> dict[str, float]:
    """Generation speed (tokens/s, the median and the worst of `runs`), streamed so that a collapsed
    server is measured too: a request stops counting after `limit_s` seconds."""
    speeds = []
    for i in range(runs):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"{PROMPT} (variant {i})"}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        tokens, t0 = 0, time.perf_counter()
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=limit_s + 30) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    tokens += 1
                if time.perf_counter() - t0 > limit_s:
                    break
        speeds.append(tokens / (time.perf_counter() - t0))
    return {"tokens_per_s": round(statistics.median(speeds), 2), "worst_tokens_per_s": round(min(speeds), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", default=f"1,{os.cpu_count() or 2}")
    parser.add_argument("--neighbours", default="0,1,2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--limit-s", type=float, default=30.0, help="seconds a request is counted at most")
    args = parser.parse_args()
    threads = sorted({int(t) for t in args.threads.split(",")})
    neighbours = [int(n) for n in args.neighbours.split(",")]
    rows = []
    print(f"{'threads':>7} {'neighbours':>10} {'tokens/s':>9} {'worst':>7}", flush=True)
    for n_threads in threads:
        port = free_port()
        settings = dataclasses.replace(Settings.from_env(), llama_threads=n_threads, llama_port=port)
        with LocalModelServer(settings) as server:
            measure(server.url, settings.model, 1, 8, 60)  # warm: the first call maps the weights
            for busy in neighbours:
                stop = multiprocessing.Event()
                procs = [
                    multiprocessing.Process(target=_burn, args=(stop,), daemon=True) for _ in range(busy)
                ]
                for proc in procs:
                    proc.start()
                try:
                    row = {"threads": n_threads, "neighbours": busy,
                           **measure(server.url, settings.model, args.runs, args.max_tokens, args.limit_s)}  # fmt: skip
                finally:
                    stop.set()
                    for proc in procs:
                        proc.join(5)
                rows.append(row)
                print(
                    f"{n_threads:>7} {busy:>10} {row['tokens_per_s']:>9} {row['worst_tokens_per_s']:>7}",
                    flush=True,
                )
    cores = os.cpu_count() or 2

    def best(key: str) -> dict[int, int]:
        return {
            busy: max((r for r in rows if r["neighbours"] == busy), key=lambda r: r[key])["threads"]
            for busy in neighbours
        }

    fastest, safest = best("tokens_per_s"), best("worst_tokens_per_s")
    print(f"thread count with the best median tokens/s, by neighbours (cores: {cores}): {fastest}")
    print(f"thread count with the best worst-case tokens/s, by neighbours: {safest}")
    floor = {t: min(r["worst_tokens_per_s"] for r in rows if r["threads"] == t) for t in threads}
    print(f"worst tokens/s seen, by thread count: {floor} (the default leaves one core free: see Settings)")
    best = {"median": fastest, "worst": safest, "floor": floor}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"cores": cores, "rows": rows, "best": best}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
