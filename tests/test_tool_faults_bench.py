"""`bench/tool_faults.py` (quoted in the README) runs and shows every fault contained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_tool_faults_bench_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tool_faults.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines()[1:] if not line.startswith(" ")]
    assert len(rows) == 5
    for row in rows:
        assert row.split()[-1] == "no" and " ok " in row, row  # every turn ended ok, nothing unwanted ran
