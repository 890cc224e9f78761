"""One boundary policy for every value that enters: size, depth, sound text and finite numbers."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

from keelgraph.contracts.errors import Problem, UserError

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "LIMITS",
    "REFUSED_REQUEST",
    "REQUEST_KEEP_CHARS",
    "UNSTORABLE",
    "Limits",
    "check_text",
    "check_value",
    "refused_record",
    "safe_value",
    "stored_request",
]

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
"""Integers outside this range cannot be stored by LangGraph's checkpoint serializer (msgpack), and
many JSON readers lose them: keelgraph refuses them at every boundary instead of crashing."""

ROOT: Final = "(root)"
"""The path of a whole value."""

# Every sentence a caller or the model is shown, in one place (reason, then fix).
NOT_TEXT = "the value is of type {kind}, not text"
NOT_TEXT_FIX = "send the JSON as text"
TEXT_TOO_LONG = "the text is {size:,} characters, over the limit of {limit:,}"
TEXT_TOO_LONG_FIX = "send at most {limit:,} characters: shorten it, or split it into several values"
TOO_DEEP = "the value is nested more than {limit} levels deep"
TOO_DEEP_AT = "the value is nested more than {limit} levels deep (at character {at:,})"
TOO_DEEP_FIX = "flatten it to at most {limit} levels of objects and lists"
LONE_SURROGATE = "the {what} holds a lone surrogate ({code}) at character {at:,}, which is not valid Unicode"
LONE_SURROGATE_FIX = "send valid UTF-8 text: remove the surrogate or complete its pair"
NUL_CHAR = "the {what} holds a NUL character (\\u0000) at character {at:,}"
NUL_CHAR_FIX = "remove the NUL characters"
STRING_TOO_LONG = "the {what} is {size:,} characters, over the limit of {limit:,}"
STRING_TOO_LONG_FIX = "shorten it to at most {limit:,} characters"
INT_RANGE = "the integer {shown} is outside the {what} ({low} to {high})"
INT64_RANGE = "signed 64-bit range"
OTHER_RANGE = "allowed range"
INT_RANGE_FIX = "use a whole number between {low} and {high}, or send a large number as a string"
NOT_FINITE = "{shown} is not a finite number"
NOT_FINITE_FIX = "use null or a finite number instead of NaN/Infinity"
NOT_JSON = "a value of type {kind} is not JSON data"
NOT_JSON_FIX = "convert it to text, a number, true/false, null, a list or an object first"
KEY_NOT_TEXT = "the key {shown} is of type {kind}, not text"
KEY_NOT_TEXT_FIX = "use text keys only"
CIRCULAR = "the {kind} contains itself (a circular reference)"
CIRCULAR_FIX = "break the cycle: send a copy, or an id that refers to the object"
TOO_MANY_ITEMS = "the {kind} has {count:,} items, over the limit of {limit:,}"
TOO_MANY_ITEMS_FIX = "send at most {limit:,} items: page through the rest or summarise it"
TOO_MANY_PARTS = "the value has more than {limit:,} parts (counting every nested value and repeat)"
TOO_MUCH_TEXT = "the value holds more than {limit:,} characters of text in all"
TOO_BIG_FIX = "send a smaller value: page through it or summarise it"
UNLISTED = "{count:,} more problem(s) of the same kinds were not listed"
UNLISTED_FIX = "fix the problems above, then check the value again"

# What `safe_value` writes in place of what it cannot keep.
DEEP_MARK = "<nested too deep: left out>"
CYCLE_MARK = "<circular reference: left out>"
LEFT_OUT_MARK = "<over the size limit: left out>"
MORE_ITEMS_MARK = "<{count:,} more items left out>"
MORE_ITEMS_KEY = "..."
CUT_MARK = "...<{count:,} more characters left out>"
BIG_INT_MARK = "<integer of about {digits:,} digits>"
REPLACEMENT_CHAR = "\ufffd"


def int_range_reason(shown: str, low: int, high: int) -> str:
    """Why an integer was refused: outside the signed 64-bit range, or the limits' own range."""
    what = INT64_RANGE if (low, high) == (INT64_MIN, INT64_MAX) else OTHER_RANGE
    return INT_RANGE.format(shown=shown, what=what, low=low, high=high)


_DEPTH_CEILING = 200  # json.loads and Pydantic recurse per level: keep well inside Python's stack
_DECIMAL_DIGITS = 4300  # Python's default limit for int -> str (sys.get_int_max_str_digits)
_SHOWN = 40  # characters of a key or number shown in a problem
_LOG10_2 = math.log10(2)

_SURROGATE = re.compile("[\ud800-\udfff]")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_TO_BRACKET = re.compile(r'[^"\[\]{}]*+(?:"[^"\\]*+(?:\\.[^"\\]*+)*+"?+[^"\[\]{}]*+)*+([\[\]{}])?', re.DOTALL)
"""Everything up to the next bracket outside strings, and that bracket (group 1; None at the end of
the text). Strings are skipped whole, to their closing quote or to the end when they never close,
so a scan makes one Python step per bracket; possessive, it never backtracks and never fails, so
`finditer` never rescans (linear time)."""


@dataclass(frozen=True)
class Limits:
    """What one value may hold when it enters: text from a model or a caller, parsed arguments,
    tool results, resume values.

    >>> Limits(max_depth=8).max_depth
    8
    """

    max_depth: int = 64
    """Most levels of nested objects and lists (`[]` is one level, `[[]]` two)."""
    max_chars: int = 1_000_000
    """Most characters of a text, and of all the strings (keys too) in a value together."""
    max_string_chars: int = 100_000
    """Most characters of one string or key."""
    max_items: int = 100_000
    """Most items of one list or object."""
    max_nodes: int = 1_000_000
    """Most values in all, counting every nested value and every repeat of a shared one."""
    min_int: int = INT64_MIN
    max_int: int = INT64_MAX
    """The integer range; the default is what a checkpoint can store (signed 64-bit)."""
    max_problems: int = 20
    """Most problems listed for one value (the check stops there: its cost stays bounded)."""

    def __post_init__(self) -> None:
        for name in ("max_depth", "max_chars", "max_string_chars", "max_items", "max_nodes", "max_problems"):
            number = getattr(self, name)
            if type(number) is not int or number < 1:
                raise UserError(f"Limits.{name} must be a whole number of at least 1, not {number!r}")
        if self.max_depth > _DEPTH_CEILING:
            raise UserError(
                f"Limits.max_depth must be at most {_DEPTH_CEILING}: deeper values exhaust the parser's stack"
            )
        if not self.min_int <= 0 <= self.max_int:
            raise UserError("Limits.min_int must be at most 0 and Limits.max_int at least 0")


LIMITS: Final = Limits()
"""The default limits."""


class _Refused:
    """A number (or NaN) the JSON reader refused, left in its place so that the problem names its path."""

    __slots__ = ("fix", "reason", "shown")

    def __init__(self, reason: str, fix: str, shown: str) -> None:
        self.reason, self.fix, self.shown = reason, fix, shown


_Path = tuple[Any, Any, bool] | None
"""(parent path, key or index, is an index), innermost last; rendered only for a problem."""


def check_text(text: str, limits: Limits = LIMITS, *, where: str = ROOT) -> list[Problem]:
    """Problems of raw JSON-ish text, found before it is parsed, in one pass without recursion.

    Checks the size, lone surrogates and NUL characters, and the nesting depth: brackets are
    counted outside strings, so 10,000 levels are refused without the parser ever seeing them. An
    escaped surrogate or NUL (`"\\ud800"`) only becomes one when parsed: `check_value` finds it.

    >>> [p.reason for p in check_text("[" * 100 + "]" * 100)]
    ['the value is nested more than 64 levels deep (at character 64)']
    >>> check_text('{"a": [1, 2]}')
    []
    """
    if not isinstance(text, str):
        return [Problem(field=where, reason=NOT_TEXT.format(kind=_kind(text)), fix=NOT_TEXT_FIX)]
    size = len(text)
    if size > limits.max_chars:
        return [
            Problem(
                field=where,
                reason=TEXT_TOO_LONG.format(size=size, limit=limits.max_chars),
                fix=TEXT_TOO_LONG_FIX.format(limit=limits.max_chars),
            )
        ]
    problems = _char_problems(text, where, "text")
    at = _deeper_than(text, limits.max_depth)
    if at >= 0:
        problems.append(
            Problem(
                field=where,
                reason=TOO_DEEP_AT.format(limit=limits.max_depth, at=at),
                fix=TOO_DEEP_FIX.format(limit=limits.max_depth),
            )
        )
    return problems


def _deeper_than(text: str, limit: int, start: int = 0) -> int:
    """Index of the first bracket (outside strings) that opens level `limit + 1`, or -1.

    >>> _deeper_than('["[[[", [[1]]]', 2)
    9
    """
    depth = 0
    for match in _TO_BRACKET.finditer(text, start):
        at = match.start(1)
        if at < 0:
            break
        if text[at] in "[{":
            depth += 1
            if depth > limit:
                return at
        elif depth:
            depth -= 1
    return -1


def check_value(value: Any, limits: Limits = LIMITS, *, where: str = ROOT) -> list[Problem]:
    """Problems of a parsed value (dicts, lists, tuples, text, numbers, booleans, None), each
    naming its path (`a.b[2]`) and the fix.

    Reported: nesting past the depth limit, too many items or too much in all, keys that are not
    text, lone surrogates and NUL characters in keys and strings, integers outside the 64-bit
    range, NaN and infinities, circular references, and anything else as not JSON data. The walk
    uses an explicit stack (no recursion) and stops after `limits.max_problems` problems.

    >>> [(p.field, p.reason) for p in check_value({"a": [1, float("nan")], "b": {2: None}})]
    [('a[1]', 'NaN is not a finite number'), ('b[2]', 'the key 2 is of type int, not text')]
    """
    return _Walk(limits, where, build=False).run(value)[1]


def safe_value(value: Any, limits: Limits = LIMITS, *, where: str = ROOT) -> tuple[Any, list[Problem]]:
    """A copy of `value` that is JSON data within `limits`, and a problem for every change made.

    For values that may be shown as they are (tool results): objects that are not JSON data become
    a short description, integers outside the range decimal text, NaN and infinities the text
    `"NaN"`, `"Infinity"`, `"-Infinity"`, lone surrogates and NUL characters U+FFFD; what is too
    deep, too long, circular or over the size limits is cut and marked. Tuples become lists. The
    problems are those `check_value` reports (when more than `limits.max_problems`, one more says
    how many were not listed), so a change is never silent.

    >>> value, problems = safe_value({"n": float("inf"), "big": [2**64], "x": {1, 2}})
    >>> value
    {'n': 'Infinity', 'big': ['18446744073709551616'], 'x': '<set>'}
    >>> [p.field for p in problems]
    ['n', 'big[0]', 'x']
    """
    return _Walk(limits, where, build=True).run(value)


class _Walk:
    """One iterative walk of a value: problems always, the safe copy too when `build`.

    Plain scalars (None, booleans, in-range integers, finite floats, short sound text) are settled where their container is read; only containers and values with a problem go on
    the explicit stack, so the cost is linear with a small constant.
    """

    def __init__(self, limits: Limits, where: str, *, build: bool) -> None:
        self.limits = limits
        self.where = where
        self.build = build
        self.problems: list[Problem] = []
        self.unlisted = 0
        self.nodes = 1
        self.chars = 0
        self.spent = False

    def report(self, path: _Path, reason: str, fix: str) -> None:
        if len(self.problems) < self.limits.max_problems:
            self.problems.append(Problem(field=_render(self.where, path), reason=reason, fix=fix))
        else:
            self.unlisted += 1

    def run(self, value: Any) -> tuple[Any, list[Problem]]:
        limits = self.limits
        root: list[Any] = [None]
        # Items are (value, levels above it, path, the copy's container, slot), or the id of a
        # container whose children are all done: the ids still open make up the path, for cycles.
        stack: list[Any] = [(value, 0, None, root, 0)]
        open_ids: set[int] = set()
        while stack:
            item = stack.pop()
            if type(item) is int:
                open_ids.discard(item)
                continue
            if not self.build and len(self.problems) >= limits.max_problems:
                break
            node, depth, path, out, slot = item
            copy = self.visit(node, depth, path, stack, open_ids)
            if self.spent:
                if self.build:
                    out[slot] = LEFT_OUT_MARK
                    for rest in stack:
                        if type(rest) is not int:
                            rest[3][rest[4]] = LEFT_OUT_MARK
                break
            if self.build:
                out[slot] = copy
        if self.unlisted and self.build:
            self.problems.append(
                Problem(
                    field=self.where or ROOT, reason=UNLISTED.format(count=self.unlisted), fix=UNLISTED_FIX
                )
            )
        return root[0], self.problems

    def visit(self, node: Any, depth: int, path: _Path, stack: list[Any], open_ids: set[int]) -> Any:
        kind = type(node)
        if kind is dict or kind is list:
            return self.container(node, depth, path, stack, open_ids)
        if node is None or kind is bool:
            return node
        if kind is str:
            return self.text(node, path, "string")
        if kind is int:
            return self.integer(node, path)
        if kind is float:
            return self.number(node, path)
        if issubclass(kind, (str, int, float)):  # an enum, a numpy scalar: data-like, not JSON data
            self.report(path, NOT_JSON.format(kind=_kind(node)), NOT_JSON_FIX)
            if issubclass(kind, str):
                return self.text(str.__str__(node), path, "string")
            if issubclass(kind, int):
                return self.integer(int.__int__(node), path)
            return self.number(float.__float__(node), path)
        if issubclass(kind, (dict, list, tuple)):
            return self.container(node, depth, path, stack, open_ids)
        if kind is _Refused:
            self.report(path, node.reason, node.fix)
            return node.shown
        self.report(path, NOT_JSON.format(kind=_kind(node)), NOT_JSON_FIX)
        return _describe(node)

    def text(self, text: str, path: _Path, what: str) -> str:
        limits = self.limits
        size = len(text)
        self.chars += size
        if self.chars > limits.max_chars:
            self.report(path, TOO_MUCH_TEXT.format(limit=limits.max_chars), TOO_BIG_FIX)
            self.spent = True
            return LEFT_OUT_MARK
        if size > limits.max_string_chars:
            self.report(
                path,
                STRING_TOO_LONG.format(what=what, size=size, limit=limits.max_string_chars),
                STRING_TOO_LONG_FIX.format(limit=limits.max_string_chars),
            )
        for problem in _char_problems(text, "", what):
            self.report(path, problem.reason, problem.fix)
        if not self.build:
            return text
        if size > limits.max_string_chars:
            text = _cut(text, limits.max_string_chars)
        if not text.isascii():
            text = _SURROGATE.sub(REPLACEMENT_CHAR, text)
        text = text.replace("\x00", REPLACEMENT_CHAR)
        return text if type(text) is str else str.__str__(text)

    def integer(self, number: int, path: _Path) -> int | str:
        low, high = self.limits.min_int, self.limits.max_int
        if low <= number <= high:
            return number if type(number) is int else int.__int__(number)
        self.report(
            path,
            int_range_reason(_int_shown(number), low, high),
            INT_RANGE_FIX.format(low=low, high=high),
        )
        return _decimal(number) if self.build else number

    def number(self, number: float, path: _Path) -> float | str:
        if math.isfinite(number):
            return number if type(number) is float else float.__float__(number)
        shown = _float_text(number)
        self.report(path, NOT_FINITE.format(shown=shown), NOT_FINITE_FIX)
        return shown

    def container(self, node: Any, depth: int, path: _Path, stack: list[Any], open_ids: set[int]) -> Any:
        limits = self.limits
        kind = "object" if isinstance(node, dict) else "list"
        key = id(node)
        if key in open_ids:
            self.report(path, CIRCULAR.format(kind=kind), CIRCULAR_FIX)
            return CYCLE_MARK
        if depth >= limits.max_depth:
            self.report(
                path, TOO_DEEP.format(limit=limits.max_depth), TOO_DEEP_FIX.format(limit=limits.max_depth)
            )
            return DEEP_MARK
        count = len(node)
        # Over the limit, one item fewer is kept so that the mark of the rest keeps the copy in it.
        kept = count if count <= limits.max_items else limits.max_items - 1
        if count > kept:
            self.report(
                path,
                TOO_MANY_ITEMS.format(kind=kind, count=count, limit=limits.max_items),
                TOO_MANY_ITEMS_FIX.format(limit=limits.max_items),
            )
        self.nodes += kept
        if self.nodes > limits.max_nodes:
            self.report(path, TOO_MANY_PARTS.format(limit=limits.max_nodes), TOO_BIG_FIX)
            self.spent = True
            return LEFT_OUT_MARK
        open_ids.add(key)
        stack.append(key)
        pending: list[Any] = []
        if kind == "object":
            copy = self.entries(node, kept, depth + 1, path, pending)
            if isinstance(copy, dict) and count > kept:
                copy[MORE_ITEMS_KEY] = MORE_ITEMS_MARK.format(count=count - kept)
        else:
            copy = self.items(node, kept, depth + 1, path, pending)
            if isinstance(copy, list) and count > kept:
                copy.append(MORE_ITEMS_MARK.format(count=count - kept))
        pending.reverse()
        stack.extend(pending)
        return copy

    def entries(self, node: dict[Any, Any], kept: int, level: int, path: _Path, pending: list[Any]) -> Any:
        """The object's copy (None when not building), its plain values settled, the rest pending."""
        copy: dict[str, Any] | None = {} if self.build else None
        for _, (name, child) in zip(range(kept), node.items(), strict=False):
            entry = (path, name, False)
            if isinstance(name, str):
                safe_name = name if self.settled(name) else self.text(name, entry, "key")
                if self.spent:
                    pending.clear()
                    return LEFT_OUT_MARK
            else:
                shown = KEY_NOT_TEXT.format(shown=_key_shown(name), kind=_kind(name))
                self.report(entry, shown, KEY_NOT_TEXT_FIX)
                safe_name = _key_text(name)
            if self.settled(child):
                if copy is not None:
                    copy[safe_name] = child
                continue
            if copy is not None:
                copy[safe_name] = None
            pending.append((child, level, entry, copy, safe_name))
        return copy

    def items(
        self, node: list[Any] | tuple[Any, ...], kept: int, level: int, path: _Path, pending: list[Any]
    ) -> Any:
        """The list's copy (None when not building), its plain items settled, the rest pending."""
        copy: list[Any] | None = [None] * kept if self.build else None
        for index, child in zip(range(kept), node, strict=False):
            if self.settled(child):
                if copy is not None:
                    copy[index] = child
                continue
            pending.append((child, level, (path, index, True), copy, index))
        return copy

    def settled(self, value: Any) -> bool:
        """Whether `value` is a plain scalar that is fine as it is (its text counted if so)."""
        kind = type(value)
        if kind is str:
            size = len(value)
            if (
                size <= self.limits.max_string_chars
                and self.chars + size <= self.limits.max_chars
                and (value.isascii() or _SURROGATE.search(value) is None)
                and "\x00" not in value
            ):
                self.chars += size
                return True
            return False
        if kind is int:
            return bool(self.limits.min_int <= value <= self.limits.max_int)
        if kind is float:
            return math.isfinite(value)
        return value is None or kind is bool


def _char_problems(text: str, where: str, what: str) -> list[Problem]:
    problems: list[Problem] = []
    if not text.isascii():
        bad = _SURROGATE.search(text)
        if bad is not None:
            code = f"\\u{ord(bad.group()):04x}"
            problems.append(
                Problem(
                    field=where or ROOT,
                    reason=LONE_SURROGATE.format(what=what, code=code, at=bad.start()),
                    fix=LONE_SURROGATE_FIX,
                )
            )
    nul = text.find("\x00")
    if nul >= 0:
        problems.append(
            Problem(field=where or ROOT, reason=NUL_CHAR.format(what=what, at=nul), fix=NUL_CHAR_FIX)
        )
    return problems


def _cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, the cut marked when the mark fits."""
    keep = limit - len(CUT_MARK.format(count=len(text)))
    if keep < 0:
        return text[:limit]
    return text[:keep] + CUT_MARK.format(count=len(text) - keep)


def _render(where: str, path: _Path) -> str:
    parts: list[str] = []
    while path is not None:
        path, key, is_index = path
        if is_index:
            parts.append(f"[{key}]")
        elif isinstance(key, str) and len(key) <= _SHOWN and _PLAIN_KEY.fullmatch(key):
            parts.append(f".{key}")
        elif isinstance(key, str):
            parts.append('["' + _visible(key).replace('"', '\\"') + '"]')
        else:
            parts.append(f"[{_key_shown(key)}]")
    parts.reverse()
    inner = "".join(parts)
    if where in ("", ROOT):
        return inner.removeprefix(".") or ROOT
    return where + inner


def _visible(text: str, limit: int = _SHOWN) -> str:
    """`text` cut to `limit` characters, with control characters and surrogates as escapes."""
    shown = _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text[:limit])
    return shown + ("..." if len(text) > limit else "")


def _kind(value: object) -> str:
    kind = type(value)
    module = getattr(kind, "__module__", None)
    name = kind.__qualname__
    if isinstance(module, str) and module != "builtins":
        name = f"{module}.{name}"
    return _visible(name, 80)


def _describe(value: object) -> str:
    """Short text standing for a value that is not JSON data; runs none of the value's own code."""
    if isinstance(value, (bytes, bytearray)):
        head = bytes(value[:_SHOWN])
        return repr(head) + ("..." if len(value) > _SHOWN else "")
    return f"<{_kind(value)}>"


def _digits(number: int) -> int:
    """About how many decimal digits `number` has, without writing it out."""
    return max(1, math.ceil(abs(number).bit_length() * _LOG10_2))


def _int_shown(number: int) -> str:
    if abs(number).bit_length() <= 128:
        return str(int.__int__(number))
    sign = "-" if number < 0 else ""
    return f"{sign}<about {_digits(number):,} digits>"


def _decimal(number: int) -> str:
    if _digits(number) <= _DECIMAL_DIGITS:
        try:
            return str(int.__int__(number))
        except ValueError:  # a lower sys.set_int_max_str_digits
            pass
    return BIG_INT_MARK.format(digits=_digits(number))


def _key_shown(key: object) -> str:
    if key is None or isinstance(key, (bool, int, float)):
        return _visible(_key_text(key))
    return f"<{_kind(key)}>"


def _key_text(key: object) -> str:
    """The text a key that is not text becomes (what `json.dumps` writes for the simple ones)."""
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return _int_shown(key) if abs(key).bit_length() <= 128 else _decimal(key)
    if isinstance(key, float):
        return _float_text(key)
    return _describe(key)


def _float_text(number: float) -> str:
    """What JavaScript writes for `number` (`json.dumps` writes the same for NaN and infinities)."""
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return repr(float.__float__(number))


UNSTORABLE = "keelgraph_unstorable"
"""The key of the record a checkpoint keeps instead of a written value it could not store (see
`keelgraph.graphs.persistence.StorableSerializer`); no contract accepts it."""
REFUSED_REQUEST = "keelgraph_refused_request"
"""The key of the bounded record a thread keeps instead of a request it cannot or should not keep."""
REQUEST_KEEP_CHARS = 65_536
"""A request is kept whole in a thread's checkpoints up to this many characters (of its text, or
of its JSON); a longer one, or one that is not JSON data, is kept as a bounded record."""
_RECORD_PREFIX = 2_000
NOT_KEPT = "the request is {size:,} characters; only requests up to {limit:,} are kept"
NOT_KEPT_FIX = "send a shorter request (the thread keeps its first characters, size and SHA-256)"


def refused_record(value: Any, problems: list[Problem]) -> dict[str, Any]:
    """A bounded, storable record of a request: its size and SHA-256 (for text), its first
    characters (made safe) and the problems found, under `REFUSED_REQUEST`."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    size: int | None = None
    digest: str | None = None
    if isinstance(value, str):
        size = len(value)
        digest = hashlib.sha256(value.encode("utf-8", errors="surrogatepass")).hexdigest()
        preview: Any = value[:_RECORD_PREFIX]
    else:
        preview = safe_value(value, Limits(max_depth=8, max_chars=_RECORD_PREFIX, max_items=20))[0]
    shown, _ = safe_value(preview, Limits(max_string_chars=_RECORD_PREFIX))
    record = {
        "chars": size,
        "sha256": digest,
        "type": type(value).__name__,
        "prefix": shown,
        "problems": [p.model_dump() for p in problems[: LIMITS.max_problems]],
    }
    return {REFUSED_REQUEST: record}


def stored_request(value: Any, limits: Limits = LIMITS) -> Any:
    """What a thread keeps of a request: the request as sent when it is JSON data (or text) of at
    most `REQUEST_KEEP_CHARS` characters, otherwise `refused_record` (a 50 MB body is kept as a few
    KB; a value a checkpoint cannot store, such as a lone surrogate or a Python object, never
    reaches the serializer)."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) > REQUEST_KEEP_CHARS:
            return refused_record(value, [_not_kept(len(value))])
        return value
    if isinstance(value, str):
        if len(value) > REQUEST_KEEP_CHARS:
            return refused_record(value, [_not_kept(len(value))])
        if _SURROGATE.search(value):
            return refused_record(value, check_text(value, limits))
        return value
    problems = check_value(value, limits)
    if problems:
        return refused_record(value, problems)
    size = len(json.dumps(value, ensure_ascii=False))
    if size > REQUEST_KEEP_CHARS:
        return refused_record(value, [_not_kept(size)])
    return value


def _not_kept(size: int) -> Problem:
    return Problem(
        field="request",
        reason=NOT_KEPT.format(size=size, limit=REQUEST_KEEP_CHARS),
        fix=NOT_KEPT_FIX,
    )
