"""What recovering JSON from model output costs per MB, in its worst cases: trailing commas, nesting
at the depth limit, and a fenced block among chatter.

Each case is parsed at 1, 2, 4 and 8 MB (1 and 2 MB with `--quick`), best of three runs. Printed
per case: seconds per MB at each size, and the ratio time(largest) / time(1 MB) / (largest / 1 MB),
which is 1 when the cost is linear and grows with the size when it is not.

Run: .venv/bin/python bench/parse_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

from keelgraph.contracts.boundary import Limits
from keelgraph.contracts.parsing import parse_json

MB = 1_000_000
SIZES = (1, 2, 4, 8)
QUICK_SIZES = (1, 2)
RUNS = 3
LIMITS = Limits(max_chars=10 * MB, max_items=MB, max_nodes=10 * MB)
"""Room for 8 MB (the defaults refuse more than 1 MB of text)."""

ITEM = '{"id": 12345, "name": "widget \\"x\\" [1]", "tags": ["a", "b",], "price": 1.5,},'
CHATTER = "Sure! Here's the data you asked for, as JSON:\n"
OUTRO = "\nLet me know if you need anything else (or a different format)."


def trailing_commas(size: int) -> str:
    """A list of objects with a trailing comma in every list and object."""
    return "[" + ITEM * (size // len(ITEM)) + "]"


def deep(size: int) -> str:
    """A list of values nested to the depth limit, a trailing comma at every level."""
    levels = LIMITS.max_depth - 2  # the outer list and the innermost list take two levels
    item = '{"a": ' * levels + "[1, 2,]" + ",}" * levels + ","
    return "[" + item * (size // len(item)) + "]"


def fenced(size: int) -> str:
    """Chatter, a ```json block holding the trailing-comma list, and more chatter."""
    return CHATTER + "```json\n" + trailing_commas(size) + "\n```" + OUTRO


CASES: dict[str, Callable[[int], str]] = {
    "trailing commas": trailing_commas,
    "deep (64 levels)": deep,
    "fence + chatter": fenced,
}


def best_time(text: str) -> float:
    best = float("inf")
    for _ in range(RUNS):
        gc.collect()
        started = time.perf_counter()
        parse_json(text, limits=LIMITS)
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print the table; return each case's ratio (1 means linear)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="only 1 and 2 MB")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    print(f"{'case':<18}" + "".join(f"{f'{n} MB s/MB':>13}" for n in sizes) + f"{'ratio':>8}")
    ratios: dict[str, float] = {}
    for name, make in CASES.items():
        seconds = {n: best_time(make(n * MB)) for n in sizes}
        largest = sizes[-1]
        ratios[name] = seconds[largest] / seconds[sizes[0]] / (largest / sizes[0])
        cells = "".join(f"{seconds[n] / n:>13.3f}" for n in sizes)
        print(f"{name:<18}{cells}{ratios[name]:>8.2f}")
    return ratios


if __name__ == "__main__":
    main()
