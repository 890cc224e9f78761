"""Constrained repair: a repair turn's schema keeps what was not objected to and rules out what was."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keelgraph.contracts.decision import JSON_UNSAFE, grammar_pattern
from keelgraph.contracts.errors import Problem

__all__ = [
    "RepairPlan",
    "answer_path",
    "field_paths",
    "fixed_pattern_excluding",
    "named_field",
    "not_equal_pattern",
    "pin_values",
    "repair_plan",
    "repair_schema",
]

Path = tuple[str, ...]

_SUFFIX = re.compile(r" \([^()]*\)$")
_LEADING = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+))*")


def answer_path(field: str) -> Path | None:
    """The answer field a `Problem.field` names, or None when it is about the whole answer.

    List indices are kept (`"1"`): a repair can change one item of a list and pin the others.

    >>> answer_path("answer.items.1.quantity"), answer_path("answer.gift_wrap (order_check)")
    (('items', '1', 'quantity'), ('gift_wrap',))
    >>> answer_path("answer (order_check)") is None and answer_path("(root)") is None
    True
    """
    field = _SUFFIX.sub("", field)
    if not field.startswith("answer."):
        return None
    parts = tuple(p for p in field.removeprefix("answer.").split(".") if p)
    return parts or None


def _walk(node: Mapping[str, Any], prefix: Path) -> Iterator[Path]:
    for option in node.get("anyOf", []):
        if isinstance(option, Mapping):
            yield from _walk(option, prefix)
    if node.get("type") == "array" and isinstance(node.get("items"), Mapping):
        yield from _walk(node["items"], prefix)
    for name, sub in node.get("properties", {}).items():
        yield (*prefix, name)
        if isinstance(sub, Mapping):
            yield from _walk(sub, (*prefix, name))


def field_paths(schema: Mapping[str, Any]) -> set[Path]:
    """Every field path of an (inlined) object schema, through lists and optional branches."""
    return set(_walk(schema, ()))


def named_field(message: str, paths: set[Path]) -> Path | None:
    """The field a check's message is about: the one whose dotted path (or unique name) it begins
    with, as in `"gift_wrap is true but ..."` or `"ship_to.city 'Lisboa' is not ..."`.

    >>> named_field("gift_wrap is true", {("gift_wrap",), ("ship_to",), ("ship_to", "city")})
    ('gift_wrap',)
    >>> named_field("city is wrong", {("ship_to",), ("ship_to", "city")})
    ('ship_to', 'city')
    >>> named_field("the e-mail orders a teapot", {("items",)}) is None
    True
    >>> named_field("items.0.quantity: the e-mail orders 4", {("items",), ("items", "quantity")})
    ('items', '0', 'quantity')
    """
    found = _LEADING.match(message)
    if found is None or message[found.end() : found.end() + 1] not in {"", " ", ":", ",", "'", '"', "="}:
        return None
    path = tuple(found.group().split("."))
    if tuple(p for p in path if not p.isdigit()) in paths:
        return path
    by_name = [p for p in paths if p[-1] == path[-1] and len(path) == 1]
    return by_name[0] if len(by_name) == 1 else None


_LITERAL_CLASS = frozenset("|.(){}*+?-")
_UNSAFE = frozenset('"\\^$[]')
MAX_EXCLUDED_CHARS = 96
"""Longer strings are not ruled out in the grammar: the pattern nests one group per character."""


_NEGATED = re.compile(r"\^\[\^([^\]\\^-]*(?:[0-9a-zA-Z]-[0-9a-zA-Z][^\]\\^-]*)*)\][+*]\$")
"""A pattern that only bans some characters (`^[^0-9]+$`): it combines with `not_equal_pattern`."""


def not_equal_pattern(*values: str, banned: str = "") -> str | None:
    """An anchored pattern matching every JSON string that neither is nor begins with one of
    `values` (None when one cannot be written safely for llama.cpp's converter: empty, too long, or
    holding quotes, backslashes, `^`, `$`, brackets or control characters).

    A corrected value must leave the rejected one before its end: a small model shown it may not
    differ, writes it again and adds to it ("Lisboa" became "Lisboa 14433" on the embedded model).
    Built as nested groups along a trie of the values, so it stays linear in their total size.
    `banned` (the body of a negated class, like `0-9`) keeps those characters out wherever the
    string leaves the values.

    >>> print(not_equal_pattern("ab"))
    ^([^a"\\\\\\x00-\\x1f][^"\\\\\\x00-\\x1f]*|a([^b"\\\\\\x00-\\x1f][^"\\\\\\x00-\\x1f]*)?)?$
    >>> import re; p = re.compile(not_equal_pattern("Lisboa", "Lisbonne"))
    >>> [bool(p.match(s)) for s in ("Lisboa", "Lisbonne", "Lisboa 1", "Lisbon", "Lisb", "")]
    [False, False, False, True, True, True]
    """
    if not values or sum(map(len, values)) > MAX_EXCLUDED_CHARS:
        return None
    if any(not v or any(ch in _UNSAFE or ord(ch) < 0x20 for ch in v) for v in values):
        return None
    trie: dict[str, Any] = {}
    for value in values:
        node = trie
        for ch in value:
            node = node.setdefault(ch, {})
        node[""] = {}  # a value ends here: nothing may follow

    def group(node: dict[str, Any]) -> str:
        chars = sorted((ch for ch in node if ch), key=lambda ch: ch != "-")  # "-" first: not a range
        options = [f"[^{''.join(chars)}{banned}{JSON_UNSAFE}][^{banned}{JSON_UNSAFE}]*"]
        options += [
            f"{f'[{ch}]' if ch in _LITERAL_CLASS else ch}{group(node[ch])}"
            for ch in chars
            if "" not in node[ch]
        ]
        return f"({'|'.join(options)})?"

    return f"^{group(trie)}$"


_ATOM = re.compile(r"(\\d|\\.|\[[^\]^\\]+\]|[A-Za-z0-9 _:/,-])(?:\{(\d{1,2})\})?")
_RANGE = re.compile(r"(.)-(.)")
_PLAIN = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
MAX_FIXED_LENGTH = 40


def _fixed_classes(pattern: str) -> list[frozenset[str]] | None:
    """The character sets, position by position, of an anchored fixed-length pattern made of
    literals, `\\d`, `\\.` and plain classes with counts (`^\\d{4}-\\d{2}-\\d{2}$`, `^[A-Z]{2}[0-9]{6}$`), or None.
    """
    if not (pattern.startswith("^") and pattern.endswith("$")):
        return None
    body, classes, at = pattern[1:-1], [], 0
    while at < len(body):
        found = _ATOM.match(body, at)
        if found is None:
            return None
        atom, count = found.group(1), int(found.group(2) or 1)
        if atom == "\\d":
            chars = frozenset("0123456789")
        elif atom.startswith("\\"):
            chars = frozenset(atom[1])
        elif atom.startswith("["):
            inner, chars = atom[1:-1], frozenset()
            for lo, hi in _RANGE.findall(inner):
                chars |= {chr(c) for c in range(ord(lo), ord(hi) + 1)}
            chars |= set(_RANGE.sub("", inner))
            if not chars <= _PLAIN | {"-", " ", "_", ".", ":", "/", ","}:
                return None
        else:
            chars = frozenset(atom)
        classes += [chars] * count
        at = found.end()
    return classes if 0 < len(classes) <= MAX_FIXED_LENGTH else None


def _class_text(chars: Iterator[str] | frozenset[str] | set[str]) -> str:
    """A character class for `chars` (runs of letters or digits written as ranges)."""
    ordered, parts, i = sorted(chars, key=ord), [], 0
    while i < len(ordered):
        j = i
        while (
            j + 1 < len(ordered) and ord(ordered[j + 1]) == ord(ordered[j]) + 1 and ordered[j + 1] in _PLAIN
        ):
            j += 1
        if ordered[i] in _PLAIN and j - i >= 2:
            parts.append(f"{ordered[i]}-{ordered[j]}")
        else:
            parts += [c for c in ordered[i : j + 1] if c != "-"]
        i = j + 1
    return f"[{'-' if '-' in ordered else ''}{''.join(parts)}]"  # "-" first: a literal, not a range


def fixed_pattern_excluding(pattern: str, values: Sequence[str]) -> str | None:
    """A pattern for the strings of the fixed-length `pattern` except `values`, or None when
    `pattern` is not one (see `_fixed_classes`). The field keeps its shape (an ISO date stays a date)
    and loses the rejected values: a repair cannot write the same wrong date again.

    >>> p = fixed_pattern_excluding(r"^\\d{4}-\\d{2}-\\d{2}$", ["2026-04-12"])
    >>> import re; [bool(re.match(p, s)) for s in ("2026-04-12", "2026-03-14", "2026-4-12", "x")]
    [False, True, False, False]
    """
    classes = _fixed_classes(pattern)
    if classes is None:
        return None
    n = len(classes)
    rejected = [
        v
        for v in dict.fromkeys(values)
        if len(v) == n and all(c in k for c, k in zip(v, classes, strict=True))
    ]

    def rest(k: int) -> str:
        return "".join(_class_text(classes[i]) for i in range(k, n))

    def build(k: int, left: list[str]) -> str | None:
        if not left:
            return rest(k)
        if k == n:
            return None  # this branch spells a rejected value
        taken = {v[k] for v in left}
        options = []
        if others := classes[k] - taken:
            options.append(_class_text(others) + rest(k + 1))
        for ch in sorted(taken):
            if (sub := build(k + 1, [v for v in left if v[k] == ch])) is not None:
                options.append(_class_text({ch}) + sub)
        if not options:
            return None
        return options[0] if len(options) == 1 else f"({'|'.join(options)})"

    built = build(0, rejected)
    return None if built is None else f"^{built}$"


def _node_at(schema: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The schema of the field at `path`, through objects and lists made tuples by `_itemize`
    (not through free lists or optional branches)."""
    node = schema
    for name in path:
        if name.isdigit():
            items = node.get("prefixItems")
            sub = items[int(name)] if isinstance(items, list) and int(name) < len(items) else None
        else:
            sub = node.get("properties", {}).get(name)
        if not isinstance(sub, dict):
            return None
        node = sub
    return node


def _value_at(value: Any, path: Path) -> tuple[bool, Any]:
    for name in path:
        if name.isdigit() and isinstance(value, list):
            if int(name) >= len(value):
                return False, None
            value = value[int(name)]
            continue
        if not isinstance(value, Mapping) or name not in value:
            return False, None
        value = value[name]
    return True, value


def _list_prefix(schema: Mapping[str, Any], path: Path) -> tuple[Path, bool]:
    """`path` cut at the first list it passes through without an index (the list itself is then
    what is objected to), and whether it went into a list by index."""
    node: Any = schema
    indexed = False
    for i, name in enumerate(path):
        if not isinstance(node, Mapping):
            return path[:i], indexed
        if node.get("type") == "array" and isinstance(node.get("items"), Mapping):
            if not name.isdigit():
                return path[:i], indexed
            indexed, node = True, node["items"]
            continue
        if name.isdigit():
            return path[:i], indexed
        node = node.get("properties", {}).get(name)
    return path, indexed


def _itemize(schema: dict[str, Any], previous: Any, named: list[Path]) -> list[Path]:
    """Turn every list whose items the problems name by index into a tuple of its previous length
    (`prefixItems`, one schema per item), so each item can be pinned or ruled out on its own; a list
    objected to as a whole stays free with everything under it. Returns the paths that remain."""
    cut = [_list_prefix(schema, p) for p in named]
    free = {p for p, _ in cut if (node := _node_at(schema, p)) is not None and node.get("type") == "array"}
    kept = [p for p, _ in cut if not any(len(p) > len(f) and p[: len(f)] == f for f in free)]
    for path in sorted(set(kept), key=len):
        for i, name in enumerate(path):
            if not name.isdigit() or i == 0:
                continue
            node = _node_at(schema, path[: i - 1])
            owner = path[i - 1]
            holder = node.get("properties", {}) if node is not None else {}
            lst = holder.get(owner)
            present, value = _value_at(previous, path[:i])
            if isinstance(lst, dict) and "items" in lst and present and isinstance(value, list) and value:
                item = lst["items"]
                holder[owner] = {
                    **{k: v for k, v in lst.items() if k not in {"items", "maxItems"}},
                    "prefixItems": [copy.deepcopy(item) for _ in value],
                }
    return list(dict.fromkeys(kept))


def _let_go(schema: dict[str, Any], named: Sequence[Path]) -> None:
    """Let the items that problems object to as a whole (`items.1`, "listed a second time") be
    dropped or rewritten: the list becomes the other items, in their order and as `_pin` left them,
    followed by none, one, ... or all of the objected items' free schemas (an `anyOf` of tuples,
    none shorter than the list's `minItems`). A tuple of the old length would force the model to
    write an item for every objected slot: a duplicate could only be written again."""
    whole: dict[Path, set[int]] = {}
    for path in named:
        if len(path) >= 2 and path[-1].isdigit():
            whole.setdefault(path[:-1], set()).add(int(path[-1]))
    for owner, objected in sorted(whole.items(), key=lambda kv: -len(kv[0])):
        node = _node_at(schema, owner)
        slots = node.get("prefixItems") if node is not None else None
        if node is None or not isinstance(slots, list):
            continue
        kept = [s for i, s in enumerate(slots) if i not in objected]
        loose = [slots[i] for i in sorted(objected) if i < len(slots)]
        least = int(node.get("minItems", 0))
        rest = {k: v for k, v in node.items() if k not in {"prefixItems", "minItems"}}
        options = [
            {**rest, "prefixItems": [*kept, *loose[:j]]}
            for j in range(len(loose) + 1)
            if len(kept) + j >= least
        ]
        if not options:
            continue
        node.clear()
        node.update(options[0] if len(options) == 1 else {"anyOf": options})


def _exclude(node: dict[str, Any], rejected: list[Any]) -> bool:
    """Rule the `rejected` values out of the field's schema where a grammar can say so; whether it could."""
    if "anyOf" in node or "const" in node:
        return False
    if "enum" in node:
        rest = [v for v in node["enum"] if v not in rejected]
        if rest and len(rest) < len(node["enum"]):
            node["enum"] = rest
            return True
        return False
    if node.get("type") == "integer" and all(
        isinstance(v, int) and not isinstance(v, bool) for v in rejected
    ):
        return _exclude_integers(node, sorted(set(rejected)))
    if node.get("type") == "boolean" and all(isinstance(v, bool) for v in rejected):
        if len(set(rejected)) != 1:
            return False
        node["enum"] = [not rejected[0]]
        return True
    if node.get("type") == "string" and all(isinstance(v, str) for v in rejected):
        own = node.get("pattern")
        own = grammar_pattern(own) if isinstance(own, str) else None
        banned = _NEGATED.fullmatch(own.replace(JSON_UNSAFE, "")) if own is not None else None
        if own is not None and banned is None:
            # The field's own pattern shapes the value in the grammar (five digits, say): worth more
            # than ruling one value out. A fixed-length one takes the exclusion in (a date that
            # stays a date and is not the rejected one); other patterns do not combine.
            fixed = fixed_pattern_excluding(node["pattern"], rejected)
            if fixed is None:
                return False
            node["pattern"] = fixed
            return True
        pattern = not_equal_pattern(*dict.fromkeys(rejected), banned=banned.group(1) if banned else "")
        if pattern is None:
            return False
        node["pattern"] = pattern  # a pattern the grammar cannot use is only checked after parsing
        return True
    return False


MAX_EXCLUDED_INTEGERS = 8
"""Rejected integers ruled out in one field at most: each splits the allowed range in two."""


def _exclude_integers(node: dict[str, Any], rejected: list[int]) -> bool:
    """Rule rejected integers out of an integer field as ranges between them (llama.cpp's grammar
    takes `minimum`/`maximum` on integers): `{"anyOf": [<= 2, 4..6, >= 8]}` rules out 3 and 7."""
    low, high = node.get("minimum"), node.get("maximum")
    if not rejected or len(rejected) > MAX_EXCLUDED_INTEGERS:
        return False
    if any(not isinstance(b, int) or isinstance(b, bool) for b in (low, high) if b is not None):
        return False
    ranges: list[tuple[int | None, int | None]] = []
    start = low
    for value in rejected:
        end = value - 1
        if start is None or end >= start:
            ranges.append((start, end))
        start = value + 1
    if high is None or start <= high:
        ranges.append((start, high))
    ranges = [
        (a, b)
        for a, b in ranges
        if (a is None or high is None or a <= high) and (b is None or low is None or b >= low)
    ]
    if not ranges:
        return False
    rest = {k: v for k, v in node.items() if k not in {"minimum", "maximum", "type"}}
    options = [
        {
            "type": "integer",
            **({"minimum": a} if a is not None else {}),
            **({"maximum": b} if b is not None else {}),
        }
        for a, b in ranges
    ]
    node.clear()
    node.update(rest)
    node.update(options[0] if len(options) == 1 else {"anyOf": options})
    return True


def _pin(node: dict[str, Any], value: Any, free: list[Path]) -> dict[str, Any]:
    """`node` with every field that no `free` path reaches fixed to its value in `value`."""
    if not free:
        return {"const": value}
    if any(not p for p in free):
        return node  # the field itself is objected to
    if isinstance(node.get("prefixItems"), list) and isinstance(value, list):
        node["prefixItems"] = [
            _pin(sub, value[i], [p[1:] for p in free if p[0] == str(i)]) if i < len(value) else sub
            for i, sub in enumerate(node["prefixItems"])
        ]
        return node
    if not isinstance(value, Mapping) or "properties" not in node:
        return node  # a free list or a union: left free as a whole
    for name, sub in node["properties"].items():
        if name in value and isinstance(sub, dict):
            node["properties"][name] = _pin(sub, value[name], [p[1:] for p in free if p[0] == name])
    return node


@dataclass(frozen=True)
class RepairPlan:
    """How a repair is constrained: its answer schema, and whether that schema rules out the
    rejected answer (every problem names a field, each of those lost its rejected value and the
    rest is pinned), so the model cannot write it again."""

    schema: dict[str, Any]
    decisive: bool = False


Rejected = tuple[Any, Sequence[Problem]]
"""A rejected answer and the problems it was rejected with."""


def repair_schema(
    schema: Mapping[str, Any],
    previous: Any,
    problems: Sequence[Problem],
    earlier: Sequence[Rejected] = (),
) -> dict[str, Any]:
    """The answer schema for repairing `previous`, the answer that was rejected with `problems`.

    - Every field a problem names (see `answer_path`) has its rejected value ruled out when the
      grammar can say so: a boolean flips, an `enum` loses the value, a string may be anything but
      it (`not_equal_pattern`). Values rejected for the same field in `earlier` answers of the turn
      are ruled out with it, so a repair cannot go back to one. Fields inside lists are left free.
    - When every problem names a field, the fields none of them names are pinned to their values
      in `previous` (`const`): the repair can only change what was objected to, and a small model
      resampling the whole answer cannot break what was right.

    `schema` is not changed; the result is a new schema (with refs inlined, as `schema` must be).
    """
    return repair_plan(schema, previous, problems, earlier).schema


def repair_plan(
    schema: Mapping[str, Any],
    previous: Any,
    problems: Sequence[Problem],
    earlier: Sequence[Rejected] = (),
) -> RepairPlan:
    """`repair_schema`, and whether it rules the rejected answer out (see `RepairPlan`)."""
    out = copy.deepcopy(dict(schema))
    if not isinstance(previous, Mapping):
        return RepairPlan(out)
    paths = [answer_path(p.field) for p in problems]
    named = _itemize(out, previous, list(dict.fromkeys(p for p in paths if p is not None)))
    excluded = 0
    for path in named:
        node, (present, old) = _node_at(out, path), _value_at(previous, path)
        if node is None or not present:
            continue
        rejected = [old]
        # Earlier answers' values count for named fields, not for list items (items move about).
        for answer, said in [] if any(p.isdigit() for p in path) else earlier:
            found, value = _value_at(answer, path)
            if found and value not in rejected and path in {answer_path(p.field) for p in said}:
                rejected.append(value)
        excluded += _exclude(node, rejected)
    if not named or None in paths:
        return RepairPlan(out)
    pinned = _pin(out, previous, named)
    _let_go(pinned, named)
    return RepairPlan(pinned, decisive=excluded == len(named))


def pin_values(schema: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """`schema` with the field at each dotted path of `values` fixed to its value (`const`): the
    values checks computed (`keelgraph.Computed`) are written, not guessed, in a repair. Paths into
    a list that was not made a tuple (see `repair_plan`) are left as they are.

    >>> pin_values({"type": "object", "properties": {"total": {"type": "number"}}}, {"total": 32.87})
    {'type': 'object', 'properties': {'total': {'const': 32.87}}}
    """
    out = copy.deepcopy(dict(schema))
    for path, value in values.items():
        parts = tuple(path.split("."))
        node = _node_at(out, parts[:-1]) if len(parts) > 1 else out
        if node is None:
            continue
        last = parts[-1]
        if (
            last.isdigit()
            and isinstance(node.get("prefixItems"), list)
            and int(last) < len(node["prefixItems"])
        ):
            node["prefixItems"][int(last)] = {"const": value}
        elif isinstance(node.get("properties"), dict) and last in node["properties"]:
            node["properties"][last] = {"const": value}
    return out
