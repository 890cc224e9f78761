"""The README's main job and the CLI, end to end on the embedded model over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def keelgraph(*args: str, data: Path, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEELGRAPH_DATA_DIR": str(data), **extra}
    env.pop("KEELGRAPH_BASE_URL", None)  # the embedded default, reusing the session's server
    return subprocess.run(
        [sys.executable, "-m", "keelgraph", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def data(tmp_path: Path, model_server: str) -> Path:
    return tmp_path / "data"


def test_demo(data: Path) -> None:
    done = keelgraph("demo", "--thread", "ci-demo", data=data)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("status  : ") == 3
    assert "error   : InputRejected (input_rejected)" in out
    # The customer comes from the sign-in (the demo's user ada), never from the request.
    assert "signed in as  : ada" in out
    assert "- customer_id: Extra inputs are not permitted" in out and "fix: remove `customer_id`" in out
    assert "=== summary" in out and "thread      : ci-demo" in out
    # Every model turn ended in a defined state, and the thread is in the documented data directory.
    assert all(
        s in {"ok", "failed"}
        for s in [line.split(":")[1].strip() for line in out.splitlines() if line.startswith("status")][:2]
    )
    assert (data / "threads.db").exists()
    history = keelgraph("history", "--thread", "ci-demo", data=data)
    assert '[human:rejected] {"customer_id": 2, "message": ""}' in history.stdout


def test_demo_on_native_tool_calling(data: Path) -> None:
    """The same demo through the endpoint's own tool calling (llama-cpp-python's
    `chatml-function-calling`, the embedded server's `+tools` alias): it refuses
    `tool_choice="required"` and null-content assistant messages, and the graph goes on."""
    done = keelgraph("demo", "--thread", "ci-demo-tools", data=data, KEELGRAPH_OUTPUT_STRATEGY="tool_calling")
    assert done.returncode == 0, done.stdout + done.stderr
    statuses = [line.split(":")[1].strip() for line in done.stdout.splitlines() if line.startswith("status")]
    assert statuses == ["ok", "ok", "rejected"], done.stdout + done.stderr
    assert '"action": "ticket_opened"' in done.stdout  # the approved tool call ran
    assert "+tools refused tool_choice" in done.stderr  # probed once, then "auto"


def test_thread_continues_across_processes(data: Path) -> None:
    first = keelgraph(
        "ask", "--user", "ada", "--thread", "t1", '{"message": "Where is my order 1002?"}', data=data
    )
    assert first.returncode in {0, 3}, first.stderr  # ok, or a typed failure
    second = keelgraph(
        "ask",
        "--thread",
        "t1",
        '{"message": "When did I place it?"}',
        data=data,  # ada by default
    )
    assert second.returncode in {0, 3}, second.stderr
    history = keelgraph("history", "--thread", "t1", data=data).stdout
    assert "Where is my order 1002?" in history and "When did I place it?" in history
    bad = keelgraph("ask", "--thread", "t1", "--input", "not json{", "--json", data=data)
    assert bad.returncode == 6  # ExitCode.REJECTED (2 is argparse's usage error)
    assert json.loads(bad.stdout)["error"]["problems"][0]["field"] == "request"
    assert "[human:rejected] not json{" in keelgraph("history", "--thread", "t1", data=data).stdout
