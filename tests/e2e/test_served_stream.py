"""Streaming that tells the truth, over `langgraph_sdk` (issue 17, item 3): a real `langgraph dev`
streams a turn's phases as custom events, in order, across an approval's interrupt and resume; no
rejected draft is ever the validated output, and the model's own text comes tagged as a draft."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph_sdk import get_client
from langgraph_sdk.client import LangGraphClient

from keelgraph.graphs.events import DRAFT_TAG, Event, as_event, phases
from keelgraph.serving.auth import APPROVE, TokenFile
from keelgraph.serving.serve import DevServer, write_config

ROOT = Path(__file__).parents[2]
GRAPH = "streaming"
REJECTED_DRAFT = "all done"  # what `graphs_for_serving._stream_script` answers first: the check fails it


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """One `langgraph dev` serving the scripted `streaming` graph (no model server)."""
    folder = tmp_path_factory.mktemp("served-stream")
    token = TokenFile(folder / "tokens.json").create("ada", permissions=[APPROVE])
    env = {
        **os.environ,
        "KEELGRAPH_DATA_DIR": str(folder / "data"),
        "KEELGRAPH_AUTH_TOKENS": str(folder / "tokens.json"),
        "KEELGRAPH_DATABASE_URL": "",
    }
    graphs = {GRAPH: "tests/e2e/graphs_for_serving.py:streaming"}
    config = write_config(folder, ROOT / "langgraph.json", graphs=graphs)
    with DevServer(config, env=env, log=folder / "langgraph-dev.log") as server:
        yield server.url, token


@pytest.fixture
async def client(served: tuple[str, str]) -> AsyncIterator[LangGraphClient]:
    url, token = served
    async with get_client(url=url, api_key=None, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


async def _run(client: LangGraphClient, thread: str, modes: list[str], **run: Any) -> list[Any]:
    return [part async for part in client.runs.stream(thread, GRAPH, stream_mode=modes, **run)]


def _events(parts: list[Any]) -> list[Event]:
    return [e for part in parts if (e := as_event(part)) is not None]


async def test_phases_stream_in_order_across_an_approval(client: LangGraphClient) -> None:
    thread = (await client.threads.create())["thread_id"]
    first_parts = await _run(client, thread, ["custom", "updates"], input={"request": {"order_id": 7}})
    first = _events(first_parts)
    assert phases(first) == [
        "input", "model_started", "model_finished", "tool_started", "tool_finished",
        "model_started", "model_finished", "waiting_for_approval",
    ]  # fmt: skip
    interrupts = [
        p.data["__interrupt__"] for p in first_parts if p.event == "updates" and "__interrupt__" in p.data
    ]
    assert interrupts and interrupts[0][0]["value"]["type"] == "approval"
    waiting = first[-1]
    assert waiting["keelgraph"] == "phase" and waiting["phase"] == "waiting_for_approval"
    assert [(c["name"], c["args"]) for c in waiting["calls"]] == [("refund", {"amount": 30, "order_id": 7})]

    modes = ["custom", "updates", "messages-tuple"]
    resumed_parts = await _run(client, thread, modes, command={"resume": {"action": "approve"}})
    resumed = _events(resumed_parts)
    assert phases(resumed) == [
        "decided", "tool_started", "tool_finished", "model_started", "model_finished",
        "repairing", "model_started", "model_finished", "output", "final",
    ]  # fmt: skip
    by_phase: dict[str, Any] = {str(e.get("phase", "output")): e for e in resumed}
    tools: list[Any] = [e for e in [*first, *resumed] if e.get("phase") == "tool_finished"]
    assert [(e["name"], e["outcome"]) for e in tools] == [("lookup", "ok"), ("refund", "ok")]
    repairing = by_phase["repairing"]
    assert [p["reason"] for p in repairing["problems"]] == ["reply must say what was refunded"]
    assert by_phase["output"] == {"keelgraph": "output", "output": {"reply": "refunded 30.00 on the order"}}
    assert by_phase["final"]["status"] == "ok"
    # The rejected draft is in no event; over the messages stream it comes tagged as a draft only.
    assert REJECTED_DRAFT not in json.dumps([*first, *resumed])
    messages = [p.data for p in resumed_parts if p.event == "messages"]
    drafts = [m for m, meta in messages if DRAFT_TAG in (meta.get("tags") or [])]
    assert any(REJECTED_DRAFT in str(m.get("content")) for m in drafts), messages
    for message, meta in messages:
        if REJECTED_DRAFT in str(message.get("content")):
            assert DRAFT_TAG in (meta.get("tags") or []), (message, meta)
    state = await client.threads.get_state(thread)
    assert isinstance(state["values"], dict) and state["values"]["output"] == by_phase["output"]["output"]
