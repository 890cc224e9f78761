"""Checkpointers and stores: a tuned SQLite file by default, PostgreSQL for several processes.

A *target* is a file path (SQLite) or a `postgresql://` URL. None means the configured one:
`KEELGRAPH_DATABASE_URL`, else `threads.db` / `store.db` under `KEELGRAPH_DATA_DIR`.

A store's *index* makes its items searchable by meaning (`store.search(ns, query=...)`): a LangGraph
`IndexConfig`, None (no index: the default), or "auto": `keelgraph.local.embeddings.index_config()`
(the offline embedding model) when the `memory` extra and its model are installed and the backend
can hold vectors, else none. On SQLite the vector index needs sqlite-vec, loaded through `pysqlite3`
(see `keelgraph.local.embeddings.vector_connect`); on PostgreSQL it needs the pgvector extension in
the server, which Debian 12's PostgreSQL 15 does not package: "auto" then opens the store without
an index, and `keelgraph.graphs.memory.recall` ranks memories in Python instead.
"""

from __future__ import annotations

import atexit
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlsplit

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.store.base import BaseStore, IndexConfig

from keelgraph._sqlite import connect, pragmas
from keelgraph.contracts.errors import UserError
from keelgraph.graphs.lease import AsyncLeasedSqliteSaver, LeasedSqliteSaver, LeasePolicy
from keelgraph.graphs.serde import StorableSerializer

if TYPE_CHECKING:
    import aiosqlite
    from psycopg import AsyncConnection, Connection
    from psycopg.rows import DictRow
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

__all__ = [
    "StorableSerializer",
    "StoreIndex",
    "async_checkpointer",
    "async_store",
    "checkpointer",
    "default_checkpointer",
    "default_store",
    "default_target",
    "sqlite_checkpointer",
    "store",
]

Kind = Literal["threads", "store"]
StoreIndex = IndexConfig | Literal["auto"] | None
"""A store's vector index: a LangGraph `IndexConfig`, "auto" (the offline model when installed), or None."""
_POSTGRES_SCHEMES = ("postgresql", "postgres")
# WAL plus NORMAL keeps every committed turn across a process crash and costs one fsync per
# checkpoint batch instead of several; the busy timeout lets several processes share the file.


def sqlite_checkpointer(path: str | Path, *, lease: LeasePolicy | None = None) -> SqliteSaver:
    """A `SqliteSaver` on `path` (created if needed) with WAL, a busy timeout and `synchronous=NORMAL`,
    that lets one run at a time write a thread (`keelgraph.graphs.lease`; `lease` defaults to the
    settings: `KEELGRAPH_THREAD_LEASE_S`, `KEELGRAPH_THREAD_WAIT_S`).

    WAL plus NORMAL keeps every committed turn across a process crash and costs one fsync per
    checkpoint batch instead of several; the busy timeout lets several processes share the file.

    >>> saver = sqlite_checkpointer(":memory:")
    """
    saver = LeasedSqliteSaver(_sqlite_connect(path), serde=StorableSerializer(), policy=lease)
    saver.setup()
    return saver


def default_target(kind: Kind = "threads", *, env: Mapping[str, str] | None = None) -> str | Path:
    """The configured target: `KEELGRAPH_DATABASE_URL`, else `$KEELGRAPH_DATA_DIR/{kind}.db`.

    >>> default_target("store", env={"KEELGRAPH_DATA_DIR": "/srv/kg"})
    PosixPath('/srv/kg/store.db')
    >>> default_target(env={"KEELGRAPH_DATABASE_URL": "postgresql://app@db/app"})
    'postgresql://app@db/app'
    """
    from keelgraph.settings import Settings

    settings = Settings.from_env(env)
    return settings.database_url or settings.data_dir / f"{kind}.db"


@asynccontextmanager
async def async_checkpointer(
    target: str | Path | None = None, *, lease: LeasePolicy | None = None
) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    """An async checkpointer, set up and closed on exit: on a file, `sqlite_checkpointer`'s saver
    with each call run whole on a worker thread of its own (`lease.AsyncLeasedSqliteSaver`); for a
    `postgresql://` URL an `AsyncPostgresSaver` on a connection pool. Either lets one run at a time
    write a thread (`keelgraph.graphs.lease`).

    >>> import asyncio, tempfile
    >>> async def main(path: str) -> str:
    ...     async with async_checkpointer(path) as saver:
    ...         return type(saver).__name__
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     asyncio.run(main(f"{tmp}/threads.db"))
    'AsyncLeasedSqliteSaver'
    """
    backend, where = _resolve(target, "threads")
    if backend == "sqlite":
        conn = _sqlite_connect(where)
        saver = AsyncLeasedSqliteSaver(conn, serde=StorableSerializer(), policy=lease)
        try:
            await saver._run(saver.setup)
            yield saver
        finally:
            saver.close()
            conn.close()
        return
    from keelgraph.graphs._postgres_lease import AsyncLeasedPostgresSaver

    async with _async_pool(where) as pool:
        postgres = AsyncLeasedPostgresSaver(pool, serde=StorableSerializer(), policy=lease)
        async with _async_setup_lock(pool):
            await postgres.setup()
        yield postgres


@contextmanager
def checkpointer(
    target: str | Path | None = None, *, lease: LeasePolicy | None = None
) -> Iterator[BaseCheckpointSaver[Any]]:
    """The sync twin of `async_checkpointer`: `sqlite_checkpointer` or a `PostgresSaver`, closed on
    exit; either lets one run at a time write a thread (`keelgraph.graphs.lease`).

    >>> with checkpointer(":memory:") as saver:
    ...     type(saver).__name__
    'LeasedSqliteSaver'
    """
    backend, where = _resolve(target, "threads")
    if backend == "sqlite":
        saver = sqlite_checkpointer(where, lease=lease)
        try:
            yield saver
        finally:
            saver.conn.close()
        return
    from keelgraph.graphs._postgres_lease import LeasedPostgresSaver

    with _pool(where) as pool:
        postgres = LeasedPostgresSaver(pool, serde=StorableSerializer(), policy=lease)
        with _setup_lock(pool):
            postgres.setup()
        yield postgres


@asynccontextmanager
async def async_store(
    target: str | Path | None = None, *, index: StoreIndex = None
) -> AsyncIterator[BaseStore]:
    """A long-term memory store, set up and closed on exit: `AsyncSqliteStore` on a file (tuned as
    `sqlite_checkpointer`) or `AsyncPostgresStore` for a `postgresql://` URL, with `index` as the
    module says (None: no vector index).

    >>> import asyncio
    >>> async def main() -> dict[str, object] | None:
    ...     async with async_store(":memory:") as store:
    ...         await store.aput(("user-1", "prefs"), "lang", {"value": "fr"})
    ...         item = await store.aget(("user-1", "prefs"), "lang")
    ...         return item.value if item else None
    >>> asyncio.run(main())
    {'value': 'fr'}
    """
    backend, where = _resolve(target, "store")
    config = _index(index, backend)
    if backend == "sqlite":
        from langgraph.store.sqlite.aio import AsyncSqliteStore

        opened = _aiosqlite_vectors(where) if config else _aiosqlite_connect(where, autocommit=True)
        async with opened as conn:
            sqlite_store = AsyncSqliteStore(conn, index=cast("Any", config))
            await sqlite_store.setup()
            yield sqlite_store
        return
    from langgraph.store.postgres.aio import AsyncPostgresStore

    async with _async_pool(where) as pool:
        if config:
            async with pool.connection() as pg:
                rows = await (await pg.execute(_HAS_PGVECTOR)).fetchall()
            config = _pg_index(config, bool(rows), index, where)
        postgres = AsyncPostgresStore(pool, index=cast("Any", config))
        async with _async_setup_lock(pool):
            await postgres.setup()
        yield postgres


@contextmanager
def store(target: str | Path | None = None, *, index: StoreIndex = None) -> Iterator[BaseStore]:
    """The sync twin of `async_store`: `SqliteStore` or `PostgresStore`, closed on exit.

    >>> with store(":memory:") as memory:
    ...     memory.put(("user-1", "prefs"), "lang", {"value": "fr"})
    ...     [item.key for item in memory.search(("user-1",))]
    ['lang']
    """
    backend, where = _resolve(target, "store")
    config = _index(index, backend)
    if backend == "sqlite":
        from langgraph.store.sqlite import SqliteStore

        if config:
            from keelgraph.graphs.memory import vector_connect

            conn = vector_connect(where)
        else:
            conn = _sqlite_connect(where, autocommit=True)
        try:
            sqlite_store = SqliteStore(conn, index=cast("Any", config))
            sqlite_store.setup()
            yield sqlite_store
        finally:
            conn.close()
        return
    from langgraph.store.postgres import PostgresStore

    with _pool(where) as pool:
        if config:
            with pool.connection() as pg:
                has_pgvector = bool(pg.execute(_HAS_PGVECTOR).fetchall())
            config = _pg_index(config, has_pgvector, index, where)
        postgres = PostgresStore(pool, index=cast("Any", config))
        with _setup_lock(pool):
            postgres.setup()
        yield postgres


_OPENED = contextlib.ExitStack()
atexit.register(_OPENED.close)


def default_checkpointer() -> BaseCheckpointSaver[Any]:
    """The checkpointer of `build_graph(checkpointer="default")`, open for the process's lifetime:
    `KEELGRAPH_DATABASE_URL` (PostgreSQL, a connection pool) or `$KEELGRAPH_DATA_DIR/threads.db`."""
    return _OPENED.enter_context(checkpointer())


def default_store() -> BaseStore:
    """The store that goes with `default_checkpointer()` (threads' archives, long-term memory),
    open for the process's lifetime: PostgreSQL or `$KEELGRAPH_DATA_DIR/store.db`, with the
    offline vector index when the memory extra is installed (`index="auto"`)."""
    return _OPENED.enter_context(store(index="auto"))


_HAS_PGVECTOR = "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'"


def _index(index: StoreIndex, backend: Literal["sqlite", "postgres"]) -> IndexConfig | None:
    """The index to open a store with: "auto" is the offline model's when everything it needs is here."""
    if index != "auto":
        return index
    from keelgraph.graphs import memory

    if not memory.memory_available() or (backend == "sqlite" and not memory.sqlite_vectors_available()):
        return None
    return memory.index_config()


def _pg_index(config: IndexConfig, has_pgvector: bool, asked: StoreIndex, url: str) -> IndexConfig | None:
    if has_pgvector:
        return config
    if asked == "auto":  # recall ranks the vectors kept in the items instead (keelgraph.graphs.memory)
        return None
    from keelgraph.graphs.memory import MemoryUnavailable

    raise MemoryUnavailable(
        f"the PostgreSQL server at {_redact(url)} has no pgvector extension, which a store index needs: "
        "install it in the server (the postgresql-NN-pgvector package), or open the store with "
        "index=None or 'auto' (keelgraph.graphs.memory.recall then ranks memories in Python)"
    )


def _resolve(target: str | Path | None, kind: Kind) -> tuple[Literal["sqlite", "postgres"], str]:
    """("sqlite", path) or ("postgres", url); a URL of any other scheme is refused."""
    if target is None:
        target = default_target(kind)
    if isinstance(target, Path):
        where = str(target)
    elif "://" in target:
        scheme = target.split("://", 1)[0].lower()
        if scheme in _POSTGRES_SCHEMES:
            _require_postgres()
            return "postgres", target
        raise UserError(
            f"cannot store {kind} at a {scheme}:// URL: use a postgresql:// URL or a SQLite file path"
        )
    else:
        where = target
    return "sqlite", where


def _require_postgres() -> None:
    try:
        import langgraph.checkpoint.postgres
        import langgraph.store.postgres  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        from keelgraph.settings import install_hint

        raise UserError(
            f"PostgreSQL persistence needs the postgres extra ({exc.name} is missing): "
            + install_hint("postgres")
        ) from None


def _sqlite_connect(path: str | Path, *, autocommit: bool = False) -> sqlite3.Connection:
    """A tuned connection; the stores expect autocommit (`isolation_level=None`), the savers not."""
    return connect(path, synchronous="NORMAL", autocommit=autocommit)


@asynccontextmanager
async def _aiosqlite_connect(path: str, *, autocommit: bool = False) -> AsyncIterator[aiosqlite.Connection]:
    import aiosqlite

    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    autocommits: dict[str, Any] = {"isolation_level": None} if autocommit else {}
    async with aiosqlite.connect(path, timeout=30.0, **autocommits) as conn:
        for pragma in pragmas():
            await conn.execute(pragma)
        yield conn


@asynccontextmanager
async def _aiosqlite_vectors(path: str) -> AsyncIterator[aiosqlite.Connection]:
    """An aiosqlite connection over `keelgraph.local.embeddings.vector_connect`: sqlite-vec loadable."""
    import aiosqlite

    from keelgraph.graphs.memory import vector_connector

    async with aiosqlite.Connection(vector_connector(path), iter_chunk_size=64) as conn:
        yield conn


_PG_KWARGS: dict[str, Any] = {"autocommit": True, "prepare_threshold": 0}
_CONNECT_TIMEOUT_S = 10


@asynccontextmanager
async def _async_pool(url: str) -> AsyncIterator[AsyncConnectionPool[AsyncConnection[DictRow]]]:
    """A pool as LangGraph's savers expect it (autocommit, dict rows); connections are checked
    before use, so a restarted database costs a reconnect instead of a failed run."""
    import psycopg
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    try:  # one direct connection first: a pool would retry a bad URL until its timeout, silently
        await (await psycopg.AsyncConnection.connect(url, connect_timeout=_CONNECT_TIMEOUT_S)).close()
    except psycopg.Error as exc:
        raise UserError(_unreachable(url, exc)) from None
    pool = cast(
        "AsyncConnectionPool[AsyncConnection[DictRow]]",
        AsyncConnectionPool(
            url,
            min_size=1,
            max_size=10,
            kwargs={**_PG_KWARGS, "row_factory": dict_row},
            check=AsyncConnectionPool.check_connection,
            open=False,
        ),
    )
    await pool.open(wait=True, timeout=_CONNECT_TIMEOUT_S)
    try:
        yield pool
    finally:
        await pool.close()


@contextmanager
def _pool(url: str) -> Iterator[ConnectionPool[Connection[DictRow]]]:
    import psycopg
    from psycopg.rows import dict_row
    from psycopg_pool import ConnectionPool

    try:
        psycopg.connect(url, connect_timeout=_CONNECT_TIMEOUT_S).close()
    except psycopg.Error as exc:
        raise UserError(_unreachable(url, exc)) from None
    pool = cast(
        "ConnectionPool[Connection[DictRow]]",
        ConnectionPool(
            url,
            min_size=1,
            max_size=10,
            kwargs={**_PG_KWARGS, "row_factory": dict_row},
            check=ConnectionPool.check_connection,
            open=False,
        ),
    )
    pool.open(wait=True, timeout=_CONNECT_TIMEOUT_S)
    try:
        yield pool
    finally:
        pool.close()


# LangGraph's setup() runs its migrations unguarded: replicas starting together on a fresh database
# failed with UniqueViolation (6 concurrent setups, 5 of 5 tries). One advisory lock serialises them.
# It is polled, not awaited: a session blocked in pg_advisory_lock() holds a snapshot, and the
# migrations' CREATE INDEX CONCURRENTLY waits for every snapshot, so a blocking wait deadlocks.
_SETUP_LOCK = 0x6B65656C67726170  # "keelgrap"
_TRY_LOCK = "SELECT pg_try_advisory_lock(%s) AS got"
_POLL_S = 0.05


@asynccontextmanager
async def _async_setup_lock(pool: AsyncConnectionPool[AsyncConnection[DictRow]]) -> AsyncIterator[None]:
    import asyncio

    async with pool.connection() as conn:
        while not (await (await conn.execute(_TRY_LOCK, (_SETUP_LOCK,))).fetchall())[0]["got"]:
            await asyncio.sleep(_POLL_S)
        try:
            yield
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_SETUP_LOCK,))


@contextmanager
def _setup_lock(pool: ConnectionPool[Connection[DictRow]]) -> Iterator[None]:
    import time

    with pool.connection() as conn:
        while not conn.execute(_TRY_LOCK, (_SETUP_LOCK,)).fetchall()[0]["got"]:
            time.sleep(_POLL_S)
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_SETUP_LOCK,))


def _unreachable(url: str, error: Exception) -> str:
    reason = " ".join(str(error).split())
    return f"could not connect to PostgreSQL at {_redact(url)}: {reason}"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()
