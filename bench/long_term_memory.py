"""Long-term memory numbers: embedding latency, and recall latency over 1,000 memories per backend.

.venv/bin/python bench/long_term_memory.py [--memories 1000] [--postgres]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from langgraph.store.base import BaseStore
from langgraph.store.memory import InMemoryStore

from keelgraph.graphs.memory import embedder, recall, remember
from keelgraph.graphs.persistence import store

TOPICS = [
    "email",
    "phone",
    "DHL",
    "UPS",
    "gift wrap",
    "size M",
    "vegetarian",
    "Berlin",
    "invoices",
    "weekends",
]


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


@contextmanager
def _backend(name: str, tmp: Path) -> Iterator[BaseStore]:
    if name == "memory (no index)":
        yield InMemoryStore()
    elif name == "postgres":
        from keelgraph.testing.postgres import LocalPostgres

        with (
            tempfile.TemporaryDirectory(prefix="keelgraph-pg-") as folder,  # reachable by `postgres`
            LocalPostgres(Path(folder), fsync=False) as server,
            store(server.url, index="auto") as opened,
        ):
            yield opened
    else:
        with store(tmp / "store.db", index="auto") as opened:
            yield opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memories", type=int, default=1000)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    model = embedder()
    print(f"model load: {(time.perf_counter() - started) * 1000:.0f} ms")
    texts = [f"Customer note {i}: about {TOPICS[i % len(TOPICS)]}, remark number {i}" for i in range(256)]
    model.embed(texts[:4])
    one = []
    for text in texts[:50]:
        began = time.perf_counter()
        model.embed([text])
        one.append(time.perf_counter() - began)
    began = time.perf_counter()
    model.embed(texts)
    batched = (time.perf_counter() - began) / len(texts)
    print(
        f"embed one text: median {_median_ms(one):.1f} ms; in batches of 32: {batched * 1000:.1f} ms per text"
    )
    backends = ["sqlite (sqlite-vec index)", "memory (no index)"] + (["postgres"] if args.postgres else [])
    for name in backends:
        with tempfile.TemporaryDirectory() as tmp, _backend(name, Path(tmp)) as opened:
            began = time.perf_counter()
            for i in range(args.memories):
                remember(
                    opened,
                    "u",
                    f"Customer note {i}: about {TOPICS[i % len(TOPICS)]}, remark {i}",
                    kind="note",
                    max_items=args.memories,
                )
            write = (time.perf_counter() - began) / args.memories
            took = []
            for query in ["How should we contact the customer?", "Which carrier?", "What size?"] * 5:
                began = time.perf_counter()
                recall(opened, "u", query, limit=5)
                took.append(time.perf_counter() - began)
            print(
                f"{name}: remember {write * 1000:.1f} ms each; recall over {args.memories}: "
                f"median {_median_ms(took):.1f} ms, max {max(took) * 1000:.1f} ms"
            )


if __name__ == "__main__":
    main()
