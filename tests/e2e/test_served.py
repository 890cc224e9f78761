"""The support graph served by a real `langgraph dev` process, driven over HTTP by `langgraph_sdk`."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph_sdk import get_client
from langgraph_sdk.client import LangGraphClient

from keelgraph.serving.auth import TokenFile
from keelgraph.serving.serve import DevServer, write_config

ROOT = Path(__file__).parents[2]
GRAPH = "support"
OUTPUT_KEYS = {"reply", "order_ids", "action", "ticket_id"}


@pytest.fixture(scope="module")
def served(model_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """One `langgraph dev` for the module, its model calls going to the embedded model server."""
    tmp = tmp_path_factory.mktemp("served")
    env = {
        **os.environ,
        "KEELGRAPH_BASE_URL": model_server,
        "KEELGRAPH_MODEL": "qwen2.5-coder-0.5b-instruct",
        "KEELGRAPH_OUTPUT_STRATEGY": "json_object",
        "KEELGRAPH_DATA_DIR": str(tmp / "data"),
    }
    # The repository's graphs plus test graphs, from a config in a temp folder (langgraph dev keeps
    # its thread pickles beside the config); the repository's auth, checkpointer and store.
    env["KEELGRAPH_AUTH_TOKENS"] = str(tmp / "tokens.json")
    # ada: a demo user, seeded as customer 1 of the shop; `approve` lets her decide on her tickets.
    token = TokenFile(tmp / "tokens.json").create("ada", permissions=["approve"])
    extra = {name: f"tests/e2e/graphs_for_serving.py:{name}" for name in ("failing", "approval", "memory")}
    config = write_config(tmp, ROOT / "langgraph.json", extra_graphs=extra)
    with DevServer(config, env=env, log=tmp / "langgraph-dev.log") as server:
        yield server.url, token


@pytest.fixture
async def client(served: tuple[str, str]) -> AsyncIterator[LangGraphClient]:
    url, token = served
    async with get_client(url=url, api_key=None, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


async def ask(client: LangGraphClient, thread_id: str, request: Any) -> dict[str, Any]:
    """One run to completion in `thread_id`; returns the run's output state."""
    result = await client.runs.wait(thread_id, GRAPH, input={"request": request})
    assert isinstance(result, dict), result
    return result


async def new_thread(client: LangGraphClient) -> str:
    thread_id: str = (await client.threads.create())["thread_id"]
    return thread_id


async def messages(client: LangGraphClient, thread_id: str) -> list[dict[str, Any]]:
    """The thread's messages, read back from the server."""
    state = await client.threads.get_state(thread_id)
    values = state["values"]
    assert isinstance(values, dict)
    found: list[dict[str, Any]] = values.get("messages", [])
    return found


def _same_json(content: str, sent: Any) -> bool:
    try:
        return bool(json.loads(content) == sent)
    except ValueError:
        return False


def keeps(kept: list[dict[str, Any]], sent: Any) -> bool:
    """Whether some message's content holds what was sent: the text itself, or the same JSON."""
    texts = [sent] if isinstance(sent, str) else [json.dumps(sent), json.dumps(sent, separators=(",", ":"))]
    for message in kept:
        content = message.get("content")
        if isinstance(content, str) and (
            any(text in content for text in texts)
            or (not isinstance(sent, str) and _same_json(content, sent))
        ):
            return True
    return False


async def test_valid_request_is_answered(client: LangGraphClient) -> None:
    thread = await new_thread(client)
    result = await ask(client, thread, {"message": "Where is my order 1002?"})
    assert result["status"] == "ok", result.get("error")
    assert set(result["output"]) == OUTPUT_KEYS
    assert result.get("error") is None
    assert result["stats"]["model_calls"] >= 1


async def test_memory_across_runs(client: LangGraphClient) -> None:
    thread = await new_thread(client)
    first, second = "What did I order in October?", "And what is the status of that order?"
    await ask(client, thread, {"message": first})
    result = await ask(client, thread, {"message": second})
    assert result["status"] in {"ok", "failed"}, result.get("error")  # a valid request: never rejected
    assert any(second in str(m.get("content")) for m in await messages(client, thread))
    # The first turn left the state for the thread's archive in the server's store (the model is
    # still shown it: see the next test); the thread's checkpoints keep it too.
    history = await client.threads.get_history(thread, limit=50)
    said = [str(c["values"]) for c in history]
    assert any(first in text for text in said)


async def test_the_model_is_shown_earlier_runs_of_the_thread(client: LangGraphClient) -> None:
    thread = await new_thread(client)
    for order in (11, 12, 13):
        result = await client.runs.wait(thread, "memory", input={"request": {"order_id": order}})
        assert isinstance(result, dict) and result["status"] == "ok", result
    reply = result["output"]["reply"]
    assert reply.startswith("shown 3 requests:") and all(str(n) in reply for n in (11, 12, 13)), reply
    assert not keeps(await messages(client, thread), {"order_id": 11})  # the state holds one turn


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"message": 5}, "message"),
        ({}, "message"),
        ({"message": ""}, "message"),
        ({"message": "x" * 5000}, "message"),
        ({"message": "hi", "admin": True}, "admin"),
        ({"customer_id": 2, "message": "hi"}, "customer_id"),  # the customer comes from the token
        ("not json{", "request"),
    ],
    ids=["wrong-type", "missing", "empty", "oversize", "extra-field", "names-a-customer", "non-json"],
)
async def test_bad_request_is_rejected_and_kept(client: LangGraphClient, request_: Any, field: str) -> None:
    thread = await new_thread(client)
    result = await ask(client, thread, request_)
    assert result["status"] == "rejected", result
    error = result["error"]
    assert error["type"] == "InputRejected"
    assert error["message"]
    fields = [p["field"] for p in error["problems"]]
    assert any(f == field or f.endswith(f".{field}") for f in fields), fields
    assert all(p["reason"] and p["fix"] for p in error["problems"])
    assert not result.get("output")
    # The thread keeps what was sent.
    assert keeps(await messages(client, thread), request_)


async def test_streaming_node_updates(client: LangGraphClient) -> None:
    thread = await new_thread(client)
    nodes: list[str] = []
    async for part in client.runs.stream(
        thread,
        GRAPH,
        input={"request": {"message": "Has my keyboard shipped?"}},
        stream_mode="updates",
    ):
        if part.event == "updates" and isinstance(part.data, dict):
            nodes.extend(part.data)
    assert nodes[0] == "validate_input", nodes
    assert len(set(nodes)) > 1, nodes  # a valid request goes on past validation
    state = await client.threads.get_state(thread)
    assert isinstance(state["values"], dict)
    assert state["values"]["status"] in {"ok", "failed"}


async def test_streaming_model_tokens(client: LangGraphClient) -> None:
    """Tokens of the model's reply reach the client as they are generated (`messages-tuple`)."""
    thread = await new_thread(client)
    pieces: list[str] = []
    async for part in client.runs.stream(
        thread,
        GRAPH,
        input={"request": {"message": "Where is my order 1002?"}},
        stream_mode="messages-tuple",
    ):
        if part.event == "messages" and isinstance(part.data, list) and len(part.data) == 2:
            chunk, meta = part.data
            if meta.get("langgraph_node") == "reason" and chunk.get("content"):
                pieces.append(str(chunk["content"]))
    assert len(pieces) > 3, pieces  # token by token, not one message at the end
    assert '"reply"' in "".join(pieces) or '"action"' in "".join(pieces)


async def test_exhausted_repairs_are_structured_data_over_http(client: LangGraphClient) -> None:
    thread_id = await new_thread(client)
    result = await client.runs.wait(thread_id, "failing", input={"request": {"a": 2, "b": 3}})
    assert isinstance(result, dict) and result["status"] == "failed" and result["output"] is None
    error = result["error"]
    assert error["type"] == "RepairExhausted" and error["code"] == "repair_exhausted"
    assert error["message"] == "no valid answer: the model repeated the same invalid output; stopped early"
    assert [a["kind"] for a in error["attempts"]] == ["output", "output"]
    assert error["attempts"][0]["raw"] == json.dumps(answer_total(-1))
    assert error["problems"][0]["field"] == "answer.total" and error["usage"]["model_calls"] == 2
    state = (await client.threads.get_state(thread_id))["values"]
    assert isinstance(state, dict) and state["status"] == "failed" and state["error"] == error
    assert keeps(state["messages"], {"a": 2, "b": 3})


def answer_total(total: int) -> dict[str, Any]:
    return {"action": "final_answer", "answer": {"total": total}}


async def test_approval_interrupt_and_resume_over_http(client: LangGraphClient) -> None:
    """A write tool that needs approval pauses the run; the person's edit resumes it over HTTP."""
    thread_id = await new_thread(client)
    paused = await client.runs.wait(thread_id, "approval", input={"request": {"order_id": 7}})
    assert isinstance(paused, dict)
    [pause] = paused["__interrupt__"]
    ask = pause["value"]
    assert ask["type"] == "approval" and ask["problem"] is None
    assert [(c["name"], c["args"]) for c in ask["calls"]] == [("refund", {"amount": 30, "order_id": 7})]
    state = await client.threads.get_state(thread_id)
    assert state["next"] == ["approve"]
    bad = await client.runs.wait(thread_id, "approval", command={"resume": {"action": "perhaps"}})
    assert isinstance(bad, dict)
    assert "no valid decision" in bad["__interrupt__"][0]["value"]["problem"]
    done = await client.runs.wait(
        thread_id, "approval", command={"resume": {"action": "edit", "args": {"amount": 20}}}
    )
    assert isinstance(done, dict) and done["status"] == "ok", done
    tools = [m["content"] for m in await messages(client, thread_id) if m["type"] == "tool"]
    assert len(tools) == 1 and "refunded 20.00 on order 7" in tools[0]


async def test_an_oversize_body_is_refused_413_and_never_stored(
    served: tuple[str, str], client: LangGraphClient
) -> None:
    """A 2 MB body gets HTTP 413 from the server (`HTTP_MAX_REQUEST_BODY_BYTES`, set by keelgraph to
    1 MiB) before anything is parsed or stored; the thread stays empty."""
    import httpx

    url, token = served
    thread_id = await new_thread(client)
    body = {"assistant_id": GRAPH, "input": {"request": {"message": "x" * 2_000_000}}}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        reply = await http.post(f"/threads/{thread_id}/runs/wait", json=body, timeout=30)
    assert reply.status_code == 413, reply.text[:300]
    assert "too large" in reply.text
    state = await client.threads.get_state(thread_id)
    assert not state["values"]
