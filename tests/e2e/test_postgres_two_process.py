"""One thread, two separate processes, one PostgreSQL database: started and interrupted for
approval in one process, resumed and finished in the other (also after the first is SIGKILLed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langgraph_sdk import get_sync_client

from keelgraph.serving.auth import TokenFile
from keelgraph.serving.serve import DevServer, write_config

ROOT = Path(__file__).parents[2]
WORKER = Path(__file__).with_name("pg_worker.py")
PROBLEM = {"message": "My order 1002 arrived damaged"}  # as ada, the demo's customer 1
FOLLOW_UP = {"message": "Thanks! Anything else I should do?"}


class Worker:
    def __init__(self, url: str, data: Path) -> None:
        env = {**os.environ, "KEELGRAPH_DATA_DIR": str(data)}
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = self._read()["ready"]

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"worker {self.process.pid} exited with {self.process.wait()}"
        found: dict[str, Any] = json.loads(line)
        return found

    def send(self, **order: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(order) + "\n")
        self.process.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=30)


@pytest.fixture
def workers(postgres_db: str, tmp_path: Path) -> Iterator[tuple[Worker, Worker]]:
    first, second = Worker(postgres_db, tmp_path / "data"), Worker(postgres_db, tmp_path / "data")
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def test_a_thread_interrupted_in_one_process_is_finished_in_another(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    assert a.pid != b.pid
    paused = a.send(op="ask", thread="t-1", request=PROBLEM)
    assert paused["waiting_for"] == ["open_ticket"] and paused["pid"] == a.pid
    seen = b.send(op="state", thread="t-1")
    assert seen["next"] == ["approve"]  # b sees what a checkpointed
    done = b.send(op="resume", thread="t-1", decision={"action": "approve"})
    assert done["status"] == "ok" and done["output"]["action"] == "ticket_opened", done
    assert done["output"]["order_ids"] == [1002]
    # ... and a sees b's ending, and continues the same conversation.
    back = a.send(op="state", thread="t-1")
    assert back["next"] == [] and back["output"] == done["output"]
    more = a.send(op="ask", thread="t-1", request=FOLLOW_UP)
    assert more["status"] == "ok"
    history = b.send(op="state", thread="t-1")["requests"]
    assert [json.loads(r)["message"] for r in history] == [PROBLEM["message"], FOLLOW_UP["message"]]


def test_a_killed_process_leaves_its_thread_resumable(postgres_db: str, tmp_path: Path) -> None:
    a = Worker(postgres_db, tmp_path / "data")
    assert a.send(op="ask", thread="t-2", request=PROBLEM)["waiting_for"] == ["open_ticket"]
    os.kill(a.process.pid, signal.SIGKILL)
    a.process.wait(timeout=30)
    b = Worker(postgres_db, tmp_path / "data")
    try:
        done = b.send(op="resume", thread="t-2", decision={"action": "approve"})
        assert done["status"] == "ok" and done["output"]["action"] == "ticket_opened", done
        # Exactly one ticket: resuming again is a new turn with nothing pending, not a second ticket.
        again = b.send(op="state", thread="t-2")
        assert again["next"] == [] and again["output"]["ticket_id"] == done["output"]["ticket_id"]
    finally:
        b.stop()


def test_two_dev_servers_share_checkpoints_but_not_thread_metadata(postgres_db: str, tmp_path: Path) -> None:
    """What `langgraph dev` can and cannot do on one PostgreSQL database (the README says so).

    Checkpoints are keelgraph's (PostgreSQL): shared. Thread records live in each dev server's
    in-memory runtime: not shared, so the second server answers 404 until the thread id is
    registered there, and then resumes the thread from the shared checkpoint.
    """
    graphs = {"support": "tests/e2e/graphs_for_serving.py:support_scripted"}
    token = TokenFile(tmp_path / "tokens.json").create("ada", permissions=["approve"])  # customer 1
    env = {
        **os.environ,
        "KEELGRAPH_DATA_DIR": str(tmp_path / "data"),
        "KEELGRAPH_AUTH_TOKENS": str(tmp_path / "tokens.json"),
        "KEELGRAPH_DATABASE_URL": postgres_db,
    }
    headers = {"Authorization": f"Bearer {token}"}
    one, two = (
        write_config(tmp_path / name, ROOT / "langgraph.json", graphs=graphs) for name in ("s1", "s2")
    )
    with (
        DevServer(one, env=env, log=tmp_path / "s1.log") as first,
        DevServer(two, env=env, log=tmp_path / "s2.log") as second,
    ):
        a = get_sync_client(url=first.url, api_key=None, headers=headers)
        b = get_sync_client(url=second.url, api_key=None, headers=headers)
        thread_id = a.threads.create()["thread_id"]
        paused = a.runs.wait(thread_id, "support", input={"request": PROBLEM})
        assert isinstance(paused, dict) and paused["__interrupt__"]
        with pytest.raises(httpx.HTTPStatusError) as unknown:
            b.threads.get(thread_id)
        assert unknown.value.response.status_code == 404  # thread metadata is per dev server
        b.threads.create(thread_id=thread_id, if_exists="do_nothing")
        done = b.runs.wait(thread_id, "support", command={"resume": {"action": "approve"}})
        assert isinstance(done, dict) and done["status"] == "ok", done
        assert done["output"]["action"] == "ticket_opened"
        values = a.threads.get_state(thread_id)["values"]
        assert isinstance(values, dict) and values["output"] == done["output"]  # the first sees the end
