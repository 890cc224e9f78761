"""The reliability benchmark's own command, in its quick form, on the embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).parents[2]
HELDOUT_SMOKE = ("--set", "heldout", "--tasks", "thread-00", "--repeats", "0")


def test_reliability_benchmark_quick(tmp_path: Path, model_server: str) -> None:
    env = {**os.environ, "KEELGRAPH_LLAMA_PORT": str(urlparse(model_server).port)}
    env.pop("KEELGRAPH_BASE_URL", None)
    done = subprocess.run(
        [sys.executable, "bench/reliability.py", "--quick", "--set", "dev", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "reliability.json").read_text())
    blocks = {(b["method"], b["temperature"]): b for b in results["blocks"]}
    assert set(blocks) == {(m, t) for m in ("bare", "langchain", "keelgraph") for t in (0.0, 0.7)}
    for (method, temperature), block in blocks.items():
        summary = block["summary"]
        assert summary["tasks"] == 3 and summary["runs"] == (3 if temperature == 0 else 6), method
        assert 0 <= summary["pass1"] <= summary["valid"] <= 1
        assert all(r["calls"] >= 1 for r in block["runs"]), (method, "every run reached the model")
        if temperature > 0:
            assert "pass^2" in summary
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    table = (tmp_path / "reliability.md").read_text()
    assert table.startswith("| method | temp | valid | pass^1 | pass^2 |") and table.count("\n") == 8
    assert "| keelgraph | 0.7 |" in done.stdout


def test_held_out_two_turn_task_runs_every_method(tmp_path: Path, model_server: str) -> None:
    """The held-out set's multi-turn path on a real server: one two-turn task, every method, t=0."""
    env = {**os.environ, "KEELGRAPH_LLAMA_PORT": str(urlparse(model_server).port)}
    env.pop("KEELGRAPH_BASE_URL", None)
    done = subprocess.run(
        [sys.executable, "bench/reliability.py", *HELDOUT_SMOKE, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "reliability.json").read_text())
    assert len(results["config"]["heldout_sha256"]) == 12
    blocks = {b["method"]: b for b in results["blocks"]}
    assert set(blocks) == {"bare", "langchain", "keelgraph"} and {b["set"] for b in blocks.values()} == {
        "heldout"
    }
    for method, block in blocks.items():
        (run,) = block["runs"]
        assert run["calls"] >= 2, (method, "both turns reached the model")
        assert len(run["turns"]) == 2, method
        assert 0 <= block["summary"]["valid_but_wrong"] <= block["summary"]["valid"]
