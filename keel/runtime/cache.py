"""Response caching: identical model calls answered from a store instead of the model.

A graph built with `build_graph(..., cache=...)` looks every model call up by `cache_key` before
making it. A reply is written only once it is known good: at the end of a turn that ended `ok`,
every reply of that turn that was not rejected (see `keelgraph.graphs.check`). A failed or
invalid answer, and a transport error, is never kept.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from langchain_core.messages import AIMessage, BaseMessage

from keelgraph._sqlite import connect

__all__ = [
    "MemoryModelCache",
    "ModelCache",
    "SqliteModelCache",
    "cache_key",
    "effective_temperature",
    "model_identity",
]


class ModelCache(Protocol):
    """Where cached replies live: a JSON-ready dict per key."""

    def get(self, key: str) -> dict[str, Any] | None:
        """The reply stored under `key`, or None."""
        ...

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Store a reply under `key`, replacing any earlier one."""
        ...


def model_identity(model: Any) -> dict[str, Any]:
    """What tells one model from another in a key: its label and the settings that shape a reply."""
    from keelgraph.runtime.models import model_label

    identity: dict[str, Any] = {"label": model if isinstance(model, str) else model_label(model)}
    for attr in ("model_name", "temperature", "max_tokens", "top_p", "seed", "openai_api_base"):
        value = getattr(model, attr, None)
        if isinstance(value, (str, int, float)):
            identity[attr] = value
    return identity


def effective_temperature(model: Any, bound_kwargs: Mapping[str, Any]) -> float | None:
    """The temperature a call runs at: a bound one first, else the model's (None: not set)."""
    value = bound_kwargs.get("temperature", getattr(model, "temperature", None))
    return float(value) if isinstance(value, (int, float)) else None


def _message(message: BaseMessage) -> dict[str, Any]:
    calls = message.tool_calls if isinstance(message, AIMessage) else []
    return {
        "type": message.type,
        "content": message.content,
        "tool_calls": [{"name": c["name"], "args": c["args"]} for c in calls],
    }


def cache_key(
    model: Any, strategy: str, prompt: Sequence[BaseMessage], bound_kwargs: Mapping[str, Any]
) -> str:
    """SHA-256 of a canonical JSON of the model, the strategy, the prompt and the bound request
    options (tools, tool choice, response format, temperature). `model` is a chat model or a label.

    >>> from langchain_core.messages import HumanMessage
    >>> cache_key("m", "prompted", [HumanMessage("hi")], {}) == cache_key("m", "prompted", [HumanMessage("hi")], {})
    True
    """
    payload = {
        "model": model_identity(model),
        "strategy": strategy,
        "prompt": [_message(m) for m in prompt],
        "kwargs": dict(bound_kwargs),
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class MemoryModelCache:
    """A cache in this process, newest `max_entries` kept (None: no bound)."""

    def __init__(self, max_entries: int | None = 10_000) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            text = self._items.get(key)
        return None if text is None else dict(json.loads(text))

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        text = json.dumps(dict(value), default=str)
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = text
            while self.max_entries is not None and len(self._items) > self.max_entries:
                self._items.popitem(last=False)


class SqliteModelCache:
    """A cache in a SQLite file (table `keelgraph_model_cache`), shared by processes.

    Past `max_entries` the oldest entries go; with `ttl_s`, entries older than that are misses.
    A cache is an optimisation: `synchronous=NORMAL`, a lost last write costs one model call.

    >>> cache = SqliteModelCache(":memory:", max_entries=1)
    >>> cache.put("a", {"content": "1"}); cache.put("b", {"content": "2"})
    >>> cache.get("a"), cache.get("b")
    (None, {'content': '2'})
    """

    def __init__(
        self, path: str | Path, *, max_entries: int | None = 10_000, ttl_s: float | None = None
    ) -> None:
        self.path = str(path)
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._conn = connect(self.path, synchronous="NORMAL", autocommit=True)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute(
                """CREATE TABLE IF NOT EXISTS keelgraph_model_cache (
                    key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"""
            )
            self._conn.execute(
                "CREATE INDEX IF NOT EXISTS keelgraph_model_cache_created ON keelgraph_model_cache(created)"
            )

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT value, created FROM keelgraph_model_cache WHERE key = ?", (key,)
            ).fetchone()
        if row is None or (self.ttl_s is not None and time.time() - row[1] > self.ttl_s):
            return None
        return dict(json.loads(row[0]))

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        text = json.dumps(dict(value), default=str)
        with self._lock:
            self._conn.execute(
                "INSERT INTO keelgraph_model_cache (key, value, created) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value, created = excluded.created",
                (key, text, time.time()),
            )
            if self.max_entries is not None:
                self._conn.execute(
                    "DELETE FROM keelgraph_model_cache WHERE key IN (SELECT key FROM keelgraph_model_cache "
                    "ORDER BY created DESC, rowid DESC LIMIT -1 OFFSET ?)",
                    (self.max_entries,),
                )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
