"""keelgraph.graphs.history: turns leave the state whole, the archive and its chain, the window the
model is shown, dangling tool calls."""

from __future__ import annotations

import doctest
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage, messages_to_dict
from langgraph.store.memory import InMemoryStore

from keelgraph.graphs import history
from keelgraph.graphs.history import (
    ArchivedTurn,
    archive_namespace,
    archive_turns,
    archived_messages,
    compact,
    dangling_calls,
    estimate_tokens,
    recent_history,
    window,
)
from keelgraph.graphs.prompt import kind_of, tagged


def turn(n: int, *, tools: int = 1, answered: bool = True, rejected: bool = False) -> list[AnyMessage]:
    if rejected:
        return [tagged(HumanMessage(f"bad {n}", id=f"r{n}"), "rejected")]
    out: list[AnyMessage] = [tagged(HumanMessage(f"question {n}", id=f"q{n}"), "request")]
    for t in range(tools):
        call = {"name": "lookup", "args": {"n": n}, "id": f"c{n}-{t}", "type": "tool_call"}
        out.append(tagged(AIMessage("", tool_calls=[call], id=f"s{n}-{t}"), "step"))
        out.append(ToolMessage(f"result {n}", tool_call_id=f"c{n}-{t}", name="lookup", id=f"t{n}-{t}"))
    if answered:
        out.append(tagged(AIMessage(f'{{"reply": "answer {n}"}}', id=f"a{n}"), "answer"))
    return out


def ids(messages: list[AnyMessage]) -> list[str]:
    return [str(m.id) for m in messages]


def newest_first(*turns: list[AnyMessage]) -> list[ArchivedTurn]:
    return [ArchivedTurn.of(n, t) for n, t in reversed(list(enumerate(turns, 1)))]


def test_every_finished_turn_leaves_the_state_and_is_archived_once() -> None:
    thread = turn(1) + turn(2, tools=2) + turn(3, rejected=True)
    out = compact(thread, turns_done=3)
    assert out.ids == ids(thread) and out.archived_turns == 3
    assert [(n, ids(t)) for n, t in out.to_archive] == [
        (1, ids(turn(1))),
        (2, ids(turn(2, tools=2))),
        (3, ["r3"]),
    ]
    # Turns archived before (a state from before turns left it whole) leave without a second copy.
    again = compact(turn(3) + turn(4), turns_done=4, archived_turns=3)
    assert [n for n, _ in again.to_archive] == [4] and again.ids == ids(turn(3) + turn(4))


def test_the_window_keeps_whole_turns_newest_first_within_the_budget() -> None:
    turns = newest_first(turn(1), turn(2), turn(3))
    per_turn = turns[0].tokens
    assert per_turn == sum(estimate_tokens(m) for m in turn(3) if kind_of(m) in {"request", "answer"})
    assert ids(window(turns, 2 * per_turn)) == ["q2", "a2", "q3", "a3"]
    assert window(turns, 0) == [] and len(window(turns, 10_000)) == 6


def test_a_turn_that_did_not_fit_ends_the_window() -> None:
    long = turn(2)
    long[0] = tagged(HumanMessage("x" * 4000, id="q2"), "request")
    assert ids(window(newest_first(turn(1), long, turn(3)), 200)) == ["q3", "a3"]  # turn 1 would fit


def test_a_rejected_turn_is_not_shown_and_costs_nothing() -> None:
    turns = newest_first(turn(1), turn(2, rejected=True), turn(3))
    assert ids(window(turns, 2 * turns[0].tokens)) == ["q1", "a1", "q3", "a3"]


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.booleans()), max_size=12),
    budget=st.integers(0, 400),
)
def test_what_is_shown_never_separates_a_call_from_its_result(
    shape: list[tuple[int, bool, bool]], budget: int
) -> None:
    turns = [turn(n, tools=t, answered=a, rejected=r) for n, (t, a, r) in enumerate(shape, 1)]
    thread = [m for t in turns for m in t]
    out = compact(thread, turns_done=len(shape))
    archived = [m for _, t in out.to_archive for m in t]
    assert ids(archived) == ids(thread) == sorted(out.ids, key=ids(thread).index)  # all, once, whole
    shown = window(newest_first(*turns), budget)
    assert not any(isinstance(m, ToolMessage) or getattr(m, "tool_calls", None) for m in shown)
    assert sum(estimate_tokens(m) for m in shown) <= budget
    # Whole turns, the newest ones, in thread order: what the last k turns with anything shown show.
    each = [ids([m for m in t if kind_of(m) in {"request", "answer"}]) for t in turns]
    each = [t for t in each if t]
    assert any(ids(shown) == [i for t in each[k:] for i in t] for k in range(len(each) + 1))
    assert not dangling_calls(shown)


def test_archived_turns_read_back_in_order_and_whole() -> None:
    store = InMemoryStore()
    head = archive_turns(store, "t-1", [(1, turn(1)), (2, turn(2))])
    assert archive_turns(store, "t-1", [], after=head) == head
    archive_turns(store, "other", [(1, turn(9))])
    back = archived_messages(store, "t-1")
    assert ids(back) == ids(turn(1) + turn(2))
    assert [m.content for m in back] == [m.content for m in turn(1) + turn(2)]
    assert kind_of(back[0]) == "request" and isinstance(back[1], AIMessage) and back[1].tool_calls
    assert [i.key for i in store.search(archive_namespace("t-1"))] == ["000000001", "000000002"]


def test_recent_history_follows_the_chain_from_the_head() -> None:
    store = InMemoryStore()
    head = archive_turns(store, "t", [(n, turn(n)) for n in range(1, 6)])
    warm = recent_history(store, "t", turns=5, head=head, budget_tokens=10_000)
    history._SEEN.clear()  # a process that has not seen the thread reads it from the store
    cold = recent_history(store, "t", turns=5, head=head, budget_tokens=10_000)
    assert ids(warm) == ids(cold) == [f"{k}{n}" for n in range(1, 6) for k in "qa"]
    assert recent_history(store, "t", turns=5, head=head, budget_tokens=0) == []
    # Another timeline overwrote turn 3 (time travel): a process that has not seen this timeline's
    # turn 3 shows the turns after it only, never the other timeline's.
    history._SEEN.clear()
    other = archive_turns(store, "t", [(2, turn(2))], after="")  # not this chain's turn 2 digest
    archive_turns(store, "t", [(3, turn(33))], after=other)
    assert ids(recent_history(store, "t", turns=5, head=head, budget_tokens=10_000)) == [
        "q4",
        "a4",
        "q5",
        "a5",
    ]


def test_items_archived_before_turns_were_chained_are_still_shown() -> None:
    store = InMemoryStore()
    for n in (1, 2):  # the former format: messages only
        store.put(archive_namespace("t"), f"{n:09d}", {"messages": messages_to_dict(turn(n))})
    head = archive_turns(store, "t", [(3, turn(3))])
    history._SEEN.clear()
    assert ids(recent_history(store, "t", turns=3, head=head, budget_tokens=10_000)) == [
        "q1", "a1", "q2", "a2", "q3", "a3"
    ]  # fmt: skip


def test_dangling_calls_get_a_result_that_says_what_happened() -> None:
    calls: list[Any] = [
        {"name": "refund", "args": {"amount": 5}, "id": "c1", "type": "tool_call"},
        {"name": "lookup", "args": {}, "id": "c2", "type": "tool_call"},
    ]
    thread: list[AnyMessage] = [
        tagged(HumanMessage("q", id="q"), "request"),
        AIMessage("", tool_calls=calls, id="s"),
        ToolMessage("ok", tool_call_id="c2", name="lookup", id="t"),
    ]
    [fix] = dangling_calls(thread)
    assert fix.tool_call_id == "c1" and fix.name == "refund" and fix.status == "error"
    assert "effect is unknown" in str(fix.content)
    assert dangling_calls([*thread, fix]) == []


def test_doctests() -> None:
    result = doctest.testmod(history)
    assert result.attempted > 0 and result.failed == 0
