"""Lenient but unambiguous JSON recovery from what a model actually writes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from keelgraph.contracts.errors import Problem

__all__ = ["INT64_MAX", "INT64_MIN", "ParseError", "Parsed", "oversized_ints", "parse_json", "storable"]

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_TAGS = re.compile(r"</?(?:tool_call|tool_calls|answer|json)>")


@dataclass(frozen=True)
class Parsed:
    """A JSON value and the recoveries it needed (each one counts as a repair)."""

    value: Any
    recoveries: tuple[str, ...] = ()


class ParseError(ValueError):
    """The text holds no single, complete JSON value; `problem` is the correction prompt."""

    def __init__(self, reason: str, fix: str) -> None:
        self.problem = Problem(field="(root)", reason=reason, fix=fix)
        super().__init__(self.problem.line())


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""Integers outside this range cannot be stored by LangGraph's checkpoint serializer (msgpack), and
many JSON readers lose them: keelgraph refuses them at every boundary instead of crashing."""


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


def _reject_int(text: str) -> int:
    number = int(text)
    if not INT64_MIN <= number <= INT64_MAX:
        raise ParseError(
            f"the integer {text[:30]}{'...' if len(text) > 30 else ''} is beyond the 64-bit range",
            "use a number between -9223372036854775808 and 9223372036854775807",
        )
    return number


def _reject_constant(name: str) -> Any:
    raise ParseError(f"{name} is not valid JSON", "use null or a finite number instead of NaN/Infinity")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant, parse_int=_reject_int)


def _scan(text: str, start: int) -> int | None:
    """Index just past the JSON object/array opening at `start`, or None if it never closes."""
    stack: list[str] = []
    in_str = False
    escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None
            if not stack:
                return i + 1
    return None


def _strip_trailing_commas(text: str) -> str:
    out: list[str] = []
    in_str = False
    escaped = False
    for i, ch in enumerate(text):
        if in_str:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        if ch == ",":
            rest = text[i + 1 :].lstrip()
            if rest[:1] in {"}", "]"}:
                continue
        out.append(ch)
    return "".join(out)


def parse_json(text: str) -> Parsed:
    """Parse one JSON object or array out of model output.

    Recovered (and reported in `recoveries`): code fences, tool-call tags, chatter before or
    after the value, trailing commas. Rejected with a `ParseError` that says how to fix it:
    empty or truncated output, several values, NaN/Infinity, anything else that is not JSON.

    >>> parse_json('Sure! ```json\\n{"a": [1, 2,],}\\n``` Hope it helps').value
    {'a': [1, 2]}
    """
    recoveries: list[str] = []
    body = text.strip()
    if not body:
        raise ParseError("the output is empty", "reply with one JSON object")
    try:
        return Parsed(_loads(body))
    except json.JSONDecodeError:
        pass
    fences = _FENCE.findall(body)
    if len(fences) == 1:
        body = fences[0].strip()
        recoveries.append("removed a code fence")
    elif len(fences) > 1:
        raise ParseError(f"the output has {len(fences)} code blocks", "reply with exactly one JSON object")
    if _TAGS.search(body):
        body = _TAGS.sub("", body).strip()
        recoveries.append("removed tool-call tags")
    starts = [i for i in (body.find("{"), body.find("[")) if i >= 0]
    if not starts:
        raise ParseError("the output contains no JSON object", "reply with one JSON object")
    start = min(starts)
    end = _scan(body, start)
    if end is None:
        raise ParseError(
            "the JSON is truncated or unbalanced: it ends before every bracket is closed",
            "reply with one complete JSON object, shorter if needed",
        )
    rest = body[end:].strip()
    if rest and rest[0] in "{[" and _scan(rest, 0) is not None:
        raise ParseError("the output holds more than one JSON value", "reply with exactly one JSON object")
    if start > 0 or rest:
        recoveries.append("ignored text around the JSON")
    candidate = body[start:end]
    try:
        return Parsed(_loads(candidate), tuple(recoveries))
    except json.JSONDecodeError:
        pass
    cleaned = _strip_trailing_commas(candidate)
    try:
        value = _loads(cleaned)
    except json.JSONDecodeError as exc:
        raise ParseError(
            f"the output is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            "reply with one valid JSON object: double-quoted keys and strings, no comments",
        ) from None
    recoveries.append("removed trailing commas")
    return Parsed(value, tuple(recoveries))
