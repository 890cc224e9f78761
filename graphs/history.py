"""History that stays valid and small: the state holds one turn, earlier turns live in an archive.

With a store, a thread's checkpoint holds only the turn in progress. At the start of each turn the
finished turns move, whole, to the thread's **archive** in the LangGraph store (one item per turn,
keyed by its number), and the model is shown the most recent of them again, read back from the
archive (`recent_history`): their requests and answers, newest first, up to a token budget. So what
a checkpoint holds does not depend on the length of the thread, where LangGraph's stock message
list makes every checkpoint hold the whole conversation (storage quadratic in its length, turns
slower and slower); and nothing is lost: `transcript()` gives the whole conversation back.

Turns move whole and the model is shown no earlier tool traffic, so a tool call is never shown
without its result; `dangling_calls` finds the calls of the current turn left without one (a crash,
a rejection), which `reason` answers before the model sees the thread.

Archived turns form a chain: each item records a digest of its messages and of the turn before it,
and the state the digest of the newest (`archive_head`). Reading back follows the chain from the
head, so a thread resumed from an older checkpoint (time travel, a fork) is shown its own earlier
turns, never those of the timeline it left. The archive holds one item per turn number, the last
one written: a re-run turn overwrites its key, and a walk that meets an item of another timeline
stops there (the model is shown fewer earlier turns, never wrong ones). Items read or written are
cached in the process by digest; a digest names its content, so a cached turn is never stale, and
a turn that another process archived is read from the store, the source of truth.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
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
from langgraph.store.base import BaseStore, GetOp, Item, PutOp

from keelgraph.graphs.prompt import kind_of
from keelgraph.tools.identity import INTERNAL_ROOT, namespace_label

__all__ = [
    "ARCHIVE",
    "ArchivedTurn",
    "Compaction",
    "archive_namespace",
    "archive_turns",
    "archived_messages",
    "compact",
    "dangling_calls",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "recent_history",
    "transcript",
    "window",
]

ARCHIVE = "archive"
SHOWN = frozenset({"request", "answer"})
"""The kinds of earlier-turn messages the model is shown (see `render`); the rest stays archived."""


def archive_namespace(thread_id: str) -> tuple[str, ...]:
    """Where a thread's archived turns live in the store: under keelgraph's reserved root, which no
    user's own namespaces can reach (see `keelgraph.tools.identity.RESERVED_ROOTS`); the server's
    thread ownership decides who reads a thread, so its archive is read only by its graph.

    >>> archive_namespace("t-1")
    ('keelgraph', 'archive', 't-1')
    """
    return (INTERNAL_ROOT, ARCHIVE, namespace_label(thread_id))


def _key(number: int) -> str:
    return f"{number:09d}"  # sorts in thread order


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
    """One message's share of `estimate_prompt_tokens`: what the history budget counts."""
    return estimate_prompt_tokens([message])


# -- leaving the state ------------------------------------------------------------------------


@dataclass
class Compaction:
    """What leaves the state at the start of a turn, and what goes to the archive first."""

    to_archive: list[tuple[int, list[AnyMessage]]] = field(default_factory=list)
    """Whole turns not archived yet, as (turn number, messages), in thread order: written to the
    archive before anything leaves the state."""
    removed: list[AnyMessage] = field(default_factory=list)
    """Messages that leave the state: all of them (each archived now or at an earlier turn)."""
    archived_turns: int = 0
    """Turns of the thread in the archive once `to_archive` is written."""

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


def compact(messages: Sequence[AnyMessage], *, turns_done: int = 0, archived_turns: int = 0) -> Compaction:
    """Decide, before a new turn's request is added, what of `messages` leaves the state: all of it.

    `messages` are finished turns (`turns_done` of them so far in the thread, of which
    `archived_turns` are archived); each one not in the archive yet goes there whole, numbered.

    >>> from langchain_core.messages import HumanMessage
    >>> from keelgraph.graphs.prompt import tagged
    >>> old = [tagged(HumanMessage("q1", id="1"), "request"), AIMessage("", id="2", tool_calls=[
    ...     {"name": "t", "args": {}, "id": "c1"}]), ToolMessage("r", tool_call_id="c1", id="3"),
    ...     tagged(AIMessage("a1", id="4"), "answer")]
    >>> c = compact(old, turns_done=1)
    >>> [(n, [m.id for m in turn]) for n, turn in c.to_archive], c.ids  # the turn, whole
    ([(1, ['1', '2', '3', '4'])], ['1', '2', '3', '4'])
    >>> compact(old, turns_done=1, archived_turns=1).to_archive  # archived before: it only leaves
    []
    """
    turns = _turns(messages)
    done = max(turns_done, len(turns))  # a thread from before turns were counted holds them all
    first = done - len(turns) + 1  # the number of the first turn in the state
    return Compaction(
        to_archive=[(n, turn) for n, turn in enumerate(turns, first) if n > archived_turns],
        removed=list(messages),
        archived_turns=done,
    )


# -- the archive ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchivedTurn:
    """One turn of the archive as the prompt needs it: what the model is shown of it, and its links."""

    number: int
    digest: str
    """Names the turn's messages and the turn before it ("" for an item written before digests)."""
    after: str
    """The digest of the turn before ("" for the first turn, or unknown)."""
    shown: tuple[AnyMessage, ...]
    """Its request and answer (nothing for a rejected request)."""
    tokens: int
    """The estimated tokens of `shown`."""

    @classmethod
    def of(cls, number: int, messages: Sequence[AnyMessage], after: str = "") -> ArchivedTurn:
        shown = tuple(m for m in messages if kind_of(m) in SHOWN)
        return cls(number, _digest(after, messages), after, shown, sum(estimate_tokens(m) for m in shown))


def _digest(after: str, messages: Sequence[AnyMessage]) -> str:
    h = hashlib.blake2b(after.encode(), digest_size=12)
    for m in messages:
        content = m.content if isinstance(m.content, str) else json.dumps(m.content, default=repr)
        h.update(f"\x1e{m.id}\x1f{m.type}\x1f{content}".encode())
    return h.hexdigest()


class _Seen:
    """Archived turns this process wrote or verified, by digest (least recently used leave first)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._turns: OrderedDict[str, ArchivedTurn] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> ArchivedTurn | None:
        with self._lock:
            turn = self._turns.get(digest)
            if turn is not None:
                self._turns.move_to_end(digest)
            return turn

    def add(self, turn: ArchivedTurn) -> None:
        with self._lock:
            self._turns[turn.digest] = turn
            self._turns.move_to_end(turn.digest)
            while len(self._turns) > self.size:
                self._turns.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._turns.clear()


_SEEN = _Seen()


def archive_turns(
    store: BaseStore, thread_id: str, turns: Sequence[tuple[int, Sequence[AnyMessage]]], *, after: str = ""
) -> str:
    """Write whole turns to the thread's archive, one item per turn under its number, and return the
    digest of the last one (`after`, the digest of the turn before the first, when there are none).

    Keyed by number, a write that is repeated (a node re-run after a crash) overwrites, never copies.
    """
    ops, written = [], []
    for number, messages in turns:
        turn = ArchivedTurn.of(number, messages, after)
        value = {
            "messages": messages_to_dict(list(messages)),
            "turn": number,
            "digest": turn.digest,
            "after": after,
        }
        ops.append(PutOp(archive_namespace(thread_id), _key(number), value, index=False))
        written.append(turn)
        after = turn.digest
    if ops:
        store.batch(ops)
        for turn in written:
            _SEEN.add(turn)
    return after


def _read(number: int, item: Item) -> ArchivedTurn:
    messages: list[AnyMessage] = messages_from_dict(item.value["messages"])  # type: ignore[assignment]
    turn = ArchivedTurn.of(number, messages, str(item.value.get("after", "")))
    if "digest" not in item.value:  # written before turns were chained: it cannot be checked
        return ArchivedTurn(number, "", "", turn.shown, turn.tokens)
    return turn


READ_AHEAD = 16
"""Turns read from the store in one request when the process has not seen them."""


def _chain(store: BaseStore, thread_id: str, last: int, head: str) -> Iterator[ArchivedTurn]:
    """The thread's archived turns, newest first, from turn `last` whose digest is `head`."""
    fetched: dict[int, Item] = {}
    number, expected = last, head
    while number >= 1:
        turn = _SEEN.get(expected) if expected else None
        if turn is None or turn.number != number:
            if number not in fetched:
                keys = [_key(n) for n in range(number, max(0, number - READ_AHEAD), -1)]
                found = store.batch([GetOp(archive_namespace(thread_id), key) for key in keys])
                fetched = {int(item.key): item for item in found if isinstance(item, Item)}
            item = fetched.get(number)
            if item is None:
                return  # not archived (or pruned): nothing older is shown either
            turn = _read(number, item)
            if expected and turn.digest != expected:
                return  # the turn of another timeline of this thread (see the module docstring)
            if turn.digest:
                _SEEN.add(turn)
        yield turn
        number, expected = number - 1, turn.after


def window(turns: Iterable[ArchivedTurn], budget_tokens: int) -> list[AnyMessage]:
    """What the model is shown of earlier turns, given newest first: their requests and answers,
    oldest first, whole turns while they fit in `budget_tokens`. A turn that does not fit ends the
    window (an older one that fits would skip over it); one with nothing shown (a rejected request)
    costs nothing. Earlier tool traffic is never shown, so no call is shown without its result."""
    kept: list[tuple[AnyMessage, ...]] = []
    used = 0
    for turn in turns:
        if not turn.shown:
            continue
        if used + turn.tokens > budget_tokens:
            break
        used += turn.tokens
        kept.append(turn.shown)
    return [m for shown in reversed(kept) for m in shown]


def recent_history(
    store: BaseStore, thread_id: str, *, turns: int, head: str, budget_tokens: int
) -> list[AnyMessage]:
    """The earlier turns the model is shown, read back from the archive (see `window`): the chain of
    `turns` archived turns whose newest has digest `head` (the state's `archived_turns` and
    `archive_head`). Steady state costs no store request: this process wrote or read the turns."""
    if turns < 1 or budget_tokens <= 0:
        return []
    return window(_chain(store, thread_id, turns, head), budget_tokens)


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

    `messages` is the thread's current state (`graph.get_state(config).values["messages"]`). A
    thread resumed from an older checkpoint shows, past the turn it was resumed at, the turns of the
    timeline it left until its own overwrite them (the archive keeps one item per turn number).
    """
    archived = archived_messages(store, thread_id) if store is not None else []
    seen = {m.id for m in archived}
    return [*archived, *(m for m in messages if m.id not in seen)]
