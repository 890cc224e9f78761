"""Helper servers do not outlive a parent that was killed without running any cleanup."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keelgraph.contracts.errors import UserError
from keelgraph.local import processes
from keelgraph.local.processes import free_port, log_tail, start_helper, stop_group

PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen(
    [sys.executable, "-m", "keelgraph.local.orphan_guard", str(os.getpid()),
     "http.server", "0", "--bind", "127.0.0.1"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
)
print(child.pid, flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may be slow to reap the orphan)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_a_helper_exits_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        time.sleep(1.0)
        assert _running(child), "the helper should run while its parent lives"
        parent.kill()  # SIGKILL: no atexit, no finally
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child), "the orphaned helper kept running"
    finally:
        if _running(child):
            os.kill(child, 9)


# --- start_helper: one way to start a helper server, wait for it, and stop it ------------------


def _helper(script: str) -> list[str]:
    return [sys.executable, "-c", script]


SERVES = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(60)"


def _pid_in(log: Path) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        words = log.read_text().split() if log.exists() else []
        if len(words) >= 2 and words[0] == "pid":
            return int(words[1])
        time.sleep(0.05)
    raise AssertionError(f"no pid in {log}")


def test_a_helper_that_answers_is_returned_running_and_stop_group_ends_it(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "helper.log"  # the folder is created
    heard: list[str] = []
    ready = lambda: "pid" in log_tail(log)  # noqa: E731
    process = start_helper(
        _helper(SERVES), name="the helper", log_path=log, ready=ready, timeout_s=30, progress=heard.append
    )
    try:
        assert process.poll() is None and _running(_pid_in(log))
        assert len(heard) == 1 and heard[0].startswith("keelgraph: the helper answered after ")
    finally:
        stop_group(process, grace_s=5)
    assert process.poll() is not None


def test_a_helper_that_exits_is_reported_with_its_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "helper.log"
    script = "import sys; print('\\x1b[31mbad flag\\x1b[0m'); sys.exit(3)"
    with pytest.raises(UserError) as caught:
        start_helper(_helper(script), name="the helper", log_path=log, ready=lambda: False, timeout_s=30)
    assert str(caught.value) == f"the helper exited with 3 (log: {log}):\nbad flag"  # colours removed


def test_a_helper_that_never_answers_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "_NOTE_EVERY_S", 0.3)
    log = tmp_path / "helper.log"
    heard: list[str] = []
    with pytest.raises(UserError) as caught:
        start_helper(
            _helper(SERVES), name="the helper", log_path=log, ready=lambda: False, timeout_s=1,
            progress=heard.append,
        )  # fmt: skip
    pid = _pid_in(log)
    assert str(caught.value).startswith(f"the helper did not answer within 1 s (log: {log}):\npid {pid}")
    assert not _running(pid), "a helper that did not answer kept running"
    assert heard and all(h.startswith("keelgraph: still waiting for the helper (") for h in heard)


def test_an_interrupted_wait_stops_the_helper(tmp_path: Path) -> None:
    log = tmp_path / "helper.log"

    def interrupted() -> bool:
        if "pid" in log_tail(log):
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        start_helper(_helper(SERVES), name="the helper", log_path=log, ready=interrupted, timeout_s=30)
    assert not _running(_pid_in(log))


def test_log_tail_strips_colours_and_is_empty_without_a_log(tmp_path: Path) -> None:
    assert log_tail(tmp_path / "missing.log") == ""
    (tmp_path / "long.log").write_text("x" * 50 + "\x1b[1mend\x1b[0m\n")
    assert log_tail(tmp_path / "long.log", chars=5) == "xend"  # the last 5 characters, colours removed


def test_dev_server_follows_a_moved_port(tmp_path: Path) -> None:
    from keelgraph.serving.serve import DevServer

    port = free_port()
    server = DevServer(tmp_path / "langgraph.json", log=tmp_path / "dev.log")
    (tmp_path / "dev.log").write_text(
        f"WARNING Port {server.port} is already in use, using port {port} instead\n"
    )
    assert server._answers() is False  # nothing listens there
    assert server.port == port


def test_processes_doctests() -> None:
    result = doctest.testmod(processes)
    assert result.attempted > 0 and result.failed == 0
