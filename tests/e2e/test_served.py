"""The main graph served by a real `langgraph dev` process, driven by `langgraph_sdk`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph_sdk import get_client

from keelgraph.serve import DevServer

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def served(model_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("served-data")
    env = {
        "KEELGRAPH_BASE_URL": model_server,
        "KEELGRAPH_MODEL": "qwen2.5-coder-0.5b-instruct",
        "KEELGRAPH_OUTPUT_STRATEGY": "json_object",
        "KEELGRAPH_DATA_DIR": str(data),
    }
    import os

    with DevServer(ROOT / "langgraph.json", env={**os.environ, **env}) as server:
        yield server.url


async def run(url: str, thread_id: str | None, request: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    client = get_client(url=url, api_key=None)
    if thread_id is None:
        thread_id = (await client.threads.create())["thread_id"]
    result = await client.runs.wait(thread_id, "support", input={"request": request})
    state = await client.threads.get_state(thread_id)
    assert isinstance(result, dict)
    return thread_id, result, dict(state["values"])


async def test_valid_request_and_memory_across_runs(served: str) -> None:
    thread, first, _ = await run(served, None, {"customer_id": 1, "message": "Where is my order 1002?"})
    assert first["status"] in {"ok", "failed"}
    if first["status"] == "ok":
        assert set(first["output"]) == {"reply", "order_ids", "action", "ticket_id"}
    else:  # a typed failure is data too, never an exception string
        assert first["error"]["type"] == "RepairExhausted" and first["error"]["attempts"]
    _, second, values = await run(served, thread, {"customer_id": 1, "message": "When did I place it?"})
    assert second["status"] in {"ok", "failed"}
    requests = [
        m["content"] for m in values["messages"] if m["additional_kwargs"].get("keelgraph") == "request"
    ]
    assert len(requests) == 2 and "order 1002" in requests[0]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"customer_id": "abc", "message": "hi"}, "customer_id"),
        ({"customer_id": 1}, "message"),
        ({"customer_id": 1, "message": ""}, "message"),
        ({"customer_id": 1, "message": "x" * 5000}, "message"),
        ({"customer_id": 1, "message": "hi", "admin": True}, "admin"),
        ("not json{", "request"),
    ],
    ids=["wrong-type", "missing", "empty", "oversize", "extra-field", "non-json"],
)
async def test_bad_requests_are_typed_data_and_kept(served: str, request_: Any, field: str) -> None:
    _, result, values = await run(served, None, request_)
    assert result["status"] == "rejected"
    assert result["error"]["type"] == "InputRejected" and result["error"]["code"] == "input_rejected"
    problem = next(p for p in result["error"]["problems"] if p["field"] == field)
    assert problem["reason"] and problem["fix"]
    kept = values["messages"][-1]
    assert kept["additional_kwargs"]["keelgraph"] == "rejected"
    assert kept["content"] == (request_ if isinstance(request_, str) else json.dumps(request_))


async def test_streaming_node_updates(served: str) -> None:
    client = get_client(url=served, api_key=None)
    thread = await client.threads.create()
    nodes = []
    async for part in client.runs.stream(
        thread["thread_id"],
        "support",
        input={"request": {"customer_id": 1, "message": ""}},
        stream_mode="updates",
    ):
        if part.event == "updates" and isinstance(part.data, dict):
            nodes.extend(part.data)
    assert nodes == ["validate_input"]
