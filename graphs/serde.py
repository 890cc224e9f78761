"""What keelgraph's checkpointers write: LangGraph's serializer, made safe for any value that enters."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from keelgraph.contracts.boundary import (
    BIG_INT_MARK,
    CYCLE_MARK,
    DEEP_MARK,
    INT64_MAX,
    INT64_MIN,
    UNSTORABLE,
    Limits,
    safe_value,
)

__all__ = ["NOT_STORED", "STORE_MAX_CHARS", "StorableSerializer"]


class StorableSerializer(JsonPlusSerializer):
    """LangGraph's serializer, except that plain data it cannot store is stored as its safe copy.

    A value enters a checkpoint before any node can look at it (a run's input, a resume value):
    integers past 64 bits, lone surrogates and nesting deeper than msgpack goes would make the
    stock serializer raise and leave the thread at `running`. Those leaves are written instead as
    decimal text, U+FFFD and a marker; keelgraph's nodes refuse such values by field, so nothing
    changed this way is ever accepted as valid data.
    """

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        scan = _scan(obj)
        long_text, surrogate = scan if scan is not None else (True, _has_surrogate(obj))
        if long_text:
            obj = _bounded(obj)
        checkpoint = isinstance(obj, dict) and "channel_values" in obj
        # msgpack stores a lone surrogate without complaint, and it reads back as another character:
        # a value that changes on its way through the checkpoint is treated as one it cannot store.
        if not surrogate:
            try:
                return super().dumps_typed(obj)
            except (TypeError, ValueError, UnicodeError, RecursionError, OverflowError):
                pass
        if checkpoint:  # keep what it can store
            return super().dumps_typed(self._storable(obj, 0, set()))
        # A single written value (a run's input, a resume value): stored as a record that no node
        # accepts, never as a cleaned-up copy that could pass where the value itself was refused (a
        # refused decision replayed on a later resume would otherwise read as a valid one).
        record = {UNSTORABLE: {"type": type(obj).__name__, "preview": safe_value(obj, _PREVIEW)[0]}}
        return super().dumps_typed(record)

    def _storable(self, value: Any, depth: int, path: set[int]) -> Any:
        """`value` with what a checkpoint cannot store replaced by safe text: lone surrogates by
        U+FFFD, integers past 64 bits, objects the serializer refuses, cycles and nesting past
        `_STORE_DEPTH` by markers. What it can store (messages, say) is left as it is."""
        if depth > _STORE_DEPTH:
            return DEEP_MARK
        if isinstance(value, str):
            return _SURROGATE.sub("\ufffd", value)
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return value
        if isinstance(value, int):
            return value if INT64_MIN <= value <= INT64_MAX else BIG_INT_MARK.format(digits=_digits(value))
        if isinstance(value, (dict, list, tuple)):
            if id(value) in path:
                return CYCLE_MARK
            inner = path | {id(value)}
            if isinstance(value, dict):
                return {self._storable_key(k): self._storable(v, depth + 1, inner) for k, v in value.items()}
            return [self._storable(v, depth + 1, inner) for v in value]
        try:
            super().dumps_typed(value)
        except Exception:
            return f"<{type(value).__name__}: not storable>"
        return value

    def _storable_key(self, key: Any) -> Any:
        if isinstance(key, str):
            return _SURROGATE.sub("\ufffd", key)
        if (
            key is None
            or isinstance(key, (bool, float))
            or (isinstance(key, int) and INT64_MIN <= key <= INT64_MAX)
        ):
            return key
        return f"<{type(key).__name__} key>"


_STORE_DEPTH = 100
_PREVIEW = Limits(max_depth=8, max_chars=2_000, max_string_chars=500, max_items=20)
STORE_MAX_CHARS = 1_000_000
"""No text longer than this is written to a checkpoint. Nothing keelgraph keeps comes near it (tool
results are cut at `max_stored_chars`, requests over `Contract.max_request_chars` are refused): a
longer one is a refused request on its way in (the run's input, its first write), stored as its
size, SHA-256 and first characters."""
NOT_STORED = "<{size:,} characters not stored (over {limit:,}); sha256 {sha256}; it began: {prefix}>"


def _bounded(obj: Any, depth: int = 0) -> Any:
    """`obj` with text over `STORE_MAX_CHARS` replaced by `NOT_STORED`, looked for where a run's
    input lands: the value itself (a write), or plain dicts up to four levels down (a checkpoint's
    `channel_values["__start__"]["request"]`). Copies only what it changes."""
    if isinstance(obj, str):
        return _not_stored(obj) if len(obj) > STORE_MAX_CHARS else obj
    if depth >= _SCAN_DEPTH or type(obj) is not dict:
        return obj
    changed = {}
    for key, value in obj.items():
        if isinstance(value, (str, dict)) and (new := _bounded(value, depth + 1)) is not value:
            changed[key] = new
    return {**obj, **changed} if changed else obj


_SCAN_DEPTH = 4


def _not_stored(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
    prefix = _SURROGATE.sub("\ufffd", text[:200])
    return NOT_STORED.format(size=len(text), limit=STORE_MAX_CHARS, sha256=digest, prefix=prefix)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _scan(obj: Any) -> tuple[bool, bool] | None:
    """(whether `obj` may hold text over `STORE_MAX_CHARS`, whether its plain data holds a lone
    surrogate), from one pass of the C JSON encoder over its plain data (objects not entered, as in
    `_has_surrogate`), or None when that pass cannot tell (a cycle, deep nesting, a huge integer).
    Checkpoints are written several times a turn: the Python walks cost 2.7 ms a turn."""
    try:
        text = json.dumps(obj, ensure_ascii=False, skipkeys=True, default=_opaque)
    except (ValueError, TypeError, RecursionError, OverflowError):
        return None
    return len(text) > STORE_MAX_CHARS, not text.isascii() and _SURROGATE.search(text) is not None


def _opaque(_: object) -> None:
    return None


def _has_surrogate(obj: Any, budget: int = 100_000) -> bool:
    """Whether plain data in `obj` (text, and dicts, lists and tuples of it, objects not entered)
    holds a lone surrogate; iterative, and gives up (False) after `budget` values."""
    stack = [obj]
    seen = 0
    while stack and seen < budget:
        value = stack.pop()
        seen += 1
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                return True
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return False


def _digits(value: int) -> int:
    return int(abs(value).bit_length() * 0.30103) + 1
