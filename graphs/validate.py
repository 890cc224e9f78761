"""The `validate_input` node: the request against the input contract, and the turn's fresh start."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, RemoveMessage
from langgraph.config import get_config
from langgraph.graph.message import REMOVE_ALL_MESSAGES
from langgraph.runtime import Runtime

from keelgraph.contracts.boundary import REFUSED_REQUEST, REQUEST_KEEP_CHARS, refused_record, stored_request
from keelgraph.contracts.errors import InputRejected
from keelgraph.graphs.history import archive_turns, compact
from keelgraph.graphs.prompt import tagged
from keelgraph.graphs.spec import AgentSpec
from keelgraph.graphs.state import Context, State
from keelgraph.graphs.turn import as_text, zero_stats
from keelgraph.tools.execution import policy_of

__all__ = ["route_after_input", "validate_input"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def _compacted(state: State, runtime: Runtime[Context] | None, spec: AgentSpec) -> dict[str, Any]:
    """Move the finished turns out of the state into the thread's archive, writing them first: the
    state then holds only the turn about to start, and `graphs.turn.with_history` reads what the
    model is shown of earlier turns back from the archive (see `keelgraph.graphs.history`).

    Only with a store to archive to (a served graph always has one; in process, `build_graph`
    opens one next to its default checkpointer): without one the thread keeps everything.
    """
    store = runtime.store if runtime is not None else None
    thread_id = get_config().get("configurable", {}).get("thread_id")
    if store is None or spec.history_tokens is None or thread_id is None:
        return {}
    turns = state.get("turn", 0)
    plan = compact(state.get("messages", []), turns_done=turns, archived_turns=state.get("archived_turns", 0))
    # One item per turn, keyed by its number: a validate_input re-run after a crash writes the same
    # items again, and a thread resumed from an older checkpoint overwrites the turns it re-runs.
    head = archive_turns(store, str(thread_id), plan.to_archive, after=state.get("archive_head", ""))
    update: dict[str, Any] = {
        "archived_turns": plan.archived_turns,
        "archive_head": head,
        "turn": max(turns, plan.archived_turns),
    }
    if plan.removed:
        update["messages"] = [RemoveMessage(id=REMOVE_ALL_MESSAGES)]
    return update


def _rejected_text(raw: Any) -> str:
    """A rejected request as the thread keeps it: as sent (its JSON text) when that is storable and
    at most `REQUEST_KEEP_CHARS` long, else the bounded record of `stored_request`."""
    if isinstance(raw, str):
        text: str | None = raw
    else:
        try:
            text = as_text(raw)
        except Exception:  # cycles, 4,300+ digits, deep nesting, an object whose repr raises
            text = None
    if text is not None and len(text) <= REQUEST_KEEP_CHARS and not _SURROGATE.search(text):
        return text
    record = stored_request(raw)
    if not (isinstance(record, dict) and REFUSED_REQUEST in record):  # storable, but its text is not
        record = refused_record(raw, [])
    return json.dumps(record, ensure_ascii=False)


def validate_input(
    state: State, runtime: Runtime[Context] | None = None, *, spec: AgentSpec
) -> dict[str, Any]:
    """Parse the request into the contract's input model; a bad one ends the turn, typed.

    Either way the request is appended to the thread exactly as it was sent. Earlier turns move to
    the thread's archive first (see `_compacted`): the state stays the same size as a thread grows.
    """
    raw = state.get("request")
    compacted = _compacted(state, runtime, spec)
    removed: list[AnyMessage] = compacted.pop("messages", [])
    reset: dict[str, Any] = {
        **compacted,
        "turn": compacted.get("turn", state.get("turn", 0)) + 1,
        "input": None,
        "attempts": [],
        "tool_log": [],
        "pending": None,
        "tool_rounds": 0,
        "approvals": {},
        "awaiting_approval": [],
        "answer_only": False,
        "tool_next": False,
        "pins": {},
        "samples": [],
        "started": time.time(),
        "cache_writes": [],
        "output": None,
        "error": None,
        "stats": zero_stats(),
    }
    try:
        value = spec.contract.parse_input(raw)
    except InputRejected as exc:
        message = tagged(HumanMessage(_rejected_text(raw)), "rejected")
        return {
            **reset,
            "status": "rejected",
            "error": exc.to_failure().model_dump(),
            "messages": [*removed, message],
        }
    message = tagged(HumanMessage(spec.contract.render_input(value)), "request")
    request = value.model_dump(mode="json")
    messages: list[AnyMessage] = [*removed, message]
    preload = [
        {
            "name": name,
            "args": {k: request[k] for k in policy_of(tool).from_input},
            "id": f"pre_{uuid.uuid4().hex[:12]}",
            "type": "tool_call",
        }
        for name, tool in spec.tools.items()
        if policy_of(tool).preload
    ]
    if preload:
        messages.append(tagged(AIMessage("", tool_calls=preload), "preload"))
    return {**reset, "status": "running", "input": request, "messages": messages}


def route_after_input(state: State) -> Literal["act", "reason", "__end__"]:
    """Rejected requests end here; preloaded tools run before the model is asked."""
    if state.get("status") == "rejected":
        return "__end__"
    messages = state.get("messages", [])
    last = messages[-1] if messages else None
    return "act" if isinstance(last, AIMessage) and last.tool_calls else "reason"
