"""The served main graph behind keelgraph's auth, on keelgraph's SQLite checkpointer and store.

A real `langgraph dev` process with the repository's langgraph.json (auth, checkpointer, store),
serving the order-support graph with its scripted model, so every assertion is deterministic.
"""

from __future__ import annotations

import json
import operator
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from langgraph.graph import END, START, StateGraph
from langgraph.pregel.remote import RemoteGraph
from langgraph_sdk import get_client, get_sync_client
from langgraph_sdk.client import LangGraphClient
from typing_extensions import TypedDict

from keelgraph.apps.support.desk import link_user
from keelgraph.serving.auth import TokenFile
from keelgraph.serving.serve import DevServer, write_config

ROOT = Path(__file__).parents[2]
SCRIPTED = {
    "support": "tests/e2e/graphs_for_serving.py:support_scripted",
}
PROBLEM = {"message": "My order 1002 arrived damaged"}  # as alice: customer 1, whose order 1002 is
QUESTION = {"message": "Hello, any news?"}


@dataclass
class Served:
    url: str
    folder: Path
    env: dict[str, str]
    tokens: dict[str, str]

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}


def start(folder: Path, env: dict[str, str]) -> DevServer:
    config = write_config(folder, ROOT / "langgraph.json", graphs=SCRIPTED)
    server = DevServer(config, env=env, log=folder / "langgraph-dev.log")
    server.start()
    return server


def setup_folder(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    data = folder / "data"
    env = {
        **os.environ,
        "KEELGRAPH_DATA_DIR": str(data),
        "KEELGRAPH_AUTH_TOKENS": str(folder / "tokens.json"),
        "KEELGRAPH_DATABASE_URL": "",
    }
    tokens = TokenFile(folder / "tokens.json")
    link_user(data / "shop.db", "alice", 1)  # who they are in the shop
    link_user(data / "shop.db", "bob", 2)
    # Both may decide on their own tickets (tests/e2e/test_served_identity.py covers who may not).
    return env, {user: tokens.create(user, permissions=["approve"]) for user in ("alice", "bob")}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("served-auth")
    env, tokens = setup_folder(folder)
    server = start(folder, env)
    try:
        yield Served(server.url, folder, env, tokens)
    finally:
        server.stop()


@pytest.fixture
async def alice(served: Served) -> AsyncIterator[LangGraphClient]:
    async with get_client(url=served.url, api_key=None, headers=served.headers("alice")) as client:
        yield client


@pytest.fixture
async def bob(served: Served) -> AsyncIterator[LangGraphClient]:
    async with get_client(url=served.url, api_key=None, headers=served.headers("bob")) as client:
        yield client


async def test_requests_without_a_valid_token_get_401(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url, trust_env=False) as http:
        cases = {
            "none": {},
            "unknown": {"Authorization": "Bearer kg_not-a-token"},
            "not-bearer": {"Authorization": f"Basic {served.tokens['alice']}"},
            # langgraph dev lets "Studio" requests in without auth unless disable_studio_auth is set.
            "studio-bypass": {"x-auth-scheme": "langsmith"},
            "bad-jwt": {"Authorization": "Bearer a.b.c"},
        }
        for name, headers in cases.items():
            answer = await http.post("/threads/search", json={}, headers=headers)
            assert answer.status_code == 401, (name, answer.text)
            assert "token" in answer.json()["detail"].lower(), (name, answer.text)  # says what to do
        ok = await http.post("/threads/search", json={}, headers=served.headers("alice"))
        assert ok.status_code == 200


async def test_another_users_thread_is_invisible(alice: LangGraphClient, bob: LangGraphClient) -> None:
    thread = await alice.threads.create(metadata={"owner": "bob", "topic": "x"})
    assert thread["metadata"]["owner"] == "alice"  # a caller cannot claim another owner
    thread_id = thread["thread_id"]
    paused = await alice.runs.wait(thread_id, "support", input={"request": PROBLEM})
    assert isinstance(paused, dict) and paused["__interrupt__"]

    bob_threads = await bob.threads.search(limit=100)
    assert thread_id not in {t["thread_id"] for t in bob_threads}
    assert all(t["metadata"]["owner"] == "bob" for t in bob_threads)
    assert thread_id in {t["thread_id"] for t in await alice.threads.search(limit=100)}
    attempts = {
        "read": bob.threads.get(thread_id),
        "state": bob.threads.get_state(thread_id),
        "history": bob.threads.get_history(thread_id),
        "run": bob.runs.wait(thread_id, "support", input={"request": QUESTION}),
        "resume": bob.runs.wait(thread_id, "support", command={"resume": {"action": "approve"}}),
        "update": bob.threads.update(thread_id, metadata={"owner": "bob"}),
        "delete": bob.threads.delete(thread_id),
    }
    for name, attempt in attempts.items():
        with pytest.raises(httpx.HTTPStatusError) as refused:
            await attempt
        assert refused.value.response.status_code == 404, name
    # Still alice's, still waiting, and nothing ran.
    state = await alice.threads.get_state(thread_id)
    assert state["next"] == ["approve"]
    assert (await alice.threads.get(thread_id))["metadata"]["owner"] == "alice"


async def test_a_new_user_lists_zero_threads(served: Served, alice: LangGraphClient) -> None:
    await alice.threads.create()
    carol = TokenFile(served.folder / "tokens.json").create("carol")  # picked up without a restart
    async with get_client(
        url=served.url, api_key=None, headers={"Authorization": f"Bearer {carol}"}
    ) as client:
        assert await client.threads.search(limit=100) == []
        assert {a["graph_id"] for a in await client.assistants.search()} == {"support"}
        with pytest.raises(httpx.HTTPStatusError) as refused:
            await client.assistants.create("support", name="mine")
        assert refused.value.response.status_code == 403


async def test_approval_interrupt_and_resume_on_the_main_graph(alice: LangGraphClient) -> None:
    thread_id = (await alice.threads.create())["thread_id"]
    paused = await alice.runs.wait(thread_id, "support", input={"request": PROBLEM})
    assert isinstance(paused, dict) and paused["status"] == "running"
    [pause] = paused["__interrupt__"]
    calls = pause["value"]["calls"]
    assert [(c["name"], c["args"]["order_id"]) for c in calls] == [("open_ticket", 1002)]
    done = await alice.runs.wait(thread_id, "support", command={"resume": {"action": "approve"}})
    assert isinstance(done, dict) and done["status"] == "ok", done
    assert done["output"]["action"] == "ticket_opened" and done["output"]["order_ids"] == [1002]
    assert isinstance(done["output"]["ticket_id"], int)


async def test_typed_rejection_and_streaming(alice: LangGraphClient) -> None:
    thread_id = (await alice.threads.create())["thread_id"]
    rejected = await alice.runs.wait(thread_id, "support", input={"request": {"customer_id": 0}})
    assert isinstance(rejected, dict) and rejected["status"] == "rejected"
    assert rejected["error"]["type"] == "InputRejected"
    assert {p["field"] for p in rejected["error"]["problems"]} >= {"customer_id", "message"}
    nodes = []
    async for part in alice.runs.stream(
        thread_id, "support", input={"request": QUESTION}, stream_mode="updates"
    ):
        if part.event == "updates" and isinstance(part.data, dict):
            nodes.extend(part.data)
    assert nodes == ["validate_input", "act", "reason", "check_output"], nodes


async def test_store_is_scoped_to_the_user(alice: LangGraphClient, bob: LangGraphClient) -> None:
    await alice.store.put_item(("preferences",), "contact", {"channel": "email"})
    item = await alice.store.get_item(("preferences",), "contact")
    assert item is not None and item["namespace"] == ["alice", "preferences"]
    assert (await bob.store.search_items(("preferences",)))["items"] == []
    assert (await bob.store.search_items(("alice", "preferences")))["items"] == []
    assert await bob.store.get_item(("alice", "preferences"), "contact") is None


class Desk(TypedDict, total=False):
    request: dict[str, Any]
    output: dict[str, Any] | None
    status: str
    log: Annotated[list[str], operator.add]


def test_remote_graph_as_a_node_of_a_local_graph(served: Served) -> None:
    client = get_sync_client(url=served.url, api_key=None, headers=served.headers("alice"))
    remote = RemoteGraph("support", sync_client=client)

    def before(state: Desk) -> dict[str, Any]:
        return {"log": ["local"]}

    local = StateGraph(Desk)
    local.add_node("before", before)
    local.add_node("desk", remote)
    local.add_edge(START, "before")
    local.add_edge("before", "desk")
    local.add_edge("desk", END)
    result = local.compile().invoke({"request": QUESTION})
    assert result["log"] == ["local"]
    assert result["status"] == "ok" and result["output"]["action"] == "none"


def test_threads_survive_a_server_restart(tmp_path: Path) -> None:
    env, tokens = setup_folder(tmp_path)
    headers = {"Authorization": f"Bearer {tokens['alice']}"}
    server = start(tmp_path, env)
    try:
        client = get_sync_client(url=server.url, api_key=None, headers=headers)
        thread_id = client.threads.create()["thread_id"]
        first = client.runs.wait(thread_id, "support", input={"request": QUESTION})
        assert isinstance(first, dict) and first["status"] == "ok"
        paused = client.runs.wait(thread_id, "support", input={"request": PROBLEM})
        assert isinstance(paused, dict) and paused["__interrupt__"]
    finally:
        server.stop()
    assert (tmp_path / "data" / "threads.db").stat().st_size > 0  # keelgraph's checkpointer held them

    server = start(tmp_path, env)
    try:
        client = get_sync_client(url=server.url, api_key=None, headers=headers)
        assert client.threads.get_state(thread_id)["next"] == ["approve"]
        done = client.runs.wait(thread_id, "support", command={"resume": {"action": "approve"}})
        assert isinstance(done, dict) and done["status"] == "ok", done
        assert done["output"]["action"] == "ticket_opened"
        # Both turns were kept: the state holds the turn in progress, the checkpoints every turn.
        history = client.threads.get_history(thread_id, limit=100)
        sent = [json.dumps(c["values"].get("request")) for c in history if isinstance(c["values"], dict)]
        assert any("any news" in text for text in sent) and any("damaged" in text for text in sent)
        values = client.threads.get_state(thread_id)["values"]
        assert isinstance(values, dict) and values["turn"] == 2
        other = get_sync_client(
            url=server.url, api_key=None, headers={"Authorization": f"Bearer {tokens['bob']}"}
        )
        assert other.threads.search(limit=100) == []
    finally:
        server.stop()


def test_keelgraph_serve_command(tmp_path: Path) -> None:
    """The README's `keelgraph serve`: starts offline on a free port, says how to add a user, stops on SIGTERM."""
    env = {**os.environ, "KEELGRAPH_DATA_DIR": str(tmp_path / "data"), "KEELGRAPH_DATABASE_URL": ""}
    env.pop("KEELGRAPH_AUTH_TOKENS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "keelgraph", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("serving ") and "http://127.0.0.1:" in lines[0], lines
        assert "keelgraph token create USER" in lines[2], lines
        url = lines[0].split(" at ")[1].split()[0]
        assert httpx.post(f"{url}/threads/search", json={}, trust_env=False).status_code == 401
        made = subprocess.run(
            [sys.executable, "-m", "keelgraph", "token", "create", "dana"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        headers = {"Authorization": f"Bearer {made.stdout.strip()}"}
        answer = httpx.post(f"{url}/threads/search", json={}, headers=headers, trust_env=False)
        assert answer.status_code == 200 and answer.json() == []
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_readme_client_example(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's served-graph client block runs as written against the served main graph."""
    readme = (ROOT / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)[1]
    namespace: dict[str, Any] = {"url": served.url, "token": served.tokens["alice"]}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["done"]["status"] == "ok"
    assert namespace["done"]["output"]["action"] == "ticket_opened"
    assert "open_ticket" in capsys.readouterr().out
