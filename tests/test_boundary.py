"""The boundary policy: every value that enters is checked for size, depth, sound text and finite
numbers in linear time, and every refusal is a typed `Problem` naming the path and the fix."""

from __future__ import annotations

import doctest
import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keelgraph.contracts import Problem
from keelgraph.contracts.boundary import (
    BIG_INT_MARK,
    CYCLE_MARK,
    DEEP_MARK,
    INT64_MAX,
    INT64_MIN,
    LEFT_OUT_MARK,
    LIMITS,
    Limits,
    check_text,
    check_value,
    safe_value,
)
from keelgraph.contracts.errors import UserError
from keelgraph.contracts.parsing import ParseError, parse_json

ROOT = Path(__file__).resolve().parents[1]
DEEP = "nested more than 64 levels deep"
SURROGATE = "lone surrogate"


def refused(text: str, **kwargs: Any) -> ParseError:
    """The `ParseError` for `text`; any other exception fails the test."""
    with pytest.raises(ParseError) as caught:
        parse_json(text, **kwargs)
    problem = caught.value.problem
    assert isinstance(problem, Problem)
    assert problem.fix
    assert caught.value.problems[0] == problem
    return caught.value


def nested(levels: int) -> list[Any]:
    """A list nested `levels` deep, built without recursion."""
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def dumps(value: Any) -> str:
    """JSON for `value` that any reader accepts: no NaN, no lone surrogates."""
    text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
    return text


def assert_safe(value: Any, limits: Limits = LIMITS) -> tuple[Any, list[Problem]]:
    """`safe_value` of `value` is JSON data that passes `check_value`, and every change is reported."""
    copy, problems = safe_value(value, limits)
    dumps(copy)
    assert check_value(copy, limits) == []
    for problem in problems:
        Problem.model_validate_json(problem.model_dump_json()).line().encode("utf-8")
    return copy, problems


# --- text that is too deep -------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [255, 490, 10_000])
@pytest.mark.parametrize(("opener", "closer"), [("[", "]"), ('{"a": ', "}")])
def test_deep_model_text_is_refused_before_parsing(levels: int, opener: str, closer: str) -> None:
    text = opener * levels + "1" + closer * levels
    [problem] = check_text(text)
    assert problem.field == "(root)"
    assert DEEP in problem.reason
    assert "at most 64 levels" in problem.fix
    assert DEEP in refused(text).problem.reason
    # the same in chatter, in a fence, and behind a trailing comma
    assert DEEP in refused(f"Sure!\n```json\n{text[:-1]},{closer}\n```").problem.reason


def test_a_24_kb_deep_json_text_is_refused() -> None:
    text = '{"a":' * 4000 + "1" + "}" * 4000
    assert len(text) > 24_000
    assert DEEP in refused(text).problem.reason


def test_nesting_at_the_limit_is_accepted() -> None:
    assert parse_json("[" * 64 + "]" * 64).value == nested(64)
    assert DEEP in refused("[" * 65 + "]" * 65).problem.reason
    assert parse_json("[" * 65 + "]" * 65, limits=Limits(max_depth=65)).value == nested(65)


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"a": "[" * 1000, "b": "{" * 1000})
    assert check_text(text) == []
    assert parse_json(text).value == {"a": "[" * 1000, "b": "{" * 1000}


def test_a_deep_python_value_is_reported_without_recursion() -> None:
    value = nested(10_000)
    [problem] = check_value(value)
    assert problem.field == "[0]" * 64
    assert DEEP in problem.reason
    copy, problems = assert_safe(value)
    assert problems == [problem]
    inner = copy
    for _ in range(64):
        inner = inner[0]
    assert inner == DEEP_MARK


# --- text that is not sound -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ('{"k\ud800": 1}', "(root)", "the text holds a lone surrogate (\\ud800) at character 3"),
        ('{"a": "x\udfff"}', "(root)", "the text holds a lone surrogate (\\udfff) at character 8"),
        ('{"k\\ud800": 1}', '["k\\ud800"]', "the key holds a lone surrogate (\\ud800) at character 1"),
        ('{"a": ["x\\udc00y"]}', "a[0]", "the string holds a lone surrogate (\\udc00) at character 1"),
        ('{"a": "\\ude00\\ud83d"}', "a", "the string holds a lone surrogate (\\ude00) at character 0"),
        ('{"a": "x\x00"}', "(root)", "the text holds a NUL character (\\u0000) at character 8"),
        ('{"a": "x\\u0000"}', "a", "the string holds a NUL character (\\u0000) at character 1"),
        ('{"k\\u0000": 1}', '["k\\u0000"]', "the key holds a NUL character (\\u0000) at character 1"),
    ],
)
def test_lone_surrogates_and_nul_are_refused(text: str, field: str, reason: str) -> None:
    error = refused(text)
    assert error.problem.field == field
    assert error.problem.reason.startswith(reason)
    error.problem.model_dump_json().encode("utf-8")  # the problem itself is sound text
    assert (check_text(text) != []) == (field == "(root)")


def test_a_surrogate_pair_is_one_character_and_is_accepted() -> None:
    assert parse_json('{"smile": "\\ud83d\\ude00"}').value == {"smile": "\U0001f600"}
    assert parse_json('{"smile": "\U0001f600"}').value == {"smile": "\U0001f600"}


@pytest.mark.parametrize(
    ("value", "field", "reason", "copy"),
    [
        ({"k\ud800": 1}, '["k\\ud800"]', "the key holds a lone surrogate", {"k\ufffd": 1}),
        ({"a": "x\udc00"}, "a", "the string holds a lone surrogate", {"a": "x\ufffd"}),
        ({"a": "x\x00"}, "a", "the string holds a NUL character", {"a": "x\ufffd"}),
        (["\x00"], "[0]", "the string holds a NUL character", ["\ufffd"]),
    ],
)
def test_unsound_python_text_is_reported_and_replaced(value: Any, field: str, reason: str, copy: Any) -> None:
    [problem] = check_value(value)
    assert problem.field == field
    assert problem.reason.startswith(reason)
    assert assert_safe(value) == (copy, [problem])


# --- numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ('{"price": 1e400}', "price", "the number 1e400 is too large"),
        ('{"a": [-1e400]}', "a[0]", "the number -1e400 is too large"),
        ('{"a": NaN}', "a", "NaN is not valid JSON"),
        ('{"a": Infinity}', "a", "Infinity is not valid JSON"),
        ("[1, -Infinity]", "[1]", "-Infinity is not valid JSON"),
        ('{"n": ' + "9" * 4301 + "}", "n", "the integer 999999999999999999999999999999..."),
        ('{"n": -' + "1" * 20_000 + "}", "n", "the integer -11111111111111111111111111111..."),
        (
            '{"n": 9223372036854775808}',
            "n",
            "the integer 9223372036854775808 is outside the signed 64-bit range",
        ),
    ],
)
def test_numbers_out_of_range_are_refused_with_their_path(text: str, field: str, reason: str) -> None:
    error = refused(text)
    assert error.problem.field == field
    assert error.problem.reason.startswith(reason)


def test_numbers_at_the_edges_are_accepted() -> None:
    text = json.dumps([INT64_MIN, INT64_MAX, 1e308, -1e308, 5e-324, 1e-400])
    assert parse_json(text).value == [INT64_MIN, INT64_MAX, 1e308, -1e308, 5e-324, 0.0]


def test_limits_can_widen_the_integer_range() -> None:
    wide = Limits(min_int=0, max_int=2**64 - 1)
    assert parse_json("[18446744073709551615]", limits=wide).value == [2**64 - 1]
    assert refused("[-1]", limits=wide).problem.reason.startswith(
        "the integer -1 is outside the allowed range (0 to"
    )


@pytest.mark.parametrize(
    ("value", "reason", "copy"),
    [
        (
            10**5000,
            "the integer <about 5,001 digits> is outside the signed 64-bit range",
            BIG_INT_MARK.format(digits=5001),
        ),
        (-(10**5000), "the integer -<about 5,001 digits>", BIG_INT_MARK.format(digits=5001)),
        (2**64, "the integer 18446744073709551616 is outside", "18446744073709551616"),
        (10**30, "the integer 1" + "0" * 30 + " is outside", "1" + "0" * 30),
        (float("nan"), "NaN is not a finite number", "NaN"),
        (float("inf"), "Infinity is not a finite number", "Infinity"),
        (float("-inf"), "-Infinity is not a finite number", "-Infinity"),
    ],
    ids=["10**5000", "-10**5000", "2**64", "10**30", "nan", "inf", "-inf"],
)
def test_python_numbers_out_of_range(value: Any, reason: str, copy: Any) -> None:
    [problem] = check_value({"n": [value]})
    assert problem.field == "n[0]"
    assert problem.reason.startswith(reason)
    assert assert_safe({"n": [value]}) == ({"n": [copy]}, [problem])


# --- values that are not JSON data ------------------------------------------------------------------


class Custom:
    def __repr__(self) -> str:
        raise AssertionError("the boundary must not run a value's own code")


def _generator() -> Iterator[int]:
    yield 1


@pytest.mark.parametrize(
    ("value", "reason", "shown"),
    [
        (
            Custom(),
            "a value of type tests.test_boundary.Custom is not JSON data",
            "<tests.test_boundary.Custom>",
        ),
        (threading.Lock(), "a value of type _thread.lock is not JSON data", "<_thread.lock>"),
        (_generator(), "a value of type generator is not JSON data", "<generator>"),
        (b"\x00\xff", "a value of type bytes is not JSON data", "b'\\x00\\xff'"),
        (bytearray(100), "a value of type bytearray is not JSON data", repr(bytes(40)) + "..."),
        ({1, 2}, "a value of type set is not JSON data", "<set>"),
        (Problem, "a value of type pydantic._internal._model_construction.ModelMetaclass", None),
    ],
)
def test_what_is_not_json_data_is_named(value: Any, reason: str, shown: str | None) -> None:
    [problem] = check_value({"result": value}, where="tool_result")
    assert problem.field == "tool_result.result"
    assert problem.reason.startswith(reason)
    assert "convert it" in problem.fix
    copy, problems = assert_safe({"result": value})
    assert problems[0].reason == problem.reason
    if shown is not None:
        assert copy == {"result": shown}


def test_a_generator_is_not_consumed() -> None:
    gen = _generator()
    check_value([gen])
    safe_value([gen])
    assert next(gen) == 1


def test_circular_references_are_reported_and_shared_ones_are_not() -> None:
    loop: dict[str, Any] = {"name": "x"}
    loop["self"] = loop
    [problem] = check_value(loop)
    assert (problem.field, problem.reason) == ("self", "the object contains itself (a circular reference)")
    assert assert_safe(loop) == ({"name": "x", "self": CYCLE_MARK}, [problem])
    ring: list[Any] = [1]
    ring.append([ring])
    assert [p.field for p in check_value(ring)] == ["[1][0]"]
    shared = [1, 2]
    assert check_value({"a": shared, "b": [shared, (shared,)]}) == []
    assert safe_value({"a": shared, "b": (shared,)}) == ({"a": [1, 2], "b": [[1, 2]]}, [])


def test_keys_that_are_not_text() -> None:
    value = {1: "a", None: "b", (1, 2): "c", False: "d", 2.5: "e"}
    problems = check_value(value)
    assert [p.reason for p in problems] == [
        "the key 1 is of type int, not text",
        "the key null is of type NoneType, not text",
        "the key <tuple> is of type tuple, not text",
        "the key false is of type bool, not text",
        "the key 2.5 is of type float, not text",
    ]
    assert problems[0].field == "[1]"
    copy, _ = assert_safe(value)
    assert copy == {"1": "a", "null": "b", "<tuple>": "c", "false": "d", "2.5": "e"}


def test_paths_name_odd_keys_readably() -> None:
    error = refused('{"a b": {"c.d": [1, {"e": NaN}]}}')
    assert error.problem.field == '["a b"]["c.d"][1].e'
    [problem] = check_value({"x" * 100: [float("nan")]}, where="args")
    assert problem.field == 'args["' + "x" * 40 + '..."][0]'


# --- sizes ------------------------------------------------------------------------------------------


def test_size_limits_each_name_the_limit() -> None:
    limits = Limits(max_chars=50, max_string_chars=10, max_items=3)
    [problem] = check_text("[" + "1," * 30 + "1]", limits)
    assert problem.reason == "the text is 63 characters, over the limit of 50"
    assert problem.fix.startswith("send at most 50 characters")
    problems = check_value({"s": "x" * 11, "l": [1, 2, 3, 4], "o": {"a": 1, "b": 2, "c": 3}}, limits)
    assert [(p.field, p.reason) for p in problems] == [
        ("s", "the string is 11 characters, over the limit of 10"),
        ("l", "the list has 4 items, over the limit of 3"),
    ]
    copy, _ = assert_safe({"s": "x" * 100, "l": [1, 2, 3, 4]}, Limits(max_string_chars=60, max_items=3))
    assert copy["l"] == [1, 2, "<2 more items left out>"]
    assert len(copy["s"]) <= 60
    assert copy["s"].endswith("more characters left out>")


def test_shared_references_cannot_multiply_the_work() -> None:
    bomb: list[Any] = [0]
    for _ in range(60):
        bomb = [bomb, bomb]  # 2**60 values once written out
    started = time.perf_counter()
    [problem] = check_value(bomb)
    assert problem.reason.startswith("the value has more than 1,000,000 parts")
    copy, problems = safe_value(bomb, Limits(max_nodes=1000))
    assert (
        problems[0].reason == "the value has more than 1,000 parts (counting every nested value and repeat)"
    )
    dumps(copy)
    assert LEFT_OUT_MARK in json.dumps(copy)
    text = "x" * 90_000
    [problem] = check_value([text] * 1000)
    assert problem.reason == "the value holds more than 1,000,000 characters of text in all"
    assert time.perf_counter() - started < 5


def test_problems_are_capped_and_the_rest_counted() -> None:
    value = [float("nan")] * 100
    assert len(check_value(value)) == 20
    copy, problems = safe_value(value)
    assert copy == ["NaN"] * 100
    assert len(problems) == 21
    assert problems[-1].reason == "80 more problem(s) of the same kinds were not listed"
    error = refused("[" + ", ".join(['"\\u0000"'] * 30) + "]")
    assert len(error.problems) == 20


def test_misconfigured_limits_fail_at_once() -> None:
    with pytest.raises(UserError, match="max_depth must be at most 200"):
        Limits(max_depth=1000)
    with pytest.raises(UserError, match="max_items must be a whole number of at least 1"):
        Limits(max_items=0)
    with pytest.raises(UserError, match="min_int"):
        Limits(min_int=1)


def test_text_that_is_not_text() -> None:
    [problem] = check_text(b"{}")  # type: ignore[arg-type]
    assert problem.reason == "the value is of type bytes, not text"
    assert refused(None).problem.reason == "the value is of type NoneType, not text"  # type: ignore[arg-type]


# --- linear time ------------------------------------------------------------------------------------

ITEM = '{"id": 1, "name": "a \\"b\\" [c]", "tags": ["x", "y",],},'
BIG = Limits(max_chars=20_000_000, max_items=1_000_000, max_nodes=20_000_000)


def trailing_commas(size: int) -> str:
    return "[" + ITEM * (size // len(ITEM)) + "]"


def parse_seconds(text: str) -> float:
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        parse_json(text, limits=BIG)
        best = min(best, time.perf_counter() - started)
    return best


def test_5_mb_with_trailing_commas_parses_in_linear_time() -> None:
    text = trailing_commas(5_000_000)
    started = time.perf_counter()
    parsed = parse_json(text, limits=BIG)
    assert time.perf_counter() - started < 5
    assert parsed.recoveries == ("removed trailing commas",)
    assert parsed.value[-1] == {"id": 1, "name": 'a "b" [c]', "tags": ["x", "y"]}
    ratio = parse_seconds(trailing_commas(4_000_000)) / parse_seconds(trailing_commas(1_000_000))
    assert ratio < 8, f"4 MB took {ratio:.1f} times as long as 1 MB"


def test_the_default_limits_refuse_5_mb_at_once() -> None:
    text = trailing_commas(5_000_000)
    started = time.perf_counter()
    assert refused(text).problem.reason.endswith("characters, over the limit of 1,000,000")
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    "text",
    [
        "```" + " " * 200_000,  # an unclosed fence followed by spaces
        "```json\n" + "```" * 50_000,
        '"' + "\\" * 300_000,
        "[" * 64 + '"' * 300_000,
        "[" * 300_000,
        "{}" * 300_000,
        "," * 300_000 + "]",
    ],
)
def test_adversarial_text_is_settled_quickly(text: str) -> None:
    started = time.perf_counter()
    try:
        parse_json(text)
    except ParseError as exc:
        assert exc.problem.fix
    assert time.perf_counter() - started < 2


def test_bench_reports_linear_cost() -> None:
    spec = importlib.util.spec_from_file_location("parse_cost", ROOT / "bench" / "parse_cost.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ratios = bench.main(["--quick"])
    assert set(ratios) == {"trailing commas", "deep (64 levels)", "fence + chatter"}
    assert all(ratio < 3 for ratio in ratios.values()), ratios


# --- never anything but a typed answer ----------------------------------------------------------------

ODD = ["\ud800", "\udfff", "\x00", "\U0001f600", '"', "\\", "[", "{"]
odd_text = st.text(alphabet=st.characters() | st.sampled_from(ODD), max_size=30)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([INT64_MAX + 1, INT64_MIN - 1, -(10**400)])
    | st.sampled_from([1, -1]).map(lambda sign: sign * 10**5000)
    | st.floats()
    | odd_text
    | st.binary(max_size=8)
    | st.builds(threading.Lock)
    | st.builds(_generator)
    | st.builds(Custom)
)
values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=5)
        | st.lists(kids, max_size=3).map(tuple)
        | st.dictionaries(odd_text | st.integers() | st.none(), kids, max_size=4)
    ),
    max_leaves=30,
)
JSON_BITS = ['{"a": ', "[", "]", "}", ",", "1e400", "NaN", '"\\ud800"', '"x"', "```json\n", "```", "-"]
JSON_BITS += ["9" * 25, "\\u0000"]


def loose_json(value: Any) -> str:
    """What a lax writer makes of `value` (NaN, escaped surrogates, objects as their type name)."""
    try:
        return json.dumps(value, default=lambda o: f"<{type(o).__name__}>", skipkeys=True)
    except ValueError:  # an integer past Python's 4,300 digits
        return "[]"


json_ish = st.lists(st.sampled_from(JSON_BITS) | odd_text, max_size=40).map("".join)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(values)
def test_any_value_is_checked_and_made_safe_without_raising(value: Any) -> None:
    problems = check_value(value)
    _, changes = assert_safe(value)
    assert changes[: len(problems)] == problems
    assert (problems == []) == (changes == [])


@settings(derandomize=True, max_examples=300, deadline=None)
@given(json_ish | odd_text | values.map(loose_json), st.integers(0, 200))
def test_any_text_parses_or_is_refused_typed(text: str, levels: int) -> None:
    for candidate in (text, "[" * levels + text + "]" * levels, f"Sure! ```json\n{text}\n``` ok"):
        assert isinstance(check_text(candidate), list)
        try:
            parsed = parse_json(candidate)
        except ParseError as exc:
            exc.problem.model_dump_json().encode("utf-8")
        else:
            assert check_value(parsed.value) == []
            dumps(parsed.value)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.text(alphabet='[]{}"\\ a,', max_size=60), st.integers(1, 4))
def test_depth_count_skips_strings_like_json_does(text: str, limit: int) -> None:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:  # the obvious character loop, as reference
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}" and depth:
            depth -= 1
    too_deep = [p for p in check_text(text, Limits(max_depth=limit)) if "levels deep" in p.reason]
    assert bool(too_deep) == (deepest > limit)


def test_doctests() -> None:
    from keelgraph.contracts import boundary, parsing

    for module in (boundary, parsing):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
