"""`bench/memory.py` and `bench/multiprocess_sqlite.py` run small and write what they print."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).parents[1]
BENCH = ROOT / "bench"


def bench(script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def load_memory() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH / "memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_memory_report(report: dict[str, Any], out: Path, stem: str, stdout: str) -> None:
    assert report["turns"] == 12 and report["points"] == [10, 12]
    for name in ("plain", "keelgraph"):
        variant = report["variants"][name]
        rows = variant["growth"]["rows"]
        assert [r["turn"] for r in rows] == list(range(1, 13))
        assert all(r["bytes"] > 0 and r["checkpoints"] > 0 and r["ms"] > 0 for r in rows)
        assert sum(r["bytes"] for r in rows) == rows[-1]["total_bytes"] == variant["summary"]["total_bytes"]
        # Every turn: request, tool call, tool result, answer. keelgraph's state holds the last turn
        # only, its archive every earlier one.
        assert variant["growth"]["transcript_messages"] == 4 * 12
        assert variant["growth"]["messages"] == (4 if name == "keelgraph" else 4 * 12)
        assert "messages" in variant["growth"]["channels"]["12"]
        assert variant["growth"]["peak_rss_mb"] > 0 and variant["concurrency"]["peak_rss_mb"] > 0
        assert variant["concurrency"]["turns_per_s"] > 0 and variant["concurrency"]["threads"] == 4
        # the printed table carries the same numbers as the JSON
        at10 = variant["summary"]["at"]["10"]
        assert f"{at10['ms']:.1f}" in stdout
    assert f"| {report['backend']}, 12 turns | plain LangGraph | keelgraph |" in stdout
    assert "bytes/turn @ turn 10" in stdout and "turns/s, 4 threads x 2 turns (async)" in stdout
    # The same concurrent turns with a model that takes 200 ms, awaited: both sides finished them.
    assert "turns/s, 4 threads x 2 turns, model answering in 200 ms" in stdout
    for variant in ("plain", "keelgraph"):
        assert report["variants"][variant]["slow_model"]["turns_per_s"] > 0
    assert "keelgraph/plain turns/s, slow model:" in stdout
    assert (out / f"{stem}.md").read_text().strip() == stdout.strip()
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_bench_quick(tmp_path: Path) -> None:
    done = bench("memory.py", "--quick", "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plain growth: turn 12/12" in done.stderr  # progress lines while it runs
    report = json.loads((tmp_path / "memory.json").read_text())
    check_memory_report(report, tmp_path, "memory", done.stdout)


@pytest.mark.e2e
def test_memory_bench_quick_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    done = bench(
        "memory.py", "--quick", "--backend", "postgres", "--postgres-url", postgres_url, "--out", tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "memory.postgres.json").read_text())
    check_memory_report(report, tmp_path, "memory.postgres", done.stdout)


def test_windows_and_ratios() -> None:
    memory = load_memory()
    rows = [
        {"turn": t, "ms": float(t), "bytes": 100 * t, "checkpoints": 5, "total_bytes": 0, "db_bytes": 0}
        for t in range(1, 201)
    ]
    assert [r["turn"] for r in memory.window(rows, 10)] == [8, 9, 10, 11, 12]
    assert [r["turn"] for r in memory.window(rows, 200)] == [196, 197, 198, 199, 200]
    assert [r["turn"] for r in memory.window(rows, 1)] == [1, 2, 3]
    summary = memory.summarise(rows, [10, 200])
    assert summary["at"]["10"] == {"bytes": 1000, "ms": 10.0, "checkpoints": 5}
    assert summary["bytes_ratio"] == 19.8 and summary["ms_ratio"] == 19.8


def test_multiprocess_sqlite_quick(tmp_path: Path) -> None:
    done = bench(
        "multiprocess_sqlite.py", "--processes", "2", "--runs", "3", "--shared", "2", "--shared-runs", "2",
        "--out", tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    first = done.stdout.splitlines()[0]
    assert first.startswith(
        "2 processes x 3 runs on one SQLite file: 0 errors (0 'database is locked'), 6/6 threads complete"
    )
    report = json.loads((tmp_path / "multiprocess_sqlite.json").read_text())
    assert report["errors"] == [] and report["incomplete_threads"] == []
    assert report["own_threads"]["runs"] == 6 and report["own_threads"]["runs_per_s"] > 0
    assert report["shared_threads"]["runs"] == 4
    assert sum(s["runs"] for s in report["shared"].values()) == 4
    # One writer per thread: every shared turn is kept or refused typed, none lost.
    assert report["shared_lost"] == 0
    assert report["shared_busy"] + sum(s["turns_kept"] for s in report["shared"].values()) == 4
