"""The one decision a model makes per step: call a tool, or give the final answer."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from keelgraph.contracts.errors import Problem
from keelgraph.contracts.parsing import ParseError, loads_strict

__all__ = [
    "ANSWER",
    "STRATEGIES",
    "AnswerChoice",
    "DecisionError",
    "Strategy",
    "ToolChoice",
    "decision_schema",
    "grammar_pattern",
    "grammar_safe",
    "inline_refs",
    "read_decision",
]

ANSWER = "final_answer"
"""The action name of the final answer, next to the tools' names."""

Strategy = Literal["json_object", "json_schema", "prompted", "tool_calling"]
"""How a model is asked for its decision: a JSON object constrained by a schema (a grammar on
llama.cpp-style servers), OpenAI's `json_schema` response format, prompted JSON, or native tool
calls with the answer as one more tool."""
STRATEGIES: tuple[Strategy, ...] = ("json_object", "json_schema", "prompted", "tool_calling")

_ARG_KEYS = ("args", "arguments", "parameters", "input")
_NAME_KEYS = ("action", "name", "tool", "function")


@dataclass(frozen=True)
class ToolChoice:
    name: str
    args: dict[str, Any]
    recoveries: tuple[str, ...] = ()


@dataclass(frozen=True)
class AnswerChoice:
    answer: Any
    recoveries: tuple[str, ...] = field(default_factory=tuple)


class DecisionError(ValueError):
    def __init__(self, problem: Problem, kind: str = "parse") -> None:
        self.problem = problem
        self.kind = kind
        super().__init__(problem.line())


_VALUES = frozenset({"const", "enum", "default", "examples"})
"""Keywords whose contents are JSON values (a pinned answer, say), never to be read as schemas."""


def inline_refs(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve local `$ref`s and drop titles: grammar compilers and small models both prefer it."""
    defs = dict(schema.get("$defs", {}))

    def walk(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.removeprefix("#/$defs/")
                if name in seen:
                    return {"type": "object"}
                target = walk(copy.deepcopy(defs[name]), (*seen, name))
                extra = {k: walk(v, seen) for k, v in node.items() if k != "$ref"}
                return {**target, **extra}
            return {
                k: {name: walk(sub, seen) for name, sub in v.items()}
                if k == "properties" and isinstance(v, dict)  # field names, not keywords: keep "title"
                else v
                if k in _VALUES  # values, not schemas
                else walk(v, seen)
                for k, v in node.items()
                if k not in {"$defs", "title"}
            }
        if isinstance(node, list):
            return [walk(v, seen) for v in node]
        return node

    result: dict[str, Any] = walk(dict(schema), ())
    return result


_GRAMMAR_UNSAFE = frozenset({"format", "uniqueItems", "default", "examples"})
_SMALL = {"minLength": 16, "minItems": 10, "maxItems": 10, "maxLength": 200}
"""Counted keywords kept in the grammar only up to these sizes (each count becomes rules)."""

_CLASS = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n"}
JSON_UNSAFE = r'"\\\x00-\x1f'
"""The characters a negated class or `.` must leave out in a grammar (a quote, a backslash, control
characters), as the body of a character class. The grammar writes the JSON text of a string, so
a class that lets `"` through lets the string run on past its end: `[^0-9]+` swallowed the rest of
the answer and grammar-constrained output came back as invalid JSON."""
_COUNT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def grammar_pattern(pattern: str) -> str | None:
    """`pattern` rewritten for llama.cpp's schema-to-grammar converter, or None to leave it out.

    The converter copies `\\d` and `\\.` into grammar literals it cannot parse (the server then
    fails or dies), and only takes patterns anchored at both ends. Shorthand classes become
    explicit ones, escaped punctuation a one-character class; negated classes and `.` leave out
    `JSON_UNSAFE` (the converter lets them match the string's closing quote); lookarounds,
    back-references, word boundaries and counts over 32 are left to validation after parsing.

    >>> grammar_pattern(r"^\\d{5}$")
    '^[0-9]{5}$'
    >>> grammar_pattern(r"^SKU-\\d{3}\\.x$")
    '^SKU-[0-9]{3}[.]x$'
    >>> print(grammar_pattern(r"^[^0-9]+$"), grammar_pattern(r"^a.b$"))
    ^[^0-9"\\\\\\x00-\\x1f]+$ ^a[^"\\\\\\x00-\\x1f]b$
    >>> grammar_pattern(grammar_pattern(r"^[^0-9]+$")) == grammar_pattern(r"^[^0-9]+$")
    True
    >>> grammar_pattern(r"\\d+") is None  # unanchored: "contains", not expressible as a grammar
    True
    """
    if not (pattern.startswith("^") and pattern.endswith("$")) or pattern.endswith("\\$") or "(?" in pattern:
        return None
    if any(int(n) > 32 for m in _COUNT.finditer(pattern) for n in m.groups() if n):
        return None
    if JSON_UNSAFE in pattern:  # rewritten already
        return pattern
    out, in_class, negated, i = [], False, False, 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            if i + 1 >= len(pattern):
                return None
            nxt = pattern[i + 1]
            if nxt in _CLASS:
                out.append(_CLASS[nxt] if in_class else f"[{_CLASS[nxt]}]")
            elif not nxt.isalnum() and nxt not in "]\\^-":
                out.append(nxt if in_class else f"[{nxt}]")
            else:
                return None  # \\b, \\D, \\1, \\p{..}, escaped ] ^ - \\: not worth the risk
            i += 2
            continue
        if ch == "[" and not in_class:
            in_class, negated = True, pattern.startswith("[^", i)
            if pattern.startswith(("[]", "[^]"), i):
                return None  # a class opening with "]": not worth the risk
        elif ch == "]" and in_class:
            in_class = False
            if negated:
                out.append(JSON_UNSAFE)
        elif ch == "." and not in_class:
            ch = f"[^{JSON_UNSAFE}]"
        out.append(ch)
        i += 1
    return None if in_class else "".join(out)


def grammar_safe(schema: Any) -> Any:
    """The schema as a grammar compiler can take it; the contract still enforces the original.

    Drops keywords that blow up grammar compilers (a `maxLength` of 1,200 becomes 1,200 nested
    rules and crashed llama.cpp's server), keeps small counts (a summary's `maxLength` of 120 is
    kept: a too-long string then cannot be written at all), and rewrites patterns with
    `grammar_pattern` (dropped when they cannot be expressed safely).

    >>> grammar_safe({"type": "string", "pattern": r"^\\d{5}$", "maxLength": 500})
    {'type': 'string', 'pattern': '^[0-9]{5}$'}
    """
    if isinstance(schema, list):
        return [grammar_safe(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in {"properties", "$defs"} and isinstance(value, dict):
            out[key] = {name: grammar_safe(sub) for name, sub in value.items()}  # names, not keywords
            continue
        if key in _GRAMMAR_UNSAFE:
            continue
        if key in _VALUES:
            out[key] = value
            continue
        if key in _SMALL and isinstance(value, int):
            if value <= _SMALL[key]:
                out[key] = value
            continue
        if key == "pattern" and isinstance(value, str):
            if (rewritten := grammar_pattern(value)) is not None:
                out[key] = rewritten
            continue
        out[key] = grammar_safe(value)
    return out


def decision_schema(
    answer: Mapping[str, Any], tools: Mapping[str, Mapping[str, Any]], *, final: bool = True
) -> dict[str, Any]:
    """JSON schema of one step: `{"action": <tool>, "args": {...}}` or the final answer.

    With no tools allowed it is the answer alone, so a grammar-constrained model cannot call one.
    With `final=False` (and tools allowed) it is a tool call alone: the model must call one first.
    """
    options: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {"action": {"const": name}, "args": grammar_safe(inline_refs(args))},
            "required": ["action", "args"],
        }
        for name, args in tools.items()
    ]
    if options and not final:
        return options[0] if len(options) == 1 else {"anyOf": options}
    options.append(
        {
            "type": "object",
            "properties": {
                "action": {"const": ANSWER},
                "answer": grammar_safe(inline_refs(answer)),
            },
            "required": ["action", "answer"],
        }
    )
    return options[0] if len(options) == 1 else {"anyOf": options}


def read_decision(
    value: Any, tool_names: Mapping[str, Any] | frozenset[str] | set[str]
) -> ToolChoice | AnswerChoice:
    """Read a parsed JSON value as a decision, accepting the shapes models actually write.

    Accepted: our envelope, OpenAI-style `{"name", "arguments"}` written as text, and a bare answer
    object. An unknown tool name is a `DecisionError` naming the tools that exist.
    """
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict):
        raise DecisionError(
            Problem(
                field="(root)",
                reason=f"expected a JSON object, got {type(value).__name__}",
                fix='reply with {"action": ..., ...}',
            )
        )
    name_key = next((k for k in _NAME_KEYS if isinstance(value.get(k), str)), None)
    if name_key is None:
        return AnswerChoice(value, ("answer written without the envelope",))
    name = value[name_key]
    if isinstance(name, str) and name == ANSWER:
        if "answer" in value:
            return AnswerChoice(value["answer"])
        rest = {k: v for k, v in value.items() if k != name_key}
        return AnswerChoice(rest, ("answer fields written beside the action",))
    arg_key = next((k for k in _ARG_KEYS if k in value), None)
    if name not in tool_names:
        if arg_key is None and "answer" not in value:
            # An output model may itself have a field called "name" or "action".
            return AnswerChoice(value, ("answer written without the envelope",))
        allowed = ", ".join([*sorted(tool_names), ANSWER])
        raise DecisionError(
            Problem(
                field="action",
                reason=f"there is no tool named {name!r}",
                fix=f"use one of: {allowed}",
            ),
            kind="unknown_tool",
        )
    args = value.get(arg_key) if arg_key else {}
    recoveries: tuple[str, ...] = ()
    if name_key != "action" or arg_key != "args":
        recoveries = ("tool call written in another format",)
    if isinstance(args, str):
        try:
            args = loads_strict(args)
            recoveries = (*recoveries, "arguments were a JSON string")
        except json.JSONDecodeError:
            pass
        except ParseError as exc:  # deep, huge, NaN, a lone surrogate or NUL inside the string
            raise DecisionError(exc.problem, kind="tool_args") from None
    if not isinstance(args, dict):
        raise DecisionError(
            Problem(
                field="args",
                reason=f"arguments of {name!r} must be a JSON object",
                fix="send the arguments as an object of named fields",
            ),
            kind="tool_args",
        )
    return ToolChoice(name, args, recoveries)
