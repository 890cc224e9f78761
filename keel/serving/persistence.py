"""Persistence for graphs served by LangGraph server: `langgraph.json` names these factories.

The server owns the checkpointer and store of the graphs it serves (a graph compiled with its own
is refused). keelgraph's are the same backends the library uses in process
(`keelgraph.graphs.persistence`):

- `KEELGRAPH_DATABASE_URL` unset: SQLite files in `$KEELGRAPH_DATA_DIR` (`threads.db` for
  checkpoints, `store.db` for long-term memory), WAL with a busy timeout;
- `KEELGRAPH_DATABASE_URL=postgresql://...`: PostgreSQL for both, shared by every server process
  pointed at it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.store.base import BaseStore

from keelgraph.graphs.persistence import async_checkpointer, async_store

__all__ = ["checkpointer", "store"]


@asynccontextmanager
async def checkpointer() -> AsyncIterator[BaseCheckpointSaver[Any]]:
    """The served graphs' checkpointer (`"checkpointer": {"path": "./keel/serving/persistence.py:checkpointer"}`)."""
    async with async_checkpointer() as saver:
        yield saver


@asynccontextmanager
async def store() -> AsyncIterator[BaseStore]:
    """The served graphs' long-term store (`"store": {"path": "./keel/serving/persistence.py:store"}`), searchable
    by meaning when the memory extra is installed (`index="auto"`, see `keelgraph.graphs.memory`)."""
    async with async_store(index="auto") as opened:
        yield opened
