"""What a turn tells a stream while it runs: typed events for its phases, and drafts marked as drafts.

The nodes write these with LangGraph's stream writer, so they reach `stream_mode="custom"` (in
process, and over `langgraph_sdk` as `custom` events); nobody streaming that mode costs one context
lookup per event, and nothing here adds a step or a checkpoint. Every event is a dict with a
`keelgraph` key: `"phase"` (what the turn is doing, named by `phase`) or `"output"` (the validated
answer, sent only after every check passed, just before the `final` phase).

The model's own text stays visible in `stream_mode="messages"` but is a draft: each model call runs
with the tag `DRAFT_TAG` (and `metadata["keelgraph"] == "draft"`), so a UI can show it as provisional
and take the answer from the `output` event only.

>>> from keelgraph.graphs.events import events
>>> chunks = [("updates", {"reason": {}}), ("custom", {"keelgraph": "output", "output": {"x": 1}})]
>>> list(events(chunks))
[{'keelgraph': 'output', 'output': {'x': 1}}]
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NotRequired, TypedDict, TypeGuard, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.config import get_stream_writer

__all__ = [
    "DRAFT_TAG",
    "ApprovalCall",
    "Decided",
    "Decision",
    "DecisionData",
    "Event",
    "Final",
    "FinalError",
    "InputChecked",
    "ModelFinished",
    "ModelStarted",
    "OutputReady",
    "PhaseEvent",
    "ProblemData",
    "Repairing",
    "ToolFinished",
    "ToolOutcome",
    "ToolStarted",
    "WaitingForApproval",
    "aevents",
    "as_event",
    "draft_config",
    "emit",
    "events",
    "finished",
    "phases",
    "problems_of",
    "reported",
]

_log = logging.getLogger("keelgraph")

DRAFT_TAG = "keelgraph:draft"
"""The tag of every model call of a turn: what it streams (`stream_mode="messages"`) is a draft."""

ToolOutcome = Literal["ok", "tool_args", "tool_error", "timeout", "refused", "rejected"]
Decision = Literal["tool_calls", "answer", "invalid"]


class ProblemData(TypedDict):
    """One `keelgraph.Problem` as data."""

    field: str
    reason: str
    fix: str


class InputChecked(TypedDict):
    """The request was checked against the input contract (`valid`, else its `problems`)."""

    keelgraph: Literal["phase"]
    phase: Literal["input"]
    valid: bool
    problems: list[ProblemData]
    replayed: bool
    """A `request_id` the thread had seen: its first outcome comes back, or its turn goes on."""


class ModelStarted(TypedDict):
    """The model is asked for the turn's next step (`call`: the turn's model calls so far, this one
    included; `repair`: right after an answer was rejected)."""

    keelgraph: Literal["phase"]
    phase: Literal["model_started"]
    call: int
    repair: bool


class ModelFinished(TypedDict):
    """The model answered: which model, and what kind of step it wrote (never the text itself)."""

    keelgraph: Literal["phase"]
    phase: Literal["model_finished"]
    call: int
    model: str
    decision: Decision
    """`tool_calls`, `answer` (a candidate: checks follow), or `invalid` (a repair follows)."""
    tools: list[str]
    cached: bool
    seconds: float


class ToolStarted(TypedDict):
    keelgraph: Literal["phase"]
    phase: Literal["tool_started"]
    name: str
    call_id: str


class ToolFinished(TypedDict):
    """A tool call ended: `ok`, an error kind, `refused` by the tool gate without running, or
    `rejected` by a person. Neither arguments nor results: the thread keeps those."""

    keelgraph: Literal["phase"]
    phase: Literal["tool_finished"]
    name: str
    call_id: str
    outcome: ToolOutcome
    seconds: float


class Repairing(TypedDict):
    """The candidate answer failed its contract or a check; the model is asked again with `problems`."""

    keelgraph: Literal["phase"]
    phase: Literal["repairing"]
    attempt: int
    kind: str
    problems: list[ProblemData]


class ApprovalCall(TypedDict):
    id: str
    name: str
    args: dict[str, Any]
    doubt: NotRequired[str]


class WaitingForApproval(TypedDict):
    """The run pauses (`interrupt`) until a person decides on `calls` (what the interrupt shows)."""

    keelgraph: Literal["phase"]
    phase: Literal["waiting_for_approval"]
    calls: list[ApprovalCall]
    problem: str | None
    """Why the last resume value could not be read, if it could not."""


class DecisionData(TypedDict):
    id: str
    name: str
    action: str


class Decided(TypedDict):
    """A person's decisions were read (or a call refused before was refused again)."""

    keelgraph: Literal["phase"]
    phase: Literal["decided"]
    decisions: list[DecisionData]


class FinalError(TypedDict):
    type: str
    code: str
    message: str
    problems: list[ProblemData]


class Final(TypedDict):
    """The turn ended with `status` (`ok`, `failed`, `rejected`)."""

    keelgraph: Literal["phase"]
    phase: Literal["final"]
    status: str
    error: FinalError | None
    stats: dict[str, Any]
    """`model_calls`, `tool_calls`, `repairs`, `seconds`."""
    replayed: bool


class OutputReady(TypedDict):
    """The validated answer: only once every check passed, and before the `final` phase."""

    keelgraph: Literal["output"]
    output: dict[str, Any]


PhaseEvent = (
    InputChecked
    | ModelStarted
    | ModelFinished
    | ToolStarted
    | ToolFinished
    | Repairing
    | WaitingForApproval
    | Decided
    | Final
)
Event = PhaseEvent | OutputReady

_KINDS = frozenset({"phase", "output"})
_FINISHED = frozenset({"ok", "failed", "rejected"})
_STATS = ("model_calls", "tool_calls", "repairs", "seconds")
F = TypeVar("F", bound=Callable[..., Any])


def emit(event: Event) -> None:
    """Send `event` to the run's custom stream; a no-op outside a run or when nobody streams it,
    and never an error (an event is a report, not a step of the turn)."""
    try:
        get_stream_writer()(event)
    except Exception as exc:  # outside a graph run (RuntimeError), or a writer that fails
        _log.debug("keelgraph: stream event %s not sent (%s)", event.get("keelgraph"), exc)


def draft_config() -> RunnableConfig:
    """The config every model call of a turn runs with: its streamed tokens are marked as drafts."""
    return {"tags": [DRAFT_TAG], "metadata": {"keelgraph": "draft"}}


def problems_of(problems: Iterable[Any]) -> list[ProblemData]:
    """Problems (models or dicts) as plain data."""
    out: list[ProblemData] = []
    for p in problems:
        data = p if isinstance(p, Mapping) else p.model_dump()
        out.append({"field": str(data["field"]), "reason": str(data["reason"]), "fix": str(data["fix"])})
    return out


def finished(update: Mapping[str, Any]) -> None:
    """Emit the `output` (when the turn ended ok) and `final` events of a node update that ends it."""
    status = update.get("status")
    if status not in _FINISHED:
        return
    output = update.get("output")
    if status == "ok" and isinstance(output, dict):
        emit(OutputReady(keelgraph="output", output=output))
    error = update.get("error")
    failure: FinalError | None = None
    if isinstance(error, Mapping):
        failure = {
            "type": str(error.get("type", "")),
            "code": str(error.get("code", "")),
            "message": str(error.get("message", "")),
            "problems": problems_of(error.get("problems") or []),
        }
    stats = update.get("stats") or {}
    emit(
        Final(
            keelgraph="phase",
            phase="final",
            status=str(status),
            error=failure,
            stats={k: stats.get(k, 0) for k in _STATS},
            replayed=bool(update.get("replayed")),
        )
    )


def reported(node: F) -> F:
    """`node`, emitting the `output` and `final` events when its update ends the turn (the graph's
    every way to end: rejected, failed, shipped, replayed). Keeps `node`'s signature."""

    if inspect.iscoroutinefunction(node):

        @functools.wraps(node)
        async def arun(*args: Any, **kwargs: Any) -> Any:
            update = await node(*args, **kwargs)
            if isinstance(update, Mapping):
                finished(update)
            return update

        return arun  # type: ignore[return-value]

    @functools.wraps(node)
    def run(*args: Any, **kwargs: Any) -> Any:
        update = node(*args, **kwargs)
        if isinstance(update, Mapping):
            finished(update)
        return update

    return run  # type: ignore[return-value]


def _is_event(value: Any) -> TypeGuard[Event]:
    return isinstance(value, dict) and value.get("keelgraph") in _KINDS


def as_event(chunk: Any) -> Event | None:
    """The keelgraph event in one stream chunk, or None: a chunk of `stream_mode="custom"`, a
    `(mode, chunk)` or `(namespace, mode, chunk)` tuple of several modes or `subgraphs=True`, a
    `version="v2"` part, or a `langgraph_sdk` `StreamPart` (event `custom`, or `custom|<namespace>`)."""
    if _is_event(chunk):
        return chunk
    event = getattr(chunk, "event", None)
    if isinstance(event, str):  # langgraph_sdk StreamPart
        data = getattr(chunk, "data", None)
        return data if (event == "custom" or event.startswith("custom|")) and _is_event(data) else None
    if isinstance(chunk, dict) and chunk.get("type") == "custom":  # version="v2"
        data = chunk.get("data")
        return data if _is_event(data) else None
    if isinstance(chunk, tuple) and len(chunk) >= 2:
        data = chunk[-1]
        modes = [c for c in chunk[:-1] if isinstance(c, str)]
        if (not modes or modes[-1] == "custom") and _is_event(data):
            return data
    return None


def events(chunks: Iterable[Any]) -> Iterator[Event]:
    """The keelgraph events of a stream, in order; every other chunk is skipped (see `as_event`).

    >>> for event in events(graph.stream(request, config, stream_mode="custom")):  # doctest: +SKIP
    ...     print(event["phase"] if event["keelgraph"] == "phase" else event["output"])
    """
    for chunk in chunks:
        if (event := as_event(chunk)) is not None:
            yield event


async def aevents(chunks: AsyncIterable[Any]) -> AsyncIterator[Event]:
    """`events` of an async stream (`graph.astream(...)`, `client.runs.stream(...)`)."""
    async for chunk in chunks:
        if (event := as_event(chunk)) is not None:
            yield event


def phases(found: Sequence[Event]) -> list[str]:
    """The phase names of `found`, with `output` for the output event: a turn's shape at a glance.

    >>> phases([{"keelgraph": "output", "output": {}}])
    ['output']
    """
    return [e["phase"] if e["keelgraph"] == "phase" else "output" for e in found]
