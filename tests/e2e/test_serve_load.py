"""`bench/serve_load.py` (quoted in the README) runs a bounded load and finds no lost or duplicated run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_serve_load_bench(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "serve_load.py"),
            "--clients",
            "4",
            "--runs",
            "5",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| support | 4 x 5 |" in done.stdout and "| plain | 4 x 5 |" in done.stdout
    results = json.loads(out.read_text())["results"]
    for row in results:
        assert row["runs"] == 20 and row["errors"] == row["lost"] == row["duplicated"] == 0, row
        assert row["runs_per_s"] > 0
