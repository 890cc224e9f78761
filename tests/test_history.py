"""keelgraph.graphs.history: compaction at turn boundaries, the archive, dangling tool calls."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langgraph.store.memory import InMemoryStore

from keelgraph.graphs._prompt import kind_of, tagged
from keelgraph.graphs.history import (
    archive,
    archived_messages,
    compact,
    dangling_calls,
    estimate_tokens,
)


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


def test_earlier_turns_keep_only_what_the_model_is_shown() -> None:
    thread = turn(1) + turn(2, tools=2) + turn(3, rejected=True)
    out = compact(thread, budget_tokens=10_000, turns_done=3)
    assert out.ids == ["s1-0", "t1-0", "s2-0", "t2-0", "s2-1", "t2-1", "r3"]
    assert ids(out.to_archive) == ids(thread) and out.archived_turns == 3  # whole turns, once
    kept = [m for m in thread if str(m.id) not in out.ids]
    assert [kind_of(m) for m in kept] == ["request", "answer", "request", "answer"]
    # The next turn archives only what is new; the kept turns are already in the archive.
    later = [*kept, *turn(4)]
    again = compact(later, budget_tokens=10_000, turns_done=4, archived_turns=3)
    assert ids(again.to_archive) == ids(turn(4)) and again.archived_turns == 4


def test_turns_past_the_budget_leave_whole_and_oldest_first() -> None:
    thread = turn(1) + turn(2) + turn(3)
    per_turn = sum(estimate_tokens(m) for m in thread if kind_of(m) in {"request", "answer"}) // 3
    out = compact(thread, budget_tokens=2 * per_turn, turns_done=3)
    kept = [str(m.id) for m in thread if str(m.id) not in out.ids]
    assert kept == ["q2", "a2", "q3", "a3"]
    assert compact(thread, budget_tokens=0, turns_done=3).ids == ids(thread)
    assert compact(thread, budget_tokens=None, turns_done=3).ids == []


def test_a_turn_that_did_not_fit_takes_all_older_turns_with_it() -> None:
    long = turn(2)
    long[0] = tagged(HumanMessage("x" * 4000, id="q2"), "request")
    thread = turn(1) + long + turn(3)
    kept = [
        str(m.id) for m in thread if str(m.id) not in compact(thread, budget_tokens=200, turns_done=3).ids
    ]
    assert kept == ["q3", "a3"]  # turn 1 fits alone, but it would skip over turn 2


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.booleans()), max_size=12),
    budget=st.one_of(st.none(), st.integers(0, 400)),
)
def test_compaction_never_separates_a_call_from_its_result(
    shape: list[tuple[int, bool, bool]], budget: int | None
) -> None:
    thread: list[AnyMessage] = []
    for n, (tools, answered, rejected) in enumerate(shape):
        thread += turn(n, tools=tools, answered=answered, rejected=rejected)
    out = compact(thread, budget, turns_done=len(shape))
    kept = [m for m in thread if str(m.id) not in set(out.ids)]
    calls = {c["id"] for m in kept if isinstance(m, AIMessage) for c in m.tool_calls}
    results = {m.tool_call_id for m in kept if isinstance(m, ToolMessage)}
    if budget is None:
        assert out.removed == out.to_archive == []  # no budget: everything stays
    else:
        assert calls == results == set()  # earlier turns keep no tool traffic at all
        assert ids(out.to_archive) == ids(thread)  # everything is archived before anything leaves
    assert sorted(ids(out.removed) + ids(kept)) == sorted(ids(thread))  # nothing lost, nothing twice
    if budget is not None:
        assert out.kept_tokens <= budget


def test_archive_round_trip_keeps_order_and_content() -> None:
    store = InMemoryStore()
    first, second = turn(1), turn(2)
    archive(store, "t-1", first)
    archive(store, "t-1", second)
    archive(store, "t-1", [])
    archive(store, "other", turn(9))
    back = archived_messages(store, "t-1")
    assert ids(back) == ids(first + second)
    assert [m.content for m in back] == [m.content for m in first + second]
    assert kind_of(back[0]) == "request" and isinstance(back[1], AIMessage) and back[1].tool_calls


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
