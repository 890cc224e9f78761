"""Who is acting, on a real `langgraph dev` behind keelgraph's auth (issue 16, items 1 and 2).

The main graph with its scripted model (no model server), tokens from a token file and JWTs from a
JWKS served on 127.0.0.1. User B cannot read or act on customer A's data through any request
field, cannot reach a reserved store namespace, gets 401 (never 500) for every bad token, and
cannot resume an interrupt or write a thread's state without the `approve` permission.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from langgraph_sdk import get_client
from langgraph_sdk.client import LangGraphClient

from keelgraph.apps.support.desk import link_user
from keelgraph.serving.auth import APPROVE, TokenFile, hash_token
from keelgraph.serving.serve import DevServer, free_port, write_config

ROOT = Path(__file__).parents[2]
SCRIPTED = {"support": "tests/e2e/graphs_for_serving.py:support_scripted"}
KID = "k1"


@dataclass
class Served:
    url: str
    data: Path
    log: Path
    tokens: dict[str, str]
    key: rsa.RSAPrivateKey

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def jwt(self, claims: dict[str, Any], *, kid: str = KID, key: rsa.RSAPrivateKey | None = None) -> str:
        body = {"exp": int(time.time()) + 300, **claims}
        return jwt.encode(body, key or self.key, algorithm="RS256", headers={"kid": kid})


def _jwks_server(key: rsa.RSAPrivateKey) -> tuple[ThreadingHTTPServer, str]:
    """The identity provider's key set, on 127.0.0.1."""
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**public, "kid": KID, "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/jwks.json"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("served-identity")
    data = folder / "data"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks, jwks_url = _jwks_server(key)
    file = TokenFile(folder / "tokens.json")
    tokens = {
        "alice": file.create("alice"),  # customer 1
        "alice-approver": file.create("alice", permissions=[APPROVE]),
        "bob": file.create("bob"),  # customer 2
        "bob-approver": file.create("bob", permissions=[APPROVE]),
        "scraper": file.create("scraper", permissions=["metrics:read"]),
    }
    link_user(data / "shop.db", "alice", 1)
    link_user(data / "shop.db", "bob", 2)
    env = {
        **os.environ,
        "KEELGRAPH_DATA_DIR": str(data),
        "KEELGRAPH_AUTH_TOKENS": str(folder / "tokens.json"),
        "KEELGRAPH_AUTH_JWKS_URL": jwks_url,
        "KEELGRAPH_DATABASE_URL": "",
    }
    config = write_config(folder, ROOT / "langgraph.json", graphs=SCRIPTED)
    server = DevServer(config, env=env, log=folder / "langgraph-dev.log")
    server.start()
    try:
        yield Served(server.url, data, server.log, tokens, key)
    finally:
        server.stop()
        jwks.shutdown()


def _client(served: Served, who: str) -> LangGraphClient:
    return get_client(url=served.url, api_key=None, headers=served.headers(who))


@pytest.fixture
async def alice(served: Served) -> AsyncIterator[LangGraphClient]:
    async with _client(served, "alice") as client:
        yield client


@pytest.fixture
async def bob(served: Served) -> AsyncIterator[LangGraphClient]:
    async with _client(served, "bob") as client:
        yield client


def _tickets(served: Served) -> list[tuple[int, int]]:
    with sqlite3.connect(served.data / "shop.db") as conn:
        return list(conn.execute("SELECT order_id, customer_id FROM tickets ORDER BY id"))


async def _refused(attempt: Any, status: int) -> str:
    with pytest.raises(httpx.HTTPStatusError) as refused:
        await attempt
    assert refused.value.response.status_code == status, refused.value.response.text
    return str(refused.value.response.json()["detail"])


async def test_user_b_cannot_read_or_act_on_customer_a_through_any_field(
    served: Served, bob: LangGraphClient
) -> None:
    thread = (await bob.threads.create())["thread_id"]
    # The request body cannot name a customer: a typed rejection, nothing looked up.
    named = await bob.runs.wait(
        thread, "support", input={"request": {"customer_id": 1, "message": "Where is order 1002?"}}
    )
    assert isinstance(named, dict) and named["status"] == "rejected"
    assert [p["field"] for p in named["error"]["problems"]] == ["customer_id"]
    # Nor can the run's config or context name the acting user.
    for where in (
        {"config": {"configurable": {"keelgraph_user": "alice"}}},
        {"context": {"keelgraph_user": "alice"}},
    ):
        said = await _refused(
            bob.runs.wait(thread, "support", input={"request": {"message": "Where is order 1002?"}}, **where),
            403,
        )
        assert "keelgraph_user" in said
    # Asked plainly, bob gets bob's orders (customer 2), whatever order he names.
    answered = await bob.runs.wait(thread, "support", input={"request": {"message": "Where is order 1002?"}})
    assert isinstance(answered, dict) and answered["status"] == "ok", answered
    assert 1002 not in answered["output"]["order_ids"]
    values = (await bob.threads.get_state(thread))["values"]
    assert isinstance(values, dict)
    [listed] = [e for e in values["tool_log"] if e["name"] == "list_orders"]
    assert listed["args"] == {"customer_id": 2}
    assert {o["order_id"] for o in listed["output"]["orders"]} == {1004, 1005}
    # A ticket on alice's order, approved by bob himself with an edit that names alice's customer,
    # still acts for bob's: the shop refuses it.
    waiting = await bob.runs.wait(
        thread, "support", input={"request": {"message": "Order 1002 arrived damaged"}}
    )
    assert isinstance(waiting, dict)
    [call] = waiting["__interrupt__"][0]["value"]["calls"]
    assert call["args"]["customer_id"] == 2 and call["args"]["order_id"] == 1002
    async with _client(served, "bob-approver") as approver:
        edit = {"action": "edit", "args": {"customer_id": 1}}
        done = await approver.runs.wait(thread, "support", command={"resume": edit})
    assert isinstance(done, dict) and done["output"]["action"] == "none", done
    ran = (await bob.threads.get_state(thread))["values"]
    assert isinstance(ran, dict) and ran["approvals"][call["id"]]["args"]["customer_id"] == 2
    assert not [t for t in _tickets(served) if t[0] == 1002]  # no ticket on alice's order, for anyone


async def test_no_user_reaches_a_reserved_namespace(
    served: Served, alice: LangGraphClient, bob: LangGraphClient
) -> None:
    thread = (await alice.threads.create())["thread_id"]
    for message in ("Please always contact me by email.", "Where is my order 1002?"):
        ran = await alice.runs.wait(thread, "support", input={"request": {"message": message}})
        assert isinstance(ran, dict) and ran["status"] == "ok", ran
    # alice's second turn archived her first; her memory holds the preference: both under keelgraph's root.
    for prefix in (("keelgraph",), ("keelgraph", "archive"), ("keelgraph", "memory", "1"), ("archive",), ()):
        found = await bob.store.search_items(prefix, limit=100)
        assert found["items"] == [], prefix
    assert await bob.store.get_item(("keelgraph", "memory", "1"), "x") is None
    listed = await bob.store.list_namespaces(prefix=["keelgraph"])
    assert listed["namespaces"] == []
    await bob.store.put_item(("keelgraph", "archive", thread), "000000001", {"messages": []})
    [item] = (await bob.store.search_items(("keelgraph", "archive"), limit=10))["items"]
    assert item["namespace"] == ["bob", "keelgraph", "archive", thread]  # bob's own, not the archive
    # Names that would look like keelgraph's roots cannot sign in, from the token file or a JWT.
    entries = json.loads((served.data.parent / "tokens.json").read_text())
    for user in ("keelgraph", "archive", "KeelGraph-ops"):
        entries["tokens"].append({"user": user, "sha256": hash_token(f"kg_{user}"), "permissions": []})
    (served.data.parent / "tokens.json").write_text(json.dumps(entries))
    async with httpx.AsyncClient(base_url=served.url, trust_env=False) as http:
        for token in ("kg_keelgraph", "kg_archive", "kg_KeelGraph-ops", served.jwt({"sub": "keelgraph"})):
            answer = await http.post("/store/items/search", json={"namespace_prefix": ["archive"]},
                                     headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            assert answer.status_code == 401, answer.text
            assert "reserved" in answer.json()["detail"]


async def test_every_bad_token_is_401_never_500(served: Served) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = {
        "malformed": "a.b.c",
        "not base64": "!!!.???.###",
        "two parts": "abc.def",
        "unknown kid": served.jwt({"sub": "carol"}, kid="k-unknown"),
        "bad signature": served.jwt({"sub": "carol"}, key=other),
        "expired": served.jwt({"sub": "carol", "exp": int(time.time()) - 3600}),
        "empty sub": served.jwt({"sub": ""}),
        "unknown token": "kg_not-a-token",
    }
    async with httpx.AsyncClient(base_url=served.url, trust_env=False) as http:
        for name, token in bad.items():
            answer = await http.post("/threads/search", json={}, headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 401, (name, answer.text)
            assert "token" in answer.json()["detail"], (name, answer.text)  # says what to do
        good = await http.post(
            "/threads/search", json={}, headers={"Authorization": f"Bearer {served.jwt({'sub': 'carol'})}"}
        )
        assert good.status_code == 200, good.text
        # A hand edit that breaks the token file keeps the last good set, logged once.
        path = served.data.parent / "tokens.json"
        kept = path.read_text()
        path.write_text("{not json")
        try:
            for _ in range(3):
                still = await http.post("/threads/search", json={}, headers=served.headers("alice"))
                assert still.status_code == 200, still.text
        finally:
            path.write_text(kept)
        log = served.log.read_text()
        assert log.count("cannot be read") == 1 and "last good set" in log
        assert "Error authenticating request" not in log  # the server's line for an authenticator that raised
        assert not re.search(r"\b(GET|POST|PUT|PATCH|DELETE) /\S* 5\d\d ", log)  # no request answered 5xx
        # The server's own routes: public on purpose, behind a token, or not served at all.
        assert (await http.get("/ok")).status_code == 200
        assert (await http.get("/docs")).status_code == 200
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/info")).status_code == 401
        assert (await http.get("/metrics", headers=served.headers("alice"))).status_code == 403
        assert (await http.get("/metrics", headers=served.headers("scraper"))).status_code == 200
        assert (await http.get("/info", headers=served.headers("alice"))).status_code == 200
        for path_ in ("/internal/truncate", "/internal/debug/thread/x", "/deploy"):
            answer = await http.request("POST" if "truncate" in path_ else "GET", path_)
            assert answer.status_code == 404, (path_, answer.text)


async def test_resuming_an_interrupt_needs_the_approve_permission(
    served: Served, alice: LangGraphClient
) -> None:
    thread = (await alice.threads.create())["thread_id"]
    waiting = await alice.runs.wait(
        thread, "support", input={"request": {"message": "Order 1001 arrived damaged"}}
    )
    assert isinstance(waiting, dict) and waiting["__interrupt__"]
    said = await _refused(alice.runs.wait(thread, "support", command={"resume": {"action": "approve"}}), 403)
    assert "'approve' permission" in said
    await _refused(alice.threads.update_state(thread, {"approvals": {}}, as_node="approve"), 403)
    state = await alice.threads.get_state(thread)
    assert state["next"] == ["approve"]  # still waiting; nothing ran
    assert (1001, 1) not in _tickets(served)
    async with _client(served, "alice-approver") as approver:
        done = await approver.runs.wait(thread, "support", command={"resume": {"action": "approve"}})
    assert isinstance(done, dict) and done["output"]["action"] == "ticket_opened", done
    assert (1001, 1) in _tickets(served)


async def test_a_signed_in_user_who_is_no_customer_is_refused_typed(served: Served) -> None:
    headers = {"Authorization": f"Bearer {served.jwt({'sub': 'carol@example.com'})}"}
    async with get_client(url=served.url, api_key=None, headers=headers) as carol:
        thread = (await carol.threads.create())["thread_id"]
        ran = await carol.runs.wait(
            thread, "support", input={"request": {"message": "Where is order 1002?"}}, raise_error=False
        )
    assert isinstance(ran, dict), ran
    assert ran["__error__"]["error"] == "IdentityRequired", ran
    assert "'carol@example.com' has no customer_id" in ran["__error__"]["message"]


async def test_a_re_sent_request_id_returns_the_first_result_over_the_server(
    served: Served, bob: LangGraphClient
) -> None:
    """Client idempotency served (issue 16, item 4): the same `request_id` in the run's input is
    answered from the first run, without a second turn; another request under it is refused."""
    thread = (await bob.threads.create())["thread_id"]
    sent = {"request": {"message": "Where is my order 1004?"}, "request_id": "bob-req-1"}
    first = await bob.runs.wait(thread, "support", input=sent)
    again = await bob.runs.wait(thread, "support", input=sent)
    assert isinstance(first, dict) and isinstance(again, dict)
    assert first["status"] == again["status"] == "ok" and again["output"] == first["output"]
    assert again["replayed"] is True and first["replayed"] is False
    values = (await bob.threads.get_state(thread))["values"]
    assert isinstance(values, dict) and values["turn"] == 1
    other = {"request": {"message": "Where is my order 1005?"}, "request_id": "bob-req-1"}
    refused = await bob.runs.wait(thread, "support", input=other)
    assert isinstance(refused, dict) and refused["status"] == "rejected"
    assert [p["field"] for p in refused["error"]["problems"]] == ["request_id"]
