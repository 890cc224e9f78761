"""Several Aegra replicas on one private PostgreSQL serve keelgraph's graphs as one server: a thread
created on one is run on another and read on a third; an approval interrupted on one is resumed
on another; a replica SIGKILLed mid-run leaves its thread resumable elsewhere (the turn kept, the
effect made once); runs on one thread sent to different replicas are serialised (keelgraph's lease)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from langgraph_sdk import get_sync_client
from langgraph_sdk.client import SyncLangGraphClient

from keelgraph.testing.postgres import create_database

pytest.importorskip("aegra_api", reason="needs the aegra extra: bash .ci/setup")

from keelgraph.serving.aegra import AegraServer, Replicas, aegra_config, write_aegra_config
from keelgraph.serving.auth import TokenFile
from tests.e2e.graphs_for_replicas import EFFECTS, MODEL_SLEEP, TOOL_SLEEP

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
HERE = Path(__file__).parent
GRAPHS = {
    "support": f"{HERE / 'graphs_for_serving.py'}:support_scripted",
    "approval": f"{HERE / 'graphs_for_replicas.py'}:approval",
    "slow_memory": f"{HERE / 'graphs_for_replicas.py'}:slow_memory",
}
PROBLEM = {"message": "My notebook, order 1003, arrived damaged"}  # ada is the shop's customer 1


@dataclass
class Cluster:
    replicas: Replicas
    config: Path
    database_url: str
    env: dict[str, str]
    folder: Path
    effects: Path
    tokens: dict[str, str]

    def client(self, replica: int, user: str = "ada") -> SyncLangGraphClient:
        url = self.replicas.urls[replica]
        return get_sync_client(
            url=url, api_key=None, headers={"Authorization": f"Bearer {self.tokens[user]}"}
        )

    def effect_lines(self) -> list[str]:
        return self.effects.read_text().splitlines() if self.effects.exists() else []


@pytest.fixture(scope="module")
def cluster(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("replicas")
    database_url = create_database(postgres_url, f"replicas_{uuid.uuid4().hex[:10]}")
    tokens = TokenFile(folder / "tokens.json")
    issued = {"ada": tokens.create("ada", permissions=["approve"]), "bob": tokens.create("bob")}
    effects = folder / "effects.txt"
    env = {
        **os.environ,
        "KEELGRAPH_DATA_DIR": str(folder / "data"),
        "KEELGRAPH_AUTH_TOKENS": str(folder / "tokens.json"),
        "KEELGRAPH_THREAD_WAIT_S": "30",  # a second run on a held thread waits for it (serialised)
        EFFECTS: str(effects),
        MODEL_SLEEP: "0.4",
    }
    config = write_aegra_config(folder, ROOT / "langgraph.json", graphs=GRAPHS)
    with Replicas(config, database_url, 3, env=env, log_dir=folder) as replicas:
        yield Cluster(replicas, config, database_url, env, folder, effects, issued)


def _status(exc: pytest.ExceptionInfo[httpx.HTTPStatusError]) -> int:
    return exc.value.response.status_code


def test_a_thread_created_on_a_is_run_on_b_and_read_on_c(cluster: Cluster) -> None:
    a, b, c = (cluster.client(i) for i in range(3))
    thread_id = a.threads.create()["thread_id"]
    first = b.runs.wait(thread_id, "slow_memory", input={"request": {"order_id": 1}})
    assert isinstance(first, dict) and first["status"] == "ok", first
    state = c.threads.get_state(thread_id)
    assert isinstance(state["values"], dict) and state["values"]["output"] == first["output"]
    second = c.runs.wait(thread_id, "slow_memory", input={"request": {"order_id": 2}})
    assert isinstance(second, dict) and second["output"]["reply"].startswith("shown 2 requests"), second
    assert c.threads.get(thread_id)["status"] == "idle"
    runs = a.runs.list(thread_id)
    assert sorted(r["status"] for r in runs) == ["success", "success"]
    # Owner-scoped on every replica: bob sees nothing of ada's thread, and cannot run it.
    bob = cluster.client(2, "bob")
    with pytest.raises(httpx.HTTPStatusError) as hidden:
        bob.threads.get(thread_id)
    assert _status(hidden) == 404
    with pytest.raises(httpx.HTTPStatusError) as refused:
        bob.runs.wait(thread_id, "slow_memory", input={"request": {"order_id": 3}})
    assert _status(refused) == 404
    assert thread_id not in {t["thread_id"] for t in bob.threads.search()}
    assert len(a.runs.list(thread_id)) == 2  # bob's attempt left nothing


def test_identity_reaches_the_graph_and_cannot_be_named(cluster: Cluster) -> None:
    ada = cluster.client(0)
    thread_id = ada.threads.create()["thread_id"]
    paused = cluster.client(1).runs.wait(thread_id, "support", input={"request": PROBLEM})
    assert isinstance(paused, dict) and paused["__interrupt__"], paused  # ada is customer 1: her order
    for carrier in ({"config": {"configurable": {"langgraph_auth_user": {"identity": "bob"}}}},
                    {"context": {"keelgraph_user": "bob"}}):  # fmt: skip
        with pytest.raises(httpx.HTTPStatusError) as named:
            ada.runs.wait(thread_id, "support", input={"request": PROBLEM}, **carrier)
        assert _status(named) == 403
    # bob has no `approve`: he may not resume anything, even on a thread of his own.
    bob = cluster.client(2, "bob")
    own = bob.threads.create()["thread_id"]
    with pytest.raises(httpx.HTTPStatusError) as needs:
        bob.runs.wait(own, "approval", command={"resume": {"action": "approve"}})
    assert _status(needs) == 403
    # The store is scoped to the user on Aegra too.
    ada.store.put_item(["notes"], "k", {"v": "ada's"})
    with pytest.raises(httpx.HTTPStatusError) as missing:
        bob.store.get_item(["notes"], "k")  # bob's ("notes",) is his own namespace
    assert _status(missing) == 404
    item = ada.store.get_item(["notes"], "k")
    assert item is not None and item["value"] == {"v": "ada's"}


def test_an_approval_interrupted_on_a_is_resumed_on_b(cluster: Cluster) -> None:
    a, b = cluster.client(0), cluster.client(1)
    before = len(cluster.effect_lines())
    thread_id = a.threads.create()["thread_id"]
    paused = a.runs.wait(thread_id, "approval", input={"request": {"order_id": 7}})
    assert isinstance(paused, dict) and paused["__interrupt__"], paused
    assert cluster.client(2).threads.get(thread_id)["status"] == "interrupted"
    calls = paused["__interrupt__"][0]["value"]["calls"]
    decision = {call["id"]: {"action": "approve"} for call in calls}
    done = b.runs.wait(thread_id, "approval", command={"resume": decision})
    assert isinstance(done, dict) and done["status"] == "ok" and done["output"]["reply"] == "refund done", (
        done
    )
    assert cluster.effect_lines()[before:] == [cluster.effect_lines()[before]]  # exactly one refund
    assert "refund 7 30.00" in cluster.effect_lines()[before]


def test_a_replica_killed_mid_run_leaves_the_thread_resumable(cluster: Cluster) -> None:
    slow_env = {**cluster.env, TOOL_SLEEP: "30"}  # its refund never gets past the sleep
    doomed = AegraServer(
        cluster.config, cluster.database_url, env=slow_env, log=cluster.folder / "doomed.log"
    )
    doomed.start()
    try:
        ada = get_sync_client(
            url=doomed.url, api_key=None, headers={"Authorization": f"Bearer {cluster.tokens['ada']}"}
        )
        before = len(cluster.effect_lines())
        thread_id = cluster.client(0).threads.create()["thread_id"]
        paused = cluster.client(0).runs.wait(thread_id, "approval", input={"request": {"order_id": 8}})
        assert isinstance(paused, dict)
        decision = {
            call["id"]: {"action": "approve"} for call in paused["__interrupt__"][0]["value"]["calls"]
        }
        outcome: list[Any] = []

        def resume_on_doomed() -> None:
            try:
                outcome.append(ada.runs.wait(thread_id, "approval", command={"resume": decision}))
            except Exception as exc:  # the replica dies under it
                outcome.append(exc)

        waiter = threading.Thread(target=resume_on_doomed)
        waiter.start()
        deadline = time.monotonic() + 30
        while cluster.client(1).threads.get(thread_id)["status"] != "busy":
            assert time.monotonic() < deadline, "the resumed run never started"
            time.sleep(0.1)
        time.sleep(1.5)  # inside the refund's sleep now
        doomed.kill()
        waiter.join(30)
        assert outcome and isinstance(outcome[0], Exception), outcome  # the client saw the crash
        assert cluster.effect_lines()[before:] == []  # no refund was made
        assert cluster.client(1).threads.get(thread_id)["status"] == "busy"  # what the dead replica left
        # The approval was recorded before the crash: the turn goes on from its last checkpoint
        # (a run without input) on another replica. The refund was cut off mid-call, so whether
        # it took effect is unknown to keelgraph's effect ledger: it is not repeated (at most once),
        # and the model is told so.
        done = cluster.client(1).runs.wait(thread_id, "approval", input=None)
        assert isinstance(done, dict) and done["status"] == "ok", done
        assert cluster.effect_lines()[before:] == []  # no second attempt: no double effect
        values = cluster.client(2).threads.get_state(thread_id)["values"]
        assert isinstance(values, dict) and values["request"] == {"order_id": 8}  # the turn is kept
        told = [m["content"] for m in values["messages"] if m["type"] == "tool"]
        assert len(told) == 1 and "it was not repeated" in told[0], told
        # The thread goes on: the next turn on a third replica sees the whole conversation.
        again = cluster.client(2).runs.wait(thread_id, "approval", input={"request": {"order_id": 9}})
        assert isinstance(again, dict) and again["__interrupt__"], again
        statuses = sorted(r["status"] for r in cluster.client(2).runs.list(thread_id))
        assert statuses == ["error", "interrupted", "interrupted", "success"], (
            statuses
        )  # the dead run is marked
        assert cluster.client(2).threads.get(thread_id)["status"] == "interrupted"
    finally:
        doomed.stop()


def test_runs_on_one_thread_from_three_replicas_are_serialised(cluster: Cluster) -> None:
    thread_id = cluster.client(0).threads.create()["thread_id"]
    results: dict[int, Any] = {}

    def ask(replica: int) -> None:
        client = cluster.client(replica)
        results[replica] = client.runs.wait(
            thread_id, "slow_memory", input={"request": {"order_id": 100 + replica}}
        )

    workers = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert all(isinstance(r, dict) and r["status"] == "ok" for r in results.values()), results
    counts = sorted(int(r["output"]["reply"].split()[1]) for r in results.values())
    assert counts == [1, 2, 3], results  # each run saw the ones before it
    # One run at a time: the thread's checkpoints form one chain. Without keelgraph's lease (Aegra's
    # own saver), runs that overlap each write a child of the same checkpoint: a fork, where the
    # later one hides the other's turn.
    history = cluster.client(1).threads.get_history(thread_id, limit=200)
    parents = [parent["checkpoint_id"] for h in history if (parent := h.get("parent_checkpoint"))]
    assert len(history) > 6 and len(parents) == len(set(parents)) == len(history) - 1, parents
    final = cluster.client(2).runs.wait(thread_id, "slow_memory", input={"request": {"order_id": 999}})
    assert isinstance(final, dict)
    reply = final["output"]["reply"]
    assert reply.startswith("shown 4 requests") and all(
        f'"order_id":{100 + i}' in reply.replace(" ", "") for i in range(3)
    )
    assert sorted(r["status"] for r in cluster.client(1).runs.list(thread_id)) == ["success"] * 4


def test_the_deploy_config_is_the_generated_one() -> None:
    """deploy/aegra.json (for images) says what `keelgraph serve --engine aegra` generates."""
    import json

    deploy = ROOT / "deploy"
    written = json.loads((deploy / "aegra.json").read_text())
    generated = aegra_config(ROOT / "langgraph.json")
    for config in (written, generated):
        config["graphs"] = {
            k: str((deploy / v).resolve()) if v.startswith(".") else v for k, v in config["graphs"].items()
        }
        config["dependencies"] = [
            str((deploy / d).resolve()) if d.startswith(".") else d for d in config["dependencies"]
        ]
    assert written == generated
