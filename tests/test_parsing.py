"""Recovering JSON from what models write, and refusing what cannot be recovered unambiguously."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keelgraph.contracts import ParseError, parse_json
from keelgraph.contracts.decision import (
    JSON_UNSAFE,
    AnswerChoice,
    DecisionError,
    ToolChoice,
    decision_schema,
    grammar_pattern,
    grammar_safe,
    read_decision,
)

U = JSON_UNSAFE


@pytest.mark.parametrize(
    ("text", "value", "recoveries"),
    [
        ('{"a": 1}', {"a": 1}, ()),
        ('```json\n{"a": 1}\n```', {"a": 1}, ("removed a code fence",)),
        ('Sure! {"a": 1} Hope this helps.', {"a": 1}, ("ignored text around the JSON",)),
        ('{"a": [1, 2,],}', {"a": [1, 2]}, ("removed trailing commas",)),
        (
            '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
            {"name": "f", "arguments": {}},
            ("removed tool-call tags",),
        ),
        ('{"a": "}, {"}', {"a": "}, {"}, ()),
    ],
)
def test_recoverable_output(text: str, value: object, recoveries: tuple[str, ...]) -> None:
    parsed = parse_json(text)
    assert parsed.value == value
    assert parsed.recoveries == recoveries


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("I cannot help with that.", "no JSON object"),
        ('{"a": NaN}', "NaN is not valid JSON"),
        ('{"a": Infinity}', "Infinity is not valid JSON"),
        ('{"reply": "the answer is', "truncated"),
        ('{"a": 1} {"b": 2}', "more than one JSON value"),
        ("```json\n{}\n``` and ```json\n{}\n```", "2 code blocks"),
        ("{'a': 1}", "not valid JSON"),
    ],
)
def test_unrecoverable_output_says_why(text: str, reason: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_json(text)
    assert reason in caught.value.problem.reason
    assert caught.value.problem.fix


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parser_never_crashes_on_arbitrary_text(text: str) -> None:
    with contextlib.suppress(ParseError):
        parse_json(text)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
        max_leaves=20,
    )
)
def test_reading_any_json_value_ends_typed(value: object) -> None:
    try:
        decision = read_decision(value, {"lookup"})
    except DecisionError as exc:
        assert exc.problem.fix
    else:
        assert isinstance(decision, ToolChoice | AnswerChoice)


def test_decision_shapes() -> None:
    tools = {"lookup"}
    assert read_decision({"action": "lookup", "args": {"q": 1}}, tools) == ToolChoice("lookup", {"q": 1})
    assert read_decision({"name": "lookup", "arguments": '{"q": 1}'}, tools).args == {"q": 1}  # type: ignore[union-attr]
    assert read_decision({"action": "final_answer", "answer": {"x": 1}}, tools) == AnswerChoice({"x": 1})
    assert isinstance(read_decision({"text": "bare answer"}, tools), AnswerChoice)
    with pytest.raises(DecisionError) as caught:
        read_decision({"action": "delete_everything", "args": {}}, tools)
    assert caught.value.kind == "unknown_tool"
    assert "use one of: lookup, final_answer" in caught.value.problem.fix


def test_decision_schema_and_grammar_safety() -> None:
    answer = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 1200}}}
    schema = decision_schema(answer, {"lookup": {"type": "object", "properties": {}}})
    assert [o["properties"]["action"]["const"] for o in schema["anyOf"]] == [
        "lookup",
        "final_answer",
    ]
    assert "maxLength" not in str(schema)
    assert decision_schema(answer, {})["properties"]["action"]["const"] == "final_answer"
    assert grammar_safe({"a": [{"pattern": "x", "type": "string"}]}) == {"a": [{"type": "string"}]}


@pytest.mark.parametrize(
    ("pattern", "rewritten"),
    [
        (r"^\d{5}$", "^[0-9]{5}$"),
        (r"^[^@\s]+@[^@\s]+\.[a-z]+$", f"^[^@ \\t\\n{U}]+@[^@ \\t\\n{U}]+[.][a-z]+$"),
        (r"^[^0-9]+$", f"^[^0-9{U}]+$"),
        (r"^a.b[.]$", f"^a[^{U}]b[.]$"),  # "." outside a class: anything but what ends a JSON string
        (r"^[]x]$", None),  # a class opening with "]"
        (r"^SKU-\d{3}$", "^SKU-[0-9]{3}$"),
        (r"^[A-Z][a-z]*$", "^[A-Z][a-z]*$"),
        (r"\d+", None),  # unanchored means "contains": not a grammar
        (r"^(?=.*x)x+$", None),  # lookahead
        (r"^\bword$", None),  # word boundary
        (r"^(a)\1$", None),  # back-reference
        (r"^x{1,200}$", None),  # a count that becomes 200 rules
    ],
)
def test_patterns_are_rewritten_for_the_grammar_or_left_out(pattern: str, rewritten: str | None) -> None:
    assert grammar_pattern(pattern) == rewritten


@pytest.mark.parametrize(
    ("pattern", "good"),
    [
        (r"^[^0-9]+$", "Leeds"),
        (r"^[^@\s]+@[^@\s]+\.[a-z]+$", "a.b1@x.io"),
        (r"^.+$", "any thing"),
        (r"^[^,]*\d[^,]*$", "7 Park Lane"),
    ],
)
def test_a_grammar_pattern_never_lets_a_string_run_past_its_closing_quote(pattern: str, good: str) -> None:
    """The grammar writes a string's JSON text: a class that matched `"` let `[^0-9]+` swallow the
    rest of the answer on the embedded model (the output came back as invalid JSON)."""
    import re

    rewritten = grammar_pattern(pattern)
    assert rewritten is not None
    rx = re.compile(rewritten)
    for bad in ('Leeds", "country": "UK', "a\\b1@x.io", "line\nbreak1@x.io"):
        assert rx.fullmatch(bad) is None, bad
    assert rx.fullmatch(good)


def test_grammar_safe_keeps_small_counts_and_field_names() -> None:
    schema = {
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "pattern": r"^\d{2}$", "maxLength": 2},
            "default": {"type": "array", "minItems": 1, "maxItems": 500, "default": []},
        },
    }
    assert grammar_safe(schema) == {
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "pattern": "^[0-9]{2}$", "maxLength": 2},
            "default": {"type": "array", "minItems": 1},
        },
    }


@pytest.mark.parametrize(
    ("text", "value", "recoveries"),
    [
        ('{"a": "x,]", "b": [1,],}', {"a": "x,]", "b": [1]}, ("removed trailing commas",)),
        ('{"a": "q\\",]"  ,\n }', {"a": 'q",]'}, ("removed trailing commas",)),
        ("```JSON\n[1,\n 2,\n]\n```", [1, 2], ("removed a code fence", "removed trailing commas")),
        ('```\n{"a": 1}\n```', {"a": 1}, ("removed a code fence",)),
        (
            'Here: [1, [2, {"b": [],},],] thanks',
            [1, [2, {"b": []}]],
            ("ignored text around the JSON", "removed trailing commas"),
        ),
        ('{"smile": "\\ud83d\\ude00"}', {"smile": "\U0001f600"}, ()),
    ],
)
def test_recovery_is_string_aware(text: str, value: object, recoveries: tuple[str, ...]) -> None:
    parsed = parse_json(text)
    assert parsed.value == value
    assert parsed.recoveries == recoveries


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ('{"a": {"b": [1, 1e400]}}', "a.b[1]", "the number 1e400 is too large"),
        ('{"a": -Infinity}', "a", "-Infinity is not valid JSON"),
        ("[" * 100 + "]" * 100, "(root)", "nested more than 64 levels deep"),
        ('{"a": "\\ud800"}', "a", "the string holds a lone surrogate"),
        ('{"n": ' + "1" * 5000 + "}", "n", "the integer 111"),
    ],
)
def test_refusals_name_the_path(text: str, field: str, reason: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_json(text)
    assert caught.value.problem.field == field
    assert reason in caught.value.problem.reason
    assert caught.value.problems[0] is caught.value.problem
