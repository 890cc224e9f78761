"""`LeasedPostgresSaver` and its async twin: `keelgraph.graphs.lease` on PostgreSQL (the postgres extra)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import ChannelVersions, Checkpoint, CheckpointMetadata, CheckpointTuple
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

from keelgraph.graphs.lease import (
    _LATEST,
    LeasePolicy,
    _claimed,
    _entry,
    _hold,
    _Lease,
    _needs_latest,
    _Row,
    _Unknown,
)

if TYPE_CHECKING:
    from psycopg import AsyncConnection, AsyncCursor, Connection, Cursor
    from psycopg.rows import DictRow
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

__all__ = ["AsyncLeasedPostgresSaver", "LeasedPostgresSaver"]

_PG_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS keelgraph_thread_leases "
    "(thread_id TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL, released_on TEXT)"
)
_PG_ENSURE = (
    "INSERT INTO keelgraph_thread_leases (thread_id, owner, expires_at) VALUES (%s, '', 0) "
    "ON CONFLICT (thread_id) DO NOTHING"
)
_PG_NOW = "extract(epoch FROM clock_timestamp())::float8"
_PG_ROW = f"SELECT owner, expires_at, released_on, {_PG_NOW} AS now FROM keelgraph_thread_leases WHERE thread_id = %s"
_PG_SET = (
    "UPDATE keelgraph_thread_leases SET owner = %s, expires_at = %s, released_on = %s WHERE thread_id = %s"
)


class LeasedPostgresSaver(PostgresSaver):
    """LangGraph's `PostgresSaver` with a lease per thread; the lease row is locked (`FOR UPDATE`)
    by the transaction that checks it and writes the checkpoint, and time is the server's clock.

    Takes a connection pool (or one connection), not a pipeline.
    """

    def __init__(
        self,
        conn: Connection[DictRow] | ConnectionPool[Connection[DictRow]],
        *,
        policy: LeasePolicy | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn, **kwargs)
        self.policy = policy or LeasePolicy.from_settings()
        self._lease = _Lease(self.policy)

    def setup(self) -> None:
        super().setup()
        with self._cursor() as cur:
            cur.execute(_PG_SCHEMA)

    @contextmanager
    def _cursor(self, *, pipeline: bool = False) -> Iterator[Cursor[DictRow]]:
        cur: Cursor[DictRow] | None = self._lease.fenced_cursor()
        if cur is not None:
            yield cur  # inside `_fenced`: its lock and transaction are already held
            return
        with super()._cursor(pipeline=pipeline) as own:
            yield own

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        if entry := _entry(config):
            thread, addressed, durability = entry
            owner = self._lease.claim(
                lambda owner, hold_s: self._try_claim(thread, owner, hold_s),
                thread,
                self.policy.claim_hold(durability),
            )
            _claimed(config, thread, owner, addressed)
        return super().get_tuple(config)

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        with self._fenced(config, checkpoint=checkpoint):
            return super().put(config, checkpoint, metadata, new_versions)

    def put_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        with self._fenced(config, writes=writes):
            super().put_writes(config, writes, task_id, task_path)

    @contextmanager
    def _transaction(self) -> Iterator[Cursor[DictRow]]:
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        with (
            self.lock,
            _connection(self.conn, ConnectionPool) as conn,
            conn.transaction(),
            conn.cursor(binary=True, row_factory=dict_row) as cur,
        ):
            yield cur

    def _try_claim(self, thread: str, owner: str, hold_s: float) -> float | None:
        with self._transaction() as cur:
            cur.execute(_PG_ENSURE, (thread,))
            found = cur.execute(_PG_ROW + " FOR UPDATE", (thread,)).fetchone()
            assert found is not None  # ensured above, in this transaction
            now = float(found["now"])
            row = _row(found)
            left = self._lease.busy_for(row, owner, now)
            if left is None:
                cur.execute(_PG_SET, (owner, now + hold_s, None, thread))
        return left

    @contextmanager
    def _fenced(
        self,
        config: RunnableConfig,
        *,
        checkpoint: Checkpoint | None = None,
        writes: Sequence[tuple[str, Any]] = (),
    ) -> Iterator[None]:
        thread = str(config["configurable"]["thread_id"])
        held = _hold(config, thread) is not None
        with self._transaction() as cur:
            # A run's writes lock its lease row; a writer without a lease only looks at it.
            found = cur.execute(_PG_ROW + (" FOR UPDATE" if held else ""), (thread,)).fetchone()
            if found is None:  # never claimed: only a writer without a lease gets past `fence`
                now, row = time.time(), None
            else:
                now, row = float(found["now"]), _row(found)
            latest: str | type[_Unknown] | None = _Unknown
            if _needs_latest(config, thread, checkpoint, writes):
                top = cur.execute(_LATEST.format(p="%s"), (thread,)).fetchone()
                latest = top["checkpoint_id"] if top else None
            after = self._lease.fence(row, config, now, latest=latest, checkpoint=checkpoint, writes=writes)
            with self._lease.fencing(cur):
                yield
            if after is not None:
                cur.execute(_PG_SET, (*after, thread))


@contextmanager
def _connection(conn: Any, pool_type: type[Any]) -> Iterator[Any]:
    """A connection from `conn`: a pool's (returned on exit) or `conn` itself."""
    if isinstance(conn, pool_type):
        with conn.connection() as pooled:
            yield pooled
    else:
        yield conn


def _row(found: DictRow) -> _Row:
    return _Row(found["owner"], float(found["expires_at"]), found["released_on"])


class AsyncLeasedPostgresSaver(AsyncPostgresSaver):
    """The async twin of `LeasedPostgresSaver` (`keelgraph.graphs.persistence.async_checkpointer`)."""

    def __init__(
        self,
        conn: AsyncConnection[DictRow] | AsyncConnectionPool[AsyncConnection[DictRow]],
        *,
        policy: LeasePolicy | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn, **kwargs)
        self.policy = policy or LeasePolicy.from_settings()
        self._lease = _Lease(self.policy)

    async def setup(self) -> None:
        await super().setup()
        async with self._cursor() as cur:
            await cur.execute(_PG_SCHEMA)

    @asynccontextmanager
    async def _cursor(self, *, pipeline: bool = False) -> AsyncIterator[AsyncCursor[DictRow]]:
        cur: AsyncCursor[DictRow] | None = self._lease.fenced_cursor()
        if cur is not None:
            yield cur  # inside `_fenced`: its lock and transaction are already held
            return
        async with super()._cursor(pipeline=pipeline) as own:
            yield own

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        if entry := _entry(config):
            thread, addressed, durability = entry
            owner = await self._lease.aclaim(
                lambda owner, hold_s: self._try_claim(thread, owner, hold_s),
                thread,
                self.policy.claim_hold(durability),
            )
            _claimed(config, thread, owner, addressed)
        return await super().aget_tuple(config)

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        async with self._fenced(config, checkpoint=checkpoint):
            return await super().aput(config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        async with self._fenced(config, writes=writes):
            await super().aput_writes(config, writes, task_id, task_path)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncCursor[DictRow]]:
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        async with (
            self.lock,
            _aconnection(self.conn, AsyncConnectionPool) as conn,
            conn.transaction(),
            conn.cursor(binary=True, row_factory=dict_row) as cur,
        ):
            yield cur

    async def _try_claim(self, thread: str, owner: str, hold_s: float) -> float | None:
        async with self._transaction() as cur:
            await cur.execute(_PG_ENSURE, (thread,))
            found = await (await cur.execute(_PG_ROW + " FOR UPDATE", (thread,))).fetchone()
            assert found is not None  # ensured above, in this transaction
            now = float(found["now"])
            left = self._lease.busy_for(_row(found), owner, now)
            if left is None:
                await cur.execute(_PG_SET, (owner, now + hold_s, None, thread))
        return left

    @asynccontextmanager
    async def _fenced(
        self,
        config: RunnableConfig,
        *,
        checkpoint: Checkpoint | None = None,
        writes: Sequence[tuple[str, Any]] = (),
    ) -> AsyncIterator[None]:
        thread = str(config["configurable"]["thread_id"])
        held = _hold(config, thread) is not None
        async with self._transaction() as cur:
            found = await (await cur.execute(_PG_ROW + (" FOR UPDATE" if held else ""), (thread,))).fetchone()
            if found is None:  # never claimed: only a writer without a lease gets past `fence`
                now, row = time.time(), None
            else:
                now, row = float(found["now"]), _row(found)
            latest: str | type[_Unknown] | None = _Unknown
            if _needs_latest(config, thread, checkpoint, writes):
                top = await (await cur.execute(_LATEST.format(p="%s"), (thread,))).fetchone()
                latest = top["checkpoint_id"] if top else None
            after = self._lease.fence(row, config, now, latest=latest, checkpoint=checkpoint, writes=writes)
            with self._lease.fencing(cur):
                yield
            if after is not None:
                await cur.execute(_PG_SET, (*after, thread))


@asynccontextmanager
async def _aconnection(conn: Any, pool_type: type[Any]) -> AsyncIterator[Any]:
    """The async twin of `_connection`."""
    if isinstance(conn, pool_type):
        async with conn.connection() as pooled:
            yield pooled
    else:
        yield conn
