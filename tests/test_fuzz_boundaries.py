"""The boundary fuzz suite (issue 15, item 7): generated hostile values at every boundary of a
running graph (the request, the model's text and native tool calls, a tool's result, a person's
resume value). Invariant: the turn ends `ok`, `rejected` or `failed` with a typed error; the thread
is readable, resumable and never left running; nothing becomes NaN/Infinity or changed text without
a word; what a thread keeps is bounded; no thread is left running.

Seeded (`derandomize=True`, no example database), at least 2,000 generated cases in all, and
bounded in time: one graph per boundary for the whole module, a fresh thread per case.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from decimal import Decimal
from enum import IntEnum
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import StructuredTool
from langgraph.types import Command
from pydantic import BaseModel, Field, ValidationError

from keelgraph import Contract, build_graph, sqlite_checkpointer, with_policy
from keelgraph.contracts.boundary import LIMITS, REQUEST_KEEP_CHARS, Limits, check_value
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools.execution import RESULT_LIMITS, validate_args
from keelgraph.tools.gate import read_decisions

# -- the graphs -----------------------------------------------------------------------------------


class Question(BaseModel):
    city: str = Field(min_length=1, max_length=40)


class Reply(BaseModel):
    city: str
    note: str = ""


class SpendArgs(BaseModel):
    amount: float


CONTRACT = Contract(input=Question, output=Reply, instructions="Answer.", repair_budget=2)
REQUEST = {"city": "Oslo"}
FALLBACK = {"city": "Oslo", "note": "fallback"}
"""The valid answer the scripted model gives once the generated replies are used up."""
TYPED_ERRORS = {"InputRejected", "RepairExhausted", "BudgetExceeded"}

SCRIPT: deque[Any] = deque()
"""The replies of the case in progress, in order; then `FALLBACK` for every further call."""
RESULT: dict[str, Any] = {}
"""What the `lookup` tool returns in the case in progress (under "value")."""
SPENT: list[float] = []
"""The amounts the `spend` tool ran with in the case in progress."""
LOOKUPS: list[Any] = []
"""The cities the `lookup` tool ran with in the case in progress."""
CASES: dict[str, int] = {}
"""Generated cases run per boundary (the done-when asks for at least 2,000 in all)."""
THREADS_AT_START: set[threading.Thread] = set()
"""The threads alive when the module's graphs were built."""
_THREAD_IDS = itertools.count()


def _next_reply(messages: list[BaseMessage]) -> Any:
    return SCRIPT.popleft() if SCRIPT else answer(**FALLBACK)


def _lookup(city: str) -> Any:
    LOOKUPS.append(city)
    if "value" in RESULT:
        return RESULT["value"]
    return {"city": city, "temp": 3}


def _spend(amount: float) -> dict[str, float]:
    SPENT.append(amount)
    return {"spent": amount}


LOOKUP = with_policy(
    StructuredTool.from_function(_lookup, name="lookup", description="Look up a city"),
    side_effect="read",
    timeout_s=5,
)
SPEND = with_policy(
    StructuredTool.from_function(_spend, name="spend", description="Spend", args_schema=SpendArgs),
    side_effect="write",
    approval="always",
    timeout_s=5,
)


class _Fixture:
    def __init__(self, graph: Any, model: ScriptedChatModel, db: Path, name: str) -> None:
        self.graph, self.model, self.db, self.name = graph, model, db, name

    def config(self) -> Any:
        """A fresh thread for one case; the model's record of calls is dropped (memory stays flat)."""
        SCRIPT.clear()
        RESULT.clear()
        SPENT.clear()
        LOOKUPS.clear()
        self.model.calls.clear()
        CASES[self.name] = CASES.get(self.name, 0) + 1
        return {"configurable": {"thread_id": f"{self.name}-{next(_THREAD_IDS)}"}}

    def stored_bytes(self, config: Any) -> int:
        """What the thread's checkpoints and writes take in the SQLite file."""
        thread = config["configurable"]["thread_id"]
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            checkpoints = db.execute(
                "SELECT COALESCE(SUM(LENGTH(checkpoint) + LENGTH(metadata)), 0) FROM checkpoints"
                " WHERE thread_id = ?",
                (thread,),
            ).fetchone()[0]
            writes = db.execute(
                "SELECT COALESCE(SUM(LENGTH(value)), 0) FROM writes WHERE thread_id = ?", (thread,)
            ).fetchone()[0]
        return int(checkpoints) + int(writes)


def _fixture(tmp: Path, name: str, tools: list[Any], **kw: Any) -> _Fixture:
    model = ScriptedChatModel([_next_reply], repeat_last=True)
    db = tmp / f"{name}.db"
    graph = build_graph(
        CONTRACT, tools, model=model, checkpointer=sqlite_checkpointer(db), effects=None, **kw
    )
    return _Fixture(graph, model, db, name)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, _Fixture]:
    THREADS_AT_START.update(threading.enumerate())
    tmp = tmp_path_factory.mktemp("fuzz-boundaries")
    return {
        "request": _fixture(tmp, "request", [], strategy="json_object"),
        "model": _fixture(tmp, "model", [LOOKUP], strategy="tool_calling"),
        "tool": _fixture(tmp, "tool", [LOOKUP], strategy="json_object"),
        "resume": _fixture(tmp, "resume", [SPEND], strategy="json_object"),
    }


def _fuzz(examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
            HealthCheck.filter_too_much,
        ],
    )


KNOWN_BUGS: frozenset[str] = frozenset()
"""Bugs the fuzz finds and that are not fixed yet, by name: the values that trigger them are left out
of the generated cases until they are, and a strict xfail test pins each (`test_known_bug_*`). The
nine it found first (a repr that raises, a tuple key, an IntEnum, arguments and answers written as
JSON strings, an unhashable action, bytes that are not UTF-8, a refused decision replayed on a
later resume) are fixed: their `test_known_bug_*` tests are regression tests now."""

# -- hostile values -------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BIG_INTS = [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**400, -(10**400)]
ODD_FLOATS = [NAN, INF, -INF, -0.0, 1e308, -1e308, 5e-324, 1.7976931348623157e308]
ODD_CHARS = ["\x00", "\ufffd", "\ud800", "\udfff", "\udbff\udc00", '"', "\\", "\n", "\x7f", "é", "\U0001f600"]

surrogates = st.integers(0xD800, 0xDFFF).map(chr)
texts = st.one_of(
    st.text(max_size=16),
    st.lists(st.one_of(st.characters(), surrogates, st.sampled_from(ODD_CHARS)), max_size=16).map("".join),
)
sound_texts = st.text(st.characters(exclude_characters="\x00\ufffd"), min_size=1, max_size=16)
ints = st.one_of(st.integers(-1000, 10**6), st.sampled_from(BIG_INTS), st.integers())
floats = st.one_of(st.floats(), st.sampled_from(ODD_FLOATS))
leaves = st.one_of(st.none(), st.booleans(), ints, floats, texts)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(texts, inner, max_size=4),
    )


json_like = st.recursive(leaves, _containers, max_leaves=12)
"""What a JSON parser can produce (NaN, infinities, huge integers and lone surrogates included)."""


def _deep(levels: int, shape: str, leaf: Any) -> Any:
    """A value nested `levels` deep, built without recursion."""
    value = leaf
    for level in range(levels):
        value = [value] if shape == "list" or (shape == "mixed" and level % 2) else {"k": value}
    return value


def deep_values(most: int) -> st.SearchStrategy[Any]:
    levels = st.one_of(
        st.sampled_from([n for n in (63, 64, 65, 200, 201, 999, 1000, 5000) if n <= most]),
        st.integers(60, most),
    )
    return st.builds(_deep, levels, st.sampled_from(["list", "dict", "mixed"]), leaves)


class _Text(str):
    pass


class _Number(IntEnum):
    BIG = 2**62


class _Custom:
    pass


class _Hostile:
    """An object whose every hook raises: nothing may call them on the way in."""

    def __repr__(self) -> str:
        raise RuntimeError("repr called")

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq called")

    def __hash__(self) -> int:
        raise RuntimeError("hash called")

    def __iter__(self) -> Iterator[Any]:
        raise RuntimeError("iter called")

    def __len__(self) -> int:
        raise RuntimeError("len called")

    def __bool__(self) -> bool:
        raise RuntimeError("bool called")


def _generator() -> Iterator[int]:
    yield 1


OBJECTS: list[Callable[[], Any]] = [
    object,
    _Custom,
    lambda: {1, 2},
    frozenset,
    lambda: b"by\x00tes\xff",
    lambda: bytearray(b'{"city": "Oslo"}'),
    lambda: lambda: 1,
    _generator,
    threading.Lock,
    lambda: Decimal("NaN"),
    lambda: complex(1, 2),
    lambda: range(3),
    lambda: _Text("Oslo"),
]
if "repr-raises" not in KNOWN_BUGS:
    OBJECTS.append(_Hostile)
if "int-enum" not in KNOWN_BUGS:
    OBJECTS.append(lambda: _Number.BIG)
not_data = st.sampled_from(OBJECTS).map(lambda make: make())


def _cycle(kind: str) -> Any:
    if kind == "dict":
        node: dict[str, Any] = {"city": "Oslo"}
        node["self"] = node
        return node
    if kind == "list":
        items: list[Any] = [1]
        items.append(items)
        return items
    if kind == "mutual":
        a: dict[str, Any] = {"city": "Oslo"}
        a["b"] = {"a": a}
        return a
    if kind == "deep":
        inner: list[Any] = []
        value = {"city": "Oslo", "x": [[[inner]]]}
        inner.append(value)
        return value
    shared = [1, 2]  # not a cycle: the same list twice
    return {"city": "Oslo", "a": shared, "b": shared}


circular = st.sampled_from(["dict", "list", "mutual", "deep", "shared"]).map(_cycle)
hostile = st.one_of(
    json_like,
    deep_values(5000),
    not_data,
    circular,
    st.recursive(st.one_of(leaves, not_data, circular), _containers, max_leaves=6),
)
"""Anything at all: data, deep data, Python objects that are not data, cycles."""
jsonish = st.one_of(json_like, deep_values(600))
"""What a provider's parsed native tool-call arguments can be (its JSON reader stops near 1,000
levels; keelgraph's own `ScriptedChatModel` measures arguments with `json.dumps`)."""


# -- text forms -----------------------------------------------------------------------------------


def _as_json(value: Any, ascii_only: bool) -> str:
    try:
        return json.dumps(value, ensure_ascii=ascii_only, default=lambda o: f"<{type(o).__name__}>")
    except (ValueError, RecursionError):
        return '{"unwritable": '


def _deep_text(levels: int, bracket: str, closed: bool) -> str:
    opener, closer = ("[", "]") if bracket == "[" else ('{"a": ', "}")
    return opener * levels + "1" + (closer * levels if closed else "")


TOKEN_TEXTS = [
    "NaN",
    "-NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "1e-400",
    "-0",
    "-0.0",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "9" * 5000,
    '"\\ud800"',
    '"a\\udfffb"',
    '"\\ud83d\\ude00"',
    '"\\u0000"',
    '"\ufffd"',
    '"Os\ud800lo"',
    '"Os\x00lo"',
    '"Oslo"',
    "tru",
    "nul",
    "[1,]",
    "{,}",
    '{"a": 1,}',
    "'single'",
    "// comment",
    "",
    '"unclosed',
    "[[[",
    "]]]",
    "0x10",
    "01",
    "+1",
    ".5",
]
tokens = st.one_of(
    st.sampled_from(TOKEN_TEXTS),
    st.builds(_as_json, json_like, st.booleans()),
    st.builds(_as_json, sound_texts, st.booleans()),
    st.builds(_deep_text, st.integers(60, 5000), st.sampled_from("[{"), st.booleans()),
)
"""JSON-ish text for one value: what a model or a caller may write where a value belongs."""

WRAPS = ["plain", "fence", "chatter", "commas", "tags", "truncated", "twice", "fences", "nul", "surrogate"]


def _wrap(text: str, how: str, cut: float) -> str:
    if how == "fence":
        return "```json\n" + text + "\n```"
    if how == "chatter":
        return "Sure! Here it is: " + text + " Hope it helps."
    if how == "commas":
        return text[:-1] + ",}" if text.endswith("}") else text + ","
    if how == "tags":
        return "<tool_call>" + text + "</tool_call>"
    if how == "truncated":
        return text[: int(len(text) * cut)]
    if how == "twice":
        return text + "\n" + text
    if how == "fences":
        return "```json\n" + text + "\n```\n```json\n" + text + "\n```"
    if how == "nul":
        return text + "\x00"
    if how == "surrogate":
        return "\ud800" + text
    return text


def wrapped(texts_: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(_wrap, texts_, st.sampled_from(WRAPS), st.floats(0, 1))


# -- helpers --------------------------------------------------------------------------------------


def _ended(result: dict[str, Any], state: Any, allowed: set[str]) -> None:
    """The turn ended in a defined state, with a typed error when it did not end ok."""
    assert result["status"] in allowed, result
    assert state.values["status"] == result["status"]
    assert state.next == (), f"the thread is left waiting at {state.next}"
    if result["status"] != "ok":
        error = result["error"]
        assert error["type"] in TYPED_ERRORS, error
        assert error["problems"] or error["attempts"], error
        json.dumps(error, allow_nan=False)
    for message in state.values["messages"]:
        assert isinstance(message, BaseMessage)
        json.dumps(message.content, allow_nan=False)


def _event(text: str) -> None:
    """Count an outcome in Hypothesis' statistics (`--hypothesis-show-statistics`)."""
    if currently_in_test_context():
        event(text)


def _sound(value: Any, limits: Limits = LIMITS) -> bool:
    """JSON data with no NaN/infinity, no integer past 64 bits, no lone surrogate or NUL."""
    return not check_value(value, limits)


_PLAIN = (dict, list, str, int, float, bool, type(None))


def _plain(value: Any) -> bool:
    """Whether `value` is made of the JSON types themselves (no subclasses: what a checkpoint
    stores of anything else is an extension type that LangGraph's strict msgpack mode refuses)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if type(node) not in _PLAIN:
            return False
        if type(node) is dict:
            stack.extend(node.keys())
            stack.extend(node.values())
        elif type(node) is list:
            stack.extend(node)
    return True


def _strings(value: Any) -> list[str]:
    """The strings of `value` (not its keys), walked without recursion."""
    found, stack = [], [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            found.append(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return found


def _has_fffd(value: Any) -> bool:
    """Whether U+FFFD is written anywhere in `value` (its strings and keys, as the character or
    its JSON escape), walked without recursion."""
    stack = [value]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\ufffd" in node or "\\ufffd" in node.lower():  # written, or as a JSON escape
                return True
        elif isinstance(node, (dict, list, tuple)) and id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.keys() if isinstance(node, dict) else ())
            stack.extend(node.values() if isinstance(node, dict) else node)
        elif isinstance(node, AIMessage):
            stack.extend(
                [node.content, [c["name"] for c in node.tool_calls], [c["args"] for c in node.tool_calls]]
            )
    return False


def _written(text: str, raw: str) -> bool:
    """Whether `text` is written in `raw` as a JSON string (escaped or not), or as one inside a
    JSON string (an answer written as JSON text)."""
    forms = [json.dumps(text, ensure_ascii=a) for a in (True, False)]
    forms += [json.dumps(f, ensure_ascii=a)[1:-1] for f in forms for a in (True, False)]
    return text == "" or any(f in raw for f in forms)


# -- 1. requests ----------------------------------------------------------------------------------

big_texts = st.builds(
    lambda char, size: '{"city": "' + char * size + '"}',
    st.sampled_from(["x", "é", "\ud800", "\x00", "\\"]),
    st.sampled_from([40, 41, 19_990, 20_001, 65_537, 120_000]),
)
request_texts = st.one_of(
    st.builds(lambda t: '{"city": ' + t + "}", tokens),
    st.builds(lambda t: '{"city": "Oslo", "extra": ' + t + "}", tokens),
    tokens,
    texts,
    big_texts,
)


def _as_bytes(text: str) -> bytes:
    """`text` as a request body; lone surrogates as the bytes that encode them, unless the silent
    decoding of invalid UTF-8 is a known bug (then they are left out)."""
    return text.encode("utf-8", errors="ignore" if "invalid-utf8" in KNOWN_BUGS else "surrogatepass")


ODD_KEYS: list[Any] = [None, 1.5, True, -(2**64)] + ([] if "tuple-key" in KNOWN_BUGS else [(1, 2)])
requests = st.one_of(
    hostile,
    st.fixed_dictionaries({"city": hostile}),
    st.fixed_dictionaries({"city": st.one_of(texts, sound_texts)}),
    st.fixed_dictionaries({"city": st.sampled_from(["Oslo", "Bergen"])}, optional={"extra": hostile}),
    st.dictionaries(st.one_of(texts, ints, st.sampled_from(ODD_KEYS)), hostile, max_size=3),
    wrapped(request_texts),
    wrapped(request_texts).map(_as_bytes),
    st.builds(lambda t: json.dumps({"city": t}, ensure_ascii=False), texts).map(_as_bytes),
    st.builds(lambda t, b: _as_bytes('{"city": "' + t + '"}') + b, sound_texts, st.binary(max_size=4)),
)


def _written_in_request(city: str, request: Any) -> bool:
    """Whether the accepted `city` is what the request says, as it was sent."""
    if isinstance(request, (bytes, bytearray)):
        try:
            request = bytes(request).decode("utf-8")
        except UnicodeDecodeError:
            return False  # the body is not UTF-8: no text was sent that the city could be
    if isinstance(request, str):
        return _written(city, request)
    return bool(request.get("city") == city)


@_fuzz(1000)
@given(request=requests)
def test_any_request_ends_ok_or_rejected_and_is_kept_bounded(
    graphs: dict[str, _Fixture], request: Any
) -> None:
    _request_case(graphs["request"], request)


def _request_case(fx: _Fixture, request: Any) -> None:
    config = fx.config()
    result = fx.graph.invoke({"request": request}, config)
    state = fx.graph.get_state(config)
    _ended(result, state, {"ok", "rejected"})
    _event(f"request: {result['status']}")
    if result["status"] == "ok":
        assert result["output"] == FALLBACK
        city = state.values["input"]["city"]
        assert _sound(state.values["input"])
        assert _written_in_request(city, request), f"the request's city became {city!r}"
    else:
        assert result["error"]["type"] == "InputRejected"
        assert fx.model.calls == [], "a rejected request never reaches the model"
        assert all(p["field"] and p["reason"] and p["fix"] for p in result["error"]["problems"])
        last = state.values["messages"][-1]
        assert last.additional_kwargs["keelgraph"] == "rejected"
        assert isinstance(last.content, str) and len(last.content) <= 70_000
    kept = state.values["request"]
    if isinstance(kept, (str, bytes)):
        assert len(kept) <= REQUEST_KEEP_CHARS
    else:
        assert _sound(kept) and _plain(kept), "the thread keeps JSON data only"
        assert len(json.dumps(kept, ensure_ascii=False)) <= 70_000
    assert fx.stored_bytes(config) <= 1_000_000, "what the thread keeps is bounded"


# -- 2. model outputs -----------------------------------------------------------------------------

TEMPLATES = [
    '{"action": "final_answer", "answer": {"city": %s, "note": "n"}}',
    '{"action": "final_answer", "answer": {"city": "Oslo", "note": %s}}',
    '{"city": %s}',
    '{"action": "lookup", "args": {"city": %s}}',
    '[{"action": "final_answer", "answer": {"city": %s}}]',
    '{"action": "nope", "args": {"x": %s}}',
]
ARG_STRING_TEMPLATES = ['{"action": "lookup", "args": %s}', '{"name": "lookup", "arguments": %s}']
ANSWER_STRING_TEMPLATE = '{"action": "final_answer", "answer": %s}'


def _filled(template: str, token: str) -> str:
    return template.replace("%s", token)


def _arg_string(template: str, token: str) -> str:
    """The arguments written as a JSON string holding JSON (as some models write them)."""
    return template.replace("%s", json.dumps('{"city": ' + token + "}"))


arg_string_tokens = (
    tokens if "json-string-args" not in KNOWN_BUGS else st.builds(_as_json, sound_texts, st.booleans())
)
answer_string_tokens = (
    tokens
    if "json-string-nul" not in KNOWN_BUGS
    else tokens.filter(lambda t: "\\u0000" not in t and "\x00" not in t)
)
model_texts = st.one_of(
    wrapped(st.builds(_arg_string, st.just(ANSWER_STRING_TEMPLATE), answer_string_tokens)),
    wrapped(st.builds(_filled, st.sampled_from(TEMPLATES), tokens)),
    wrapped(st.builds(_arg_string, st.sampled_from(ARG_STRING_TEMPLATES), arg_string_tokens)),
    wrapped(tokens),
    texts,
)
call_names = st.sampled_from(["final_answer", "lookup", "lookup", "nope", "", "look\x00up", "\ud800"])
call_args = st.one_of(
    st.fixed_dictionaries({"city": jsonish}),
    st.fixed_dictionaries({"city": sound_texts}, optional={"note": jsonish, "extra": jsonish}),
    st.dictionaries(st.one_of(texts, st.sampled_from(["city", "note"])), jsonish, max_size=3),
)


def _native(calls: list[tuple[str, dict[str, Any]]], content: str) -> AIMessage:
    tool_calls = [
        {"name": name, "args": args, "id": f"call_{i}", "type": "tool_call"}
        for i, (name, args) in enumerate(calls)
    ]
    return AIMessage(content, tool_calls=tool_calls)


model_replies = st.one_of(
    model_texts,
    model_texts.map(lambda t: AIMessage([{"type": "text", "text": t}])),
    st.builds(
        _native,
        st.lists(st.tuples(call_names, call_args), min_size=1, max_size=3),
        st.sampled_from(["", "ok"]),
    ),
)


def _raw_of(reply: Any) -> str:
    if isinstance(reply, AIMessage):
        return reply.content if isinstance(reply.content, str) else json.dumps(reply.content)
    return str(reply)


def _answers_in(reply: Any) -> list[dict[str, Any]]:
    """The answers a native reply's final_answer calls hold, as the contract would read them."""
    found = []
    if isinstance(reply, AIMessage):
        for c in reply.tool_calls:
            if c["name"] == "final_answer":
                with contextlib.suppress(ValidationError):
                    found.append(Reply.model_validate(c["args"]).model_dump())
    return found


@_fuzz(800)
@given(replies=st.lists(model_replies, min_size=1, max_size=3))
def test_any_model_output_ends_ok_or_failed_typed(graphs: dict[str, _Fixture], replies: list[Any]) -> None:
    _model_case(graphs["model"], replies)


def _model_case(fx: _Fixture, replies: list[Any]) -> None:
    config = fx.config()
    SCRIPT.extend(replies)
    result = fx.graph.invoke({"request": REQUEST}, config)
    state = fx.graph.get_state(config)
    _ended(result, state, {"ok", "failed"})
    json.dumps(state.values["tool_log"], allow_nan=False)
    assert _sound(LOOKUPS), f"a tool ran with arguments that are not sound data: {LOOKUPS!r}"
    raws = [_raw_of(r) for r in replies]
    native = {
        t for r in replies if isinstance(r, AIMessage) for c in r.tool_calls for t in _strings(c["args"])
    }
    for message in state.values["messages"]:
        for text in _strings([c["args"] for c in getattr(message, "tool_calls", [])]):
            assert text in native or any(_written(text, raw) for raw in raws), (
                f"the thread keeps a tool call with {text!r}, which the model did not write"
            )
    answered = "generated answer" if result["status"] == "ok" and result["output"] != FALLBACK else "fallback"
    _event(f"model output: {result['status']}" + (f" ({answered})" if result["status"] == "ok" else ""))
    if result["status"] == "ok":
        output = result["output"]
        json.dumps(output, allow_nan=False)
        assert _sound(output), output
        if "\ufffd" in json.dumps(output, ensure_ascii=False):
            assert any(_has_fffd(r) for r in replies), "U+FFFD appeared that no reply wrote"
        if output != FALLBACK:
            answers = [a for r in replies for a in _answers_in(r)]
            written = any(all(_written(s, _raw_of(r)) for s in output.values()) for r in replies)
            assert output in answers or written, f"the answer {output!r} is not what the model wrote"
    again = fx.graph.invoke(None, config)
    assert again["status"] == result["status"]
    assert fx.graph.get_state(config).next == ()


# -- 3. tool results ------------------------------------------------------------------------------

big_results = st.builds(
    lambda char, size: char * size,
    st.sampled_from(["x", "\ud800", "\x00", "é"]),
    st.sampled_from([4_001, 100_001, 300_000]),
)
tool_results = st.one_of(hostile, st.dictionaries(texts, hostile, max_size=3), big_results)


@_fuzz(500)
@given(value=tool_results)
def test_any_tool_result_ends_typed_and_is_kept_as_data(graphs: dict[str, _Fixture], value: Any) -> None:
    fx = graphs["tool"]
    config = fx.config()
    SCRIPT.append(call("lookup", city="Oslo"))
    RESULT["value"] = value
    result = fx.graph.invoke({"request": REQUEST}, config)
    state = fx.graph.get_state(config)
    _ended(result, state, {"ok", "failed"})
    assert result["status"] == "ok" and result["output"] == FALLBACK
    log = state.values["tool_log"]
    json.dumps(log, allow_nan=False)
    assert all(_sound(entry["output"], RESULT_LIMITS) and _sound(entry["args"]) for entry in log)
    [reply] = [m for m in state.values["messages"] if isinstance(m, ToolMessage)]
    _event(
        "tool result: "
        + ("kept" if not check_value(value, RESULT_LIMITS) else "changed" if log else "refused")
    )
    if not check_value(value, RESULT_LIMITS):
        # Plain data within the limits is kept exactly (cut only past `max_stored_chars`).
        [entry] = log
        if not (isinstance(entry["output"], str) and "[cut for storage:" in entry["output"]):
            assert entry["output"] == json.loads(json.dumps(value)), "a sound result was changed"
        assert "keelgraph changed" not in reply.content
    elif log:
        assert "keelgraph changed" in reply.content, "a change to the result was silent"
    else:
        assert reply.status == "error" and str(reply.content).startswith("ERROR")
    again = fx.graph.invoke(None, config)
    assert again["status"] == "ok"


# -- 4. resume values -----------------------------------------------------------------------------

amounts = st.one_of(floats, ints, texts, st.sampled_from(["7", "1e3", True, None]))
ACTIONS = ["approve", "edit", "reject", "APPROVE", "approve ", "", "approve\x00", "appr\ud800ove"]
actions = st.one_of(st.sampled_from(ACTIONS), texts, leaves if "unhashable-action" in KNOWN_BUGS else hostile)
decisions = st.fixed_dictionaries(
    {"action": actions},
    optional={
        "args": st.one_of(
            st.fixed_dictionaries({"amount": amounts}),
            hostile,
        ),
        "reason": st.one_of(texts, hostile),
        "name": st.sampled_from(["spend", "other", None]),
    },
)
valid_decisions = st.fixed_dictionaries(
    {"action": st.sampled_from(["approve", "edit", "reject"])},
    optional={
        "args": st.fixed_dictionaries({}, optional={"amount": amounts, "extra": json_like}),
        "reason": sound_texts,
        "name": st.just("spend"),
    },
)
"""Decisions that read, mostly: what runs must be exactly what they say."""
resume_values = st.one_of(
    st.tuples(st.sampled_from(["as_is", "by_id"]), valid_decisions),
    # None is left out: LangGraph 1.2.24 fails on Command(resume=None) itself (UnboundLocalError
    # `resume_is_map` in pregel/_loop.py) before any node runs.
    st.tuples(st.just("as_is"), hostile.filter(lambda v: v is not None)),
    st.tuples(st.just("as_is"), st.one_of(st.sampled_from(ACTIONS), texts)),
    st.tuples(st.sampled_from(["as_is", "by_id", "other_id"]), decisions),
)


def _resume_value(shape: str, payload: Any, call_id: str) -> Any:
    if shape == "by_id":
        return {call_id: payload}
    if shape == "other_id":
        return {"not-" + call_id: payload}
    return payload


@_fuzz(400)
@given(resume=resume_values)
def test_any_resume_value_is_asked_again_or_decides_typed(
    graphs: dict[str, _Fixture], resume: tuple[str, Any]
) -> None:
    _resume_case(graphs["resume"], *resume)


def _resume_case(fx: _Fixture, shape: str, payload: Any) -> None:
    config = fx.config()
    SCRIPT.append(call("spend", amount=5.0))
    fx.graph.invoke({"request": REQUEST}, config)
    state = fx.graph.get_state(config)
    assert state.next == ("approve",)
    asked = state.tasks[0].interrupts[-1].value["calls"]
    value = _resume_value(shape, payload, asked[0]["id"])
    result = fx.graph.invoke(Command(resume=value), config)
    state = fx.graph.get_state(config)
    try:
        expected: dict[str, Any] | None = read_decisions(value, asked)[asked[0]["id"]]
    except ValueError:
        expected = None
    asked_again = expected is None
    if expected is None:
        assert state.next == ("approve",), "a value that is not a valid decision is asked again"
        if not (isinstance(value, dict) and not value):  # LangGraph reads {} as a map of no interrupts
            assert state.tasks[0].interrupts[-1].value["problem"], "asked again without saying why"
        assert SPENT == [], "the tool ran without a valid decision"
        result = fx.graph.invoke(Command(resume="approve"), config)
        state = fx.graph.get_state(config)
        expected = {"action": "approve", "args": {"amount": 5.0}}
    _ended(result, state, {"ok", "failed"})
    _event(f"resume: {'asked again, then approved' if asked_again else expected['action']}")
    if asked_again and "replayed-resume" in KNOWN_BUGS:
        # Known bug (see its xfail): the "approve" that answers the second question may be ignored
        # for the refused value as the checkpoint stored it. Still: at most one run, finite.
        assert len(SPENT) <= 1 and all(math.isfinite(a) for a in SPENT), SPENT
    elif expected["action"] == "reject":
        assert SPENT == []
    else:
        # The tool runs exactly when the decided arguments pass its own (strict) validation.
        runs = not validate_args(SPEND, expected["args"])
        ran = [SpendArgs.model_validate(expected["args"]).amount] if runs else []
        assert ran == SPENT, (SPENT, expected)
        assert all(math.isfinite(a) for a in SPENT)
    again = fx.graph.invoke(None, config)
    assert again["status"] == result["status"]


# -- known bugs (strict xfail: they pass once fixed) -----------------------------------------------


def test_known_bug_a_request_holding_an_object_whose_repr_raises(graphs: dict[str, _Fixture]) -> None:
    _request_case(graphs["request"], {"city": _Hostile()})


def test_known_bug_a_request_holding_an_int_enum(graphs: dict[str, _Fixture]) -> None:
    _request_case(graphs["request"], {"city": _Number.BIG})


def test_known_bug_a_request_body_that_is_not_utf8(graphs: dict[str, _Fixture]) -> None:
    _request_case(graphs["request"], b'{"city": "Os\xfflo"}')


def test_known_bug_a_request_with_a_tuple_key_and_an_object(graphs: dict[str, _Fixture]) -> None:
    _request_case(graphs["request"], {(1, 2): object()})


@pytest.mark.parametrize(
    "token",
    ["9" * 5000, "[" * 5000 + "]" * 5000, "[" * 300 + "1" + "]" * 300, '"\\ud800"', '"a\\u0000"'],
    ids=["digits-5000", "deep-5000", "deep-300", "surrogate", "nul"],
)
def test_known_bug_tool_arguments_written_as_a_json_string(graphs: dict[str, _Fixture], token: str) -> None:
    text = '{"action": "lookup", "args": ' + json.dumps('{"city": ' + token + "}") + "}"
    _model_case(graphs["model"], [text])


def test_known_bug_an_answer_written_as_a_json_string_with_a_nul(graphs: dict[str, _Fixture]) -> None:
    text = '{"action": "final_answer", "answer": ' + json.dumps('{"city": "a\\u0000"}') + "}"
    _model_case(graphs["model"], [text])


def test_known_bug_a_decision_whose_action_is_a_list(graphs: dict[str, _Fixture]) -> None:
    _resume_case(graphs["resume"], "as_is", {"action": []})


def test_known_bug_a_refused_decision_is_applied_after_the_person_approves(
    graphs: dict[str, _Fixture],
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys.modules[__name__], "KNOWN_BUGS", KNOWN_BUGS - {"replayed-resume"})
        _resume_case(
            graphs["resume"], "as_is", {"action": "edit", "args": {"amount": 7.0}, "reason": "\ud800"}
        )


# -- the end --------------------------------------------------------------------------------------


def test_no_thread_is_left_running_and_every_boundary_was_fuzzed(graphs: dict[str, _Fixture]) -> None:
    deadline = time.monotonic() + 5
    while (
        left := [t for t in threading.enumerate() if t not in THREADS_AT_START]
    ) and time.monotonic() < deadline:
        time.sleep(0.05)  # a pool's worker may take a moment to exit after its last task
    assert left == [], f"threads left running: {[t.name for t in left]}"
    if len(CASES) == 4:  # the whole module ran
        assert sum(CASES.values()) >= 2_000, CASES
