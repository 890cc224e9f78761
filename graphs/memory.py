"""Long-term memory across the threads of one user: an offline embedding model and a typed API.

A user's memories are items in the graph's LangGraph store under `memory_namespace(user)`, so every
thread of that user (and every process on the same store) sees them. Recall is semantic:

- the embedding model is all-MiniLM-L6-v2 (384 dimensions), run in NumPy offline
  (`keelgraph.local.embeddings`); `embed_texts` is the `embed` of a LangGraph store index.
- SQLite: `keelgraph.graphs.persistence.store(path, index="auto")` opens the file through a SQLite
  that loads sqlite-vec (`keelgraph.local.embeddings.vector_connect`), so the vector index works with
  no step on the user's side.
- PostgreSQL: `PostgresStore`'s vector index needs the pgvector extension in the server. Debian 12's
  PostgreSQL 15 has no pgvector package, so the store is opened without an index when the server
  lacks it (`persistence.store(url, index="auto")` checks), and `recall` ranks the user's memories
  itself from the vectors `remember` keeps in each item. Same results, computed in Python; fine for
  the few hundred memories a user keeps (`max_items`).
- With no embedding model at all (the extra not installed), `recall` ranks by shared words.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from langgraph.store.base import BaseStore, Item, SearchItem

from keelgraph.contracts.errors import UserError
from keelgraph.local.embeddings import (
    DIMS,
    EMBEDDING_MODEL,
    MemoryUnavailable,
    MiniLM,
    embed_texts,
    embedder,
    fetch_embedding_model,
    index_config,
    memory_available,
    packages_installed,
    sqlite_vectors_available,
    vector_connect,
    vector_connector,
)
from keelgraph.tools.identity import INTERNAL_ROOT, namespace_label

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "DIMS",
    "EMBEDDING_MODEL",
    "Memory",
    "MemoryUnavailable",
    "MiniLM",
    "embed_texts",
    "embedder",
    "fetch_embedding_model",
    "forget",
    "index_config",
    "memories",
    "memory_available",
    "memory_namespace",
    "recall",
    "remember",
    "sqlite_vectors_available",
    "vector_connect",
    "vector_connector",
]

_MAX_TEXT = 500
_DUPLICATE = 0.85
# -- the memory API -----------------------------------------------------------------------------


def memory_namespace(user: str | int) -> tuple[str, ...]:
    """Where one user's memories live in the store: under keelgraph's reserved root, which no
    user's own namespaces can reach (see `keelgraph.tools.identity.RESERVED_ROOTS`), one label per
    user (periods encoded: store labels cannot hold them).

    >>> memory_namespace(42)
    ('keelgraph', 'memory', '42')
    """
    text = str(user).strip()
    if not text:
        raise UserError("a memory needs a user: pass a non-empty user id")
    return (INTERNAL_ROOT, "memory", namespace_label(text))


@dataclass(frozen=True)
class Memory:
    """One thing a user told us, as `recall` and `memories` return it."""

    key: str
    text: str
    kind: str
    score: float | None
    """Similarity to the query (cosine, or shared words without the model); None outside a search."""
    created_at: datetime
    updated_at: datetime


def _normal(text: str) -> str:
    return " ".join(text.split())


def _key(kind: str, text: str) -> str:
    folded = re.sub(r"[^\w]+", " ", text.lower()).strip()
    return hashlib.sha256(f"{kind}\n{folded}".encode()).hexdigest()[:24]


def _indexed(store: BaseStore) -> bool:
    """Whether the store embeds and searches by itself (a LangGraph store given an `index`)."""
    return bool(getattr(store, "index_config", None))


def _model_or_none() -> MiniLM | None:
    if not packages_installed():
        return None
    return embedder()


def _pack(vector: npt.NDArray[np.float32]) -> str:
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _unpack(text: str) -> npt.NDArray[np.float32]:
    import numpy as np

    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def _memory(item: Item | SearchItem, score: float | None = None) -> Memory:
    found = getattr(item, "score", None) if score is None else score
    return Memory(
        key=item.key,
        text=str(item.value.get("text", "")),
        kind=str(item.value.get("kind", "")),
        score=None if found is None else float(found),
        created_at=item.created_at,
        updated_at=item.updated_at,
    )


def _all(store: BaseStore, namespace: tuple[str, ...]) -> list[Item]:
    items: list[Item] = []
    while True:
        page = store.search(namespace, limit=500, offset=len(items))
        items.extend(page)
        if len(page) < 500:
            return items


def remember(
    store: BaseStore, user: str | int, text: str, *, kind: str = "preference", max_items: int = 200
) -> Memory:
    """Keep `text` for `user`, for every later thread; returns what is kept.

    The same fact is kept once: a memory of the same kind with the same words (case, spacing and
    punctuation aside), or reworded (cosine >= 0.85 with the embedding model), is replaced by the
    new one. A user keeps at most `max_items` memories; past that the least recently updated go.

    >>> from langgraph.store.memory import InMemoryStore
    >>> store = InMemoryStore()
    >>> _ = remember(store, 7, "Please contact me by email, not phone")
    >>> _ = remember(store, 7, "please contact me by email - not phone!")
    >>> [m.text for m in memories(store, 7)]
    ['please contact me by email - not phone!']
    """
    text = _normal(text)[:_MAX_TEXT]
    if not text:
        raise UserError("remember() needs some text to keep")
    if max_items < 1:
        raise UserError("max_items must be >= 1")
    namespace = memory_namespace(user)
    key = _key(kind, text)
    # `at` orders memories finer than the stores' timestamps (SQLite's are whole seconds).
    value: dict[str, Any] = {"text": text, "kind": kind, "at": time.time()}
    model = _model_or_none()
    if model is not None:
        # An indexed store embeds by itself (the search below and the put): no vector of ours.
        vector = None if _indexed(store) else model.embed([text])[0]
        if vector is not None:
            value["vector"] = _pack(vector)  # recall ranks these itself (a store without an index)
        for near in _ranked(store, namespace, vector, limit=3, kind=kind, query=text):
            if near.key != key and (near.score or 0.0) >= _DUPLICATE:
                store.delete(namespace, near.key)
    store.put(namespace, key, value, index=["text"])
    if store.search(namespace, limit=1, offset=max_items):  # one more than allowed: read them all
        kept = _all(store, namespace)
        for item in sorted(kept, key=_age)[: max(0, len(kept) - max_items)]:
            store.delete(namespace, item.key)
    got = store.get(namespace, key)
    assert got is not None
    return _memory(got)


def _ranked(
    store: BaseStore,
    namespace: tuple[str, ...],
    vector: npt.NDArray[np.float32] | None,
    *,
    limit: int,
    kind: str | None,
    query: str | None = None,
) -> list[Memory]:
    """The nearest memories to `vector`: by the store's index when it has one, else in NumPy."""
    import numpy as np

    where = {"kind": kind} if kind else None
    if _indexed(store) and query is not None:
        return [_memory(i) for i in store.search(namespace, query=query, filter=where, limit=limit)]
    if vector is None:
        return []
    scored: list[Memory] = []
    for item in _all(store, namespace):
        if kind and item.value.get("kind") != kind:
            continue
        packed = item.value.get("vector")
        if not isinstance(packed, str):
            continue
        scored.append(_memory(item, float(np.dot(_unpack(packed), vector))))
    return sorted(scored, key=lambda m: -(m.score or 0.0))[:limit]


def _age(item: Item) -> tuple[float, float]:
    return (float(item.value.get("at", 0.0)), item.updated_at.timestamp())


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2}


def recall(
    store: BaseStore,
    user: str | int,
    query: str,
    *,
    limit: int = 5,
    kind: str | None = None,
    min_score: float | None = None,
) -> list[Memory]:
    """`user`'s memories nearest in meaning to `query`, best first, each with its `score`.

    Semantic with the embedding model (the store's vector index, or the vectors `remember` kept);
    without the model, by shared words. `min_score` drops weaker matches.
    """
    namespace = memory_namespace(user)
    if limit < 1:
        return []
    model = _model_or_none()
    if model is not None:
        vector = None if _indexed(store) else model.embed([query])[0]
        found = _ranked(store, namespace, vector, limit=limit, kind=kind, query=query)
        if not found and not _indexed(store):
            found = _lexical(store, namespace, query, limit=limit, kind=kind)  # kept without vectors
    else:
        found = _lexical(store, namespace, query, limit=limit, kind=kind)
    return [m for m in found if min_score is None or (m.score or 0.0) >= min_score]


def _lexical(
    store: BaseStore, namespace: tuple[str, ...], query: str, *, limit: int, kind: str | None
) -> list[Memory]:
    asked = _words(query)
    scored = []
    for item in _all(store, namespace):
        if kind and item.value.get("kind") != kind:
            continue
        words = _words(str(item.value.get("text", "")))
        overlap = len(asked & words) / math.sqrt(max(len(asked), 1) * max(len(words), 1))
        scored.append(_memory(item, overlap))
    return sorted(scored, key=lambda m: -(m.score or 0.0))[:limit]


def memories(store: BaseStore, user: str | int, *, kind: str | None = None) -> list[Memory]:
    """Everything kept for `user`, most recently updated first."""
    items = sorted(_all(store, memory_namespace(user)), key=_age, reverse=True)
    return [_memory(i) for i in items if kind is None or i.value.get("kind") == kind]


def forget(store: BaseStore, user: str | int, key: str | None = None) -> int:
    """Delete one memory of `user` by key, or all of them (`key=None`); returns how many went."""
    namespace = memory_namespace(user)
    keys = [key] if key is not None else [i.key for i in _all(store, namespace)]
    for one in keys:
        store.delete(namespace, one)
    return len(keys)
