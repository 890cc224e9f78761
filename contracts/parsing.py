"""Lenient but unambiguous JSON recovery from what a model actually writes."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from keelgraph.contracts.boundary import (
    _TO_BRACKET,
    INT64_MAX,
    INT64_MIN,
    INT_RANGE_FIX,
    LIMITS,
    NOT_FINITE_FIX,
    ROOT,
    TOO_DEEP,
    TOO_DEEP_FIX,
    Limits,
    _Refused,
    check_text,
    check_value,
    int_range_reason,
)
from keelgraph.contracts.errors import Problem

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "ParseError",
    "Parsed",
    "loads_strict",
    "oversized_ints",
    "parse_json",
    "storable",
]

# What `Parsed.recoveries` says, and every sentence a model is shown when its output is refused.
FENCE_REMOVED = "removed a code fence"
TAGS_REMOVED = "removed tool-call tags"
CHATTER_IGNORED = "ignored text around the JSON"
COMMAS_REMOVED = "removed trailing commas"
EMPTY = "the output is empty"
NO_JSON = "the output contains no JSON object"
REPLY_ONE = "reply with one JSON object"
REPLY_EXACTLY_ONE = "reply with exactly one JSON object"
SEVERAL_BLOCKS = "the output has {count} code blocks"
SEVERAL_VALUES = "the output holds more than one JSON value"
TRUNCATED = "the JSON is truncated or unbalanced: it ends before every bracket is closed"
TRUNCATED_FIX = "reply with one complete JSON object, shorter if needed"
NOT_JSON_TEXT = "the output is not valid JSON ({msg} at line {line} column {column})"
NOT_JSON_TEXT_FIX = "reply with one valid JSON object: double-quoted keys and strings, no comments"
CONSTANT = "{name} is not valid JSON"
NUMBER_TOO_LARGE = "the number {shown} is too large: it overflows to infinity"

_FENCE = "```"
_FENCE_LANGUAGES = ("json", "JSON")
_TAGS = re.compile(r"</?(?:tool_call|tool_calls|answer|json)>")
_SHOWN = 30
_INT_DIGITS = 4300  # Python's default limit for str -> int (sys.get_int_max_str_digits)


@dataclass(frozen=True)
class Parsed:
    """A JSON value and the recoveries it needed (each one counts as a repair)."""

    value: Any
    recoveries: tuple[str, ...] = ()


class ParseError(ValueError):
    """The text holds no single, complete, acceptable JSON value; `problem` is the correction
    prompt, `problems` every problem found (the first is `problem`)."""

    def __init__(self, reason: str, fix: str, *, field: str = ROOT, more: Sequence[Problem] = ()) -> None:
        self.problem = Problem(field=field, reason=reason, fix=fix)
        self.problems = [self.problem, *more]
        super().__init__(self.problem.line())

    @classmethod
    def from_problems(cls, problems: Sequence[Problem]) -> ParseError:
        """The error for `problems` (at least one), as `check_text` and `check_value` report them."""
        first = problems[0]
        return cls(first.reason, first.fix, field=first.field, more=problems[1:])


def oversized_ints(value: Any, path: str = "") -> list[str]:
    """Paths (`a.b[2]`) of integers in `value` outside the 64-bit range.

    >>> oversized_ints({"a": [1, 2**70], "b": -(2**64)})
    ['a[1]', 'b']
    """
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [path or "(root)"] if not INT64_MIN <= value <= INT64_MAX else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in oversized_ints(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in oversized_ints(v, f"{path}[{i}]")]
    return []


def storable(value: Any) -> Any:
    """`value` with out-of-range integers written as decimal strings (for data from tools)."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        return str(value)
    if isinstance(value, dict):
        return {k: storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    return value


def _read_int(text: str, *, limits: Limits) -> int | _Refused:
    low, high = limits.min_int, limits.max_int
    # A number with more digits than the limits is out of range: refuse it before int() does the
    # work (quadratic in the digits, and refused by Python past 4,300 of them).
    digits = min(math.ceil(max(-low, high).bit_length() * math.log10(2)) + 1, _INT_DIGITS)
    if len(text.lstrip("-")) <= digits:
        number = int(text)
        if low <= number <= high:
            return number
    shown = text[:_SHOWN] + (f"... ({len(text):,} characters)" if len(text) > _SHOWN else "")
    return _Refused(int_range_reason(shown, low, high), INT_RANGE_FIX.format(low=low, high=high), shown)


def _read_float(text: str) -> float | _Refused:
    number = float(text)
    if math.isfinite(number):
        return number
    shown = text[:_SHOWN] + ("..." if len(text) > _SHOWN else "")
    return _Refused(NUMBER_TOO_LARGE.format(shown=shown), NOT_FINITE_FIX, shown)


def _read_constant(name: str) -> _Refused:
    return _Refused(CONSTANT.format(name=name), NOT_FINITE_FIX, name)


def _loads(text: str, limits: Limits) -> Any:
    """The value of `text`, checked; raises `json.JSONDecodeError` when `text` is not JSON."""
    try:
        value = json.loads(
            text,
            parse_constant=_read_constant,
            parse_int=partial(_read_int, limits=limits),
            parse_float=_read_float,
        )
    except RecursionError:  # the depth was checked first: only a caller already deep in its stack
        raise _too_deep(limits.max_depth) from None
    problems = check_value(value, limits)
    if problems:
        raise ParseError.from_problems(problems)
    return value


def loads_strict(text: str, *, limits: Limits = LIMITS) -> Any:
    """The JSON value of `text`, exactly as written (no recovery of fences, chatter or trailing
    commas): for requests, where a caller must send what the contract says. Checked by the same
    boundary policy as model text, before and after parsing; raises `ParseError` (with every
    problem) or `json.JSONDecodeError` when `text` is not JSON.

    >>> loads_strict('{"a": [1, 2]}')
    {'a': [1, 2]}
    """
    problems = check_text(text, limits)
    if problems:
        raise ParseError.from_problems(problems)
    return _loads(text, limits)


def _too_deep(limit: int) -> ParseError:
    return ParseError(TOO_DEEP.format(limit=limit), TOO_DEEP_FIX.format(limit=limit))


def _scan(text: str, start: int, max_depth: int | None = None) -> tuple[int, list[int]] | None:
    """The index just past the JSON object or array opening at `start` and the indexes of its
    trailing commas (outside strings), or None if it never closes. One pass, no recursion.

    Raises `ParseError` when the value is nested more than `max_depth` levels, counted from `start`
    exactly as the JSON reader will count them.
    """
    closers: list[str] = []
    commas: list[int] = []
    for match in _TO_BRACKET.finditer(text, start):
        at = match.start(1)
        if at < 0:
            break
        ch = text[at]
        if ch in "[{":
            closers.append("}" if ch == "{" else "]")
            if max_depth is not None and len(closers) > max_depth:
                raise _too_deep(max_depth)
            continue
        if not closers or closers.pop() != ch:
            return None
        # What precedes the closer since the last bracket: strings end in a quote, so a comma
        # at its end (spaces aside) is outside any string.
        before = text[match.start() : at].rstrip()
        if before.endswith(","):
            commas.append(match.start() + len(before) - 1)
        if not closers:
            return at + 1, commas
    return None


def _without(text: str, start: int, end: int, drop: list[int]) -> str:
    """`text[start:end]` without the characters at the indexes `drop` (ascending)."""
    pieces: list[str] = []
    for at in drop:
        pieces.append(text[start:at])
        start = at + 1
    pieces.append(text[start:end])
    return "".join(pieces)


def _fenced(text: str) -> list[str]:
    """The contents of the ```-fenced blocks of `text`, without a `json` language tag."""
    blocks: list[str] = []
    at = text.find(_FENCE)
    while at >= 0:
        end = text.find(_FENCE, at + len(_FENCE))
        if end < 0:
            break
        block = text[at + len(_FENCE) : end]
        for language in _FENCE_LANGUAGES:
            if block.startswith(language):
                block = block[len(language) :]
                break
        blocks.append(block)
        at = text.find(_FENCE, end + len(_FENCE))
    return blocks


def _try(text: str, limits: Limits) -> tuple[bool, Any]:
    try:
        return True, _loads(text, limits)
    except json.JSONDecodeError:
        return False, None


def parse_json(text: str, *, limits: Limits = LIMITS) -> Parsed:
    """Parse one JSON object or array out of model output, in time linear in its length.

    Recovered (and reported in `recoveries`): code fences, tool-call tags, chatter before or
    after the value, trailing commas. Rejected with a `ParseError` that says how to fix it:
    empty or truncated output, several values, NaN/Infinity and numbers that overflow, and
    whatever `check_text` or `check_value` refuses under `limits` (too long, too deep, lone
    surrogates, NUL characters, integers beyond 64 bits), anything else that is not JSON.

    >>> parse_json('Sure! ```json\\n{"a": [1, 2,],}\\n``` Hope it helps').value
    {'a': [1, 2]}
    >>> parse_json('{"price": 1e400}')
    Traceback (most recent call last):
    ...
    keelgraph.contracts.parsing.ParseError: price: the number 1e400 is too large: it overflows to infinity -> use null or a finite number instead of NaN/Infinity
    """
    problems = check_text(text, limits)
    if problems:
        raise ParseError.from_problems(problems)
    recoveries: list[str] = []
    body = text.strip()
    if not body:
        raise ParseError(EMPTY, REPLY_ONE)
    done, value = _try(body, limits)
    if done:
        return Parsed(value)
    fences = _fenced(body)
    if len(fences) == 1:
        body = fences[0].strip()
        recoveries.append(FENCE_REMOVED)
    elif len(fences) > 1:
        raise ParseError(SEVERAL_BLOCKS.format(count=len(fences)), REPLY_EXACTLY_ONE)
    if _TAGS.search(body):
        body = _TAGS.sub("", body).strip()
        recoveries.append(TAGS_REMOVED)
    starts = [i for i in (body.find("{"), body.find("[")) if i >= 0]
    if not starts:
        raise ParseError(NO_JSON, REPLY_ONE)
    start = min(starts)
    scanned = _scan(body, start, limits.max_depth)
    if scanned is None:
        raise ParseError(TRUNCATED, TRUNCATED_FIX)
    end, commas = scanned
    rest = body[end:].strip()
    if rest and rest[0] in "{[" and _scan(rest, 0) is not None:
        raise ParseError(SEVERAL_VALUES, REPLY_EXACTLY_ONE)
    if start > 0 or rest:
        recoveries.append(CHATTER_IGNORED)
    try:
        try:
            return Parsed(_loads(body[start:end], limits), tuple(recoveries))
        except json.JSONDecodeError:
            if not commas:
                raise
        value = _loads(_without(body, start, end, commas), limits)
    except json.JSONDecodeError as exc:
        raise ParseError(
            NOT_JSON_TEXT.format(msg=exc.msg, line=exc.lineno, column=exc.colno), NOT_JSON_TEXT_FIX
        ) from None
    recoveries.append(COMMAS_REMOVED)
    return Parsed(value, tuple(recoveries))
