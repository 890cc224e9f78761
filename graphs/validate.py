"""The `validate_input` node: the request against the input contract, and the turn's fresh start."""

from __future__ import annotations

import hashlib
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
from keelgraph.contracts.errors import InputRejected, Problem
from keelgraph.graphs.events import InputChecked, ProblemData, emit, problems_of
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


ANSWERED_KEPT = 64
"""Finished turns whose outcome a re-sent `request_id` gets back (older ids run again)."""
REQUEST_ID_MAX = 200
_FINISHED = frozenset({"ok", "failed", "rejected"})
_OUTCOME_KEYS = ("status", "output", "error", "stats")


def _request_id(state: State) -> tuple[str | None, Problem | None]:
    """The caller's id for this request: the input's `request_id`, else the run's
    `configurable.keelgraph_request_id`; a problem when it is not 1-200 printable characters."""
    value = state.get("request_id")
    if value is None:
        try:
            value = get_config().get("configurable", {}).get("keelgraph_request_id")
        except RuntimeError:  # outside a graph run
            value = None
    if value is None:
        return None, None
    if isinstance(value, str) and 0 < len(value) <= REQUEST_ID_MAX and value.isprintable():
        return value, None
    return None, Problem(
        field="request_id",
        reason=f"must be a string of 1-{REQUEST_ID_MAX} printable characters, got {_shown(value)}",
        fix="send a short id of your own (a UUID, say), the same one only when re-sending this request",
    )


def _shown(value: Any) -> str:
    try:
        return as_text(value)[:60]
    except Exception:  # a value whose text cannot be made is named by its type
        return f"a {type(value).__qualname__}"


def _request_sha(raw: Any) -> str:
    try:
        text = json.dumps(raw, sort_keys=True, ensure_ascii=False, default=str)
    except Exception:  # cycles, deep nesting, an object whose str or repr raises: any request is hashed
        text = f"<unhashable {type(raw).__qualname__} at {id(raw)}>"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _answered(state: State) -> dict[str, dict[str, Any]]:
    """The thread's kept outcomes, with the turn that just finished added when it had an id."""
    kept = dict(state.get("answered_requests") or {})
    previous = state.get("turn_request_id")
    if previous and state.get("status") in _FINISHED:
        kept.pop(previous, None)
        kept[previous] = {
            **{k: state.get(k) for k in _OUTCOME_KEYS},
            "sha": state.get("turn_request_sha", ""),
        }
    while len(kept) > ANSWERED_KEPT:
        kept.pop(next(iter(kept)))
    return kept


def _again(state: State, request_id: str, sha: str) -> dict[str, Any] | None:
    """What a re-sent request gets: the kept outcome (`replayed`), the cut-off turn going on where it
    stopped, a rejection when the id came with another request, or None: not seen, run it."""
    current = state.get("turn_request_id") == request_id
    if current and state.get("status") not in _FINISHED:
        if state.get("turn_request_sha", "") != sha:
            return _reused(request_id, state)
        return {"request_id": None, "replayed": True}  # the same turn goes on: same turn id, same effect keys
    record = (
        {**{k: state.get(k) for k in _OUTCOME_KEYS}, "sha": state.get("turn_request_sha", "")}
        if current
        else (state.get("answered_requests") or {}).get(request_id)
    )
    if record is None:
        return None
    if record.get("sha") != sha:
        return _reused(request_id, state)
    replay = {"request_id": None, "replayed": True, **{k: record.get(k) for k in _OUTCOME_KEYS}}
    if current:
        return replay
    # The thread's latest outcome becomes this one: keep the turn it replaces in the record first.
    return {
        **replay,
        "answered_requests": _answered(state),
        "turn_request_id": request_id,
        "turn_request_sha": sha,
    }


def _reused(request_id: str, state: State) -> dict[str, Any]:
    """The rejection of an id sent again with another request; the turn it replaces as the thread's
    latest outcome is kept in the record first, so the first request still gets its result."""
    problem = Problem(
        field="request_id",
        reason=f"request id {request_id!r} was sent before with a different request",
        fix="send a new request id for a new request; re-send a request only unchanged",
    )
    failure = InputRejected([problem]).to_failure().model_dump()
    return {
        "request_id": None,
        "replayed": False,
        "status": "rejected",
        "output": None,
        "error": failure,
        "answered_requests": _answered(state),
        "turn_request_id": None,
        "turn_request_sha": "",
    }


def _checked(valid: bool, problems: list[ProblemData], *, replayed: bool = False) -> InputChecked:
    return InputChecked(keelgraph="phase", phase="input", valid=valid, problems=problems, replayed=replayed)


def validate_input(
    state: State, runtime: Runtime[Context] | None = None, *, spec: AgentSpec
) -> dict[str, Any]:
    """Parse the request into the contract's input model; a bad one ends the turn, typed.

    Either way the request is appended to the thread exactly as it was sent. Earlier turns move to
    the thread's archive first (see `_compacted`): the state stays the same size as a thread grows.

    A request sent with a `request_id` the thread has seen is not run again (see `_again`): the
    caller gets the first outcome back (`replayed`), and a turn cut off by a crash goes on.
    """
    raw = state.get("request")
    request_id, bad_id = _request_id(state)
    sha = _request_sha(raw)
    if request_id is not None:
        again = _again(state, request_id, sha)
        if again is not None:
            refused = problems_of((again.get("error") or {}).get("problems") or [])
            valid = again.get("status") != "rejected"
            emit(_checked(valid, [] if valid else refused, replayed=bool(again.get("replayed"))))
            return again
    answered = _answered(state)
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
        "request_id": None,
        "turn_request_id": request_id,
        "turn_request_sha": sha,
        "answered_requests": answered,
        "replayed": False,
    }
    try:
        if bad_id is not None:
            raise InputRejected([bad_id])
        value = spec.contract.parse_input(raw)
    except InputRejected as exc:
        emit(_checked(False, problems_of(exc.problems)))
        message = tagged(HumanMessage(_rejected_text(raw)), "rejected")
        return {
            **reset,
            "status": "rejected",
            "error": exc.to_failure().model_dump(),
            "messages": [*removed, message],
        }
    emit(_checked(True, []))
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


def route_after_input(
    state: State,
) -> Literal["act", "reason", "approve", "check_output", "__end__"]:
    """Rejected requests end here; preloaded tools run before the model is asked. A re-sent
    request ends with its first outcome, or its cut-off turn goes on at the step it stopped before."""
    if state.get("status") in _FINISHED:
        return "__end__"
    messages = state.get("messages", [])
    last = messages[-1] if messages else None
    if isinstance(last, AIMessage) and last.tool_calls:
        # Preloaded tools; or a re-sent turn cut off before its calls ran (or a person's answer).
        return "approve" if state.get("replayed") and state.get("awaiting_approval") else "act"
    if state.get("replayed") and isinstance(last, AIMessage):
        return "check_output"  # cut off while its answer was being checked
    return "reason"
