"""History that stays valid and small: compaction at turn boundaries, an archive, dangling calls.

A thread's checkpoint holds its *working* history: the current turn in full, and the earlier turns
the model is still shown (their requests and answers) up to a token budget. Everything else (earlier
turns' tool calls and results, rejected drafts, repair messages, turns past the budget) moves to
the thread's **archive** in the LangGraph store before it leaves the state, so nothing is lost and
`transcript()` gives the whole conversation back. Each checkpoint then stays the same size however
long the thread grows, where LangGraph's stock message list makes every checkpoint hold the whole
conversation (storage quadratic in its length, turns slower and slower).

Compaction only ever moves whole turns, and a tool call leaves together with its result: what
stays is always a valid conversation. `dangling_calls` finds tool calls left without a result (a
crash, a rejection, a trim), which `reason` answers before the model sees the thread.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    BaseMessage,
    ToolMessage,
    messages_from_dict,
    messages_to_dict,
)
from langgraph.store.base import BaseStore

from keelgraph.graphs._prompt import kind_of

__all__ = [
    "ARCHIVE",
    "Compaction",
    "archive_namespace",
    "archived_messages",
    "compact",
    "dangling_calls",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "transcript",
]

ARCHIVE = "archive"
SHOWN = frozenset({"request", "answer"})
"""The kinds of earlier-turn messages the model is shown (see `render`); the rest is archived."""


def archive_namespace(thread_id: str) -> tuple[str, ...]:
    """Where a thread's archived messages live in the store."""
    return ("keelgraph", ARCHIVE, thread_id)


MESSAGE_OVERHEAD = 4
"""Tokens a chat template adds per message (role, separators): an estimate."""


def _chars(message: BaseMessage) -> int:
    content = (
        message.content if isinstance(message.content, str) else json.dumps(message.content, default=repr)
    )
    calls = getattr(message, "tool_calls", None) or []
    return len(content) + (len(json.dumps([c["args"] for c in calls], default=str)) if calls else 0)


def estimate_prompt_tokens(messages: Sequence[BaseMessage], extra: str = "") -> int:
    """An estimate of a prompt's input tokens, not a count: characters // 4 (about right for
    English and JSON with BPE tokenizers) plus `MESSAGE_OVERHEAD` per message. `extra` is text sent
    beside the messages (tool and response schemas)."""
    return (len(extra) + sum(_chars(m) for m in messages)) // 4 + MESSAGE_OVERHEAD * len(messages)


def estimate_tokens(message: BaseMessage) -> int:
    """One message's share of `estimate_prompt_tokens`: what compaction budgets by."""
    return estimate_prompt_tokens([message])


@dataclass
class Compaction:
    """What leaves the state at the start of a turn, and what goes to the archive first."""

    to_archive: list[AnyMessage] = field(default_factory=list)
    """Whole turns not archived yet, in thread order: written to the archive before anything leaves."""
    removed: list[AnyMessage] = field(default_factory=list)
    """Messages to remove from the state (all of them archived, now or at an earlier turn)."""
    archived_turns: int = 0
    """Turns of the thread in the archive once `to_archive` is written."""
    kept_tokens: int = 0
    """The estimated tokens of the earlier turns that stay."""

    @property
    def ids(self) -> list[str]:
        return [str(m.id) for m in self.removed if m.id]


def _turns(messages: Sequence[AnyMessage]) -> list[list[AnyMessage]]:
    """The thread cut into turns: each starts at a request (or a rejected request)."""
    turns: list[list[AnyMessage]] = []
    for message in messages:
        if kind_of(message) in {"request", "rejected"} or not turns:
            turns.append([])
        turns[-1].append(message)
    return turns


def compact(
    messages: Sequence[AnyMessage], budget_tokens: int | None, *, turns_done: int = 0, archived_turns: int = 0
) -> Compaction:
    """Decide, before a new turn's request is added, what of `messages` leaves the state.

    Every finished turn not in the archive yet goes there whole (`turns_done` turns so far, of
    which `archived_turns` are archived). Earlier turns then keep in the state only what the model
    is shown of them (request and answer), newest first, while they fit in `budget_tokens`; a turn
    is kept or removed whole. `None` keeps everything (and archives nothing).

    >>> from langchain_core.messages import HumanMessage
    >>> from keelgraph.graphs._prompt import tagged
    >>> old = [tagged(HumanMessage("q1", id="1"), "request"), AIMessage("", id="2", tool_calls=[
    ...     {"name": "t", "args": {}, "id": "c1"}]), ToolMessage("r", tool_call_id="c1", id="3"),
    ...     tagged(AIMessage("a1", id="4"), "answer")]
    >>> c = compact(old, budget_tokens=1000, turns_done=1)
    >>> [m.id for m in c.to_archive], c.ids  # all archived; the call and its result leave together
    (['1', '2', '3', '4'], ['2', '3'])
    >>> compact(old, budget_tokens=1, turns_done=1, archived_turns=1).ids  # over budget: all of it
    ['1', '2', '3', '4']
    """
    if budget_tokens is None:
        return Compaction(archived_turns=archived_turns)
    turns = _turns(messages)
    done = max(turns_done, len(turns))  # a thread from before turns were counted holds them all
    first = done - len(turns) + 1  # the absolute number of the first turn in the state
    result = Compaction(archived_turns=done)
    result.to_archive = [m for n, turn in enumerate(turns, first) if n > archived_turns for m in turn]
    keep: set[int] = set()
    for turn in reversed(turns):
        shown = [m for m in turn if kind_of(m) in SHOWN]
        if not shown:
            continue  # nothing of it is shown (a rejected request): it leaves, the budget untouched
        cost = sum(estimate_tokens(m) for m in shown)
        if result.kept_tokens + cost <= budget_tokens:
            result.kept_tokens += cost
            keep.update(id(m) for m in shown)
        else:
            budget_tokens = result.kept_tokens  # older turns than one that did not fit go too
    result.removed = [m for m in messages if id(m) not in keep]
    return result


def archive(
    store: BaseStore, thread_id: str, messages: Sequence[AnyMessage], *, key: str | None = None
) -> None:
    """Append `messages` to the thread's archive: one store item, under `key` (default: the time).

    Items are read back in key order; a caller that may repeat a write (a node re-run after a
    crash) passes a key of its own that sorts in thread order, so the repeat overwrites.
    """
    if not messages:
        return
    key = key or f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    store.put(archive_namespace(thread_id), key, {"messages": messages_to_dict(list(messages))}, index=False)


def archived_messages(store: BaseStore, thread_id: str) -> list[AnyMessage]:
    """Every archived message of a thread, oldest first."""
    items: list[Any] = []
    offset = 0
    while True:
        page = store.search(archive_namespace(thread_id), limit=500, offset=offset)
        items.extend(page)
        if len(page) < 500:
            break
        offset += len(page)
    out: list[AnyMessage] = []
    for item in sorted(items, key=lambda i: i.key):
        out.extend(messages_from_dict(item.value["messages"]))  # type: ignore[arg-type]
    return out


def dangling_calls(messages: Sequence[AnyMessage]) -> list[ToolMessage]:
    """Results for tool calls that have none (after a crash, a rejection or a trim).

    A provider refuses a thread in which a tool call has no result; these say what happened
    instead, so the model can go on (and call again if it still needs to).
    """
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    missing = []
    for message in messages:
        if isinstance(message, AIMessage):
            for call in message.tool_calls:
                if call.get("id") and call["id"] not in answered:
                    missing.append(
                        ToolMessage(
                            "ERROR: this call has no result (the run stopped before it finished, or it "
                            "was not run). Its effect is unknown; call again if you still need it.",
                            tool_call_id=call["id"],
                            name=call["name"],
                            status="error",
                        )
                    )
    return missing


def transcript(store: BaseStore | None, thread_id: str, messages: Sequence[AnyMessage]) -> list[AnyMessage]:
    """A thread's whole conversation: its archive, then what the state holds that is not in it.

    `messages` is the thread's current state (`graph.get_state(config).values["messages"]`).
    """
    archived = archived_messages(store, thread_id) if store is not None else []
    seen = {m.id for m in archived}
    return [*archived, *(m for m in messages if m.id not in seen)]
