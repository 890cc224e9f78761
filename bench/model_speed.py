"""Prompt and generation speed of the embedded model on this machine (tokens/s), over HTTP.

Run: .venv/bin/python bench/model_speed.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

from keelgraph.local.embedded import LocalModelServer
from keelgraph.settings import Settings

PROMPT = "Write a Python function that checks whether a string is a palindrome, with a docstring."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    settings = Settings.from_env()
    started = time.perf_counter()
    with LocalModelServer(settings) as server:
        ready = time.perf_counter() - started
        rows = []
        for i in range(args.runs):
            body = {
                "model": settings.model,
                "messages": [{"role": "user", "content": f"{PROMPT} (variant {i})"}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
            }
            t0 = time.perf_counter()
            reply = httpx.post(f"{server.url}/chat/completions", json=body, timeout=300).json()
            rows.append(
                (
                    time.perf_counter() - t0,
                    reply["usage"]["prompt_tokens"],
                    reply["usage"]["completion_tokens"],
                )
            )
            print(f"run {i + 1}/{args.runs}: {rows[-1][0]:.2f} s, {rows[-1][2]} tokens out", flush=True)
    gen = [out / secs for secs, _, out in rows]
    result = {
        "model": settings.model,
        "threads": settings.llama_threads,
        "server_ready_s": round(ready, 2),
        "tokens_per_s_end_to_end_median": round(statistics.median(gen), 1),
        "runs": args.runs,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
