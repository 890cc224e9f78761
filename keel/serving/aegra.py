"""Serving langgraph.json's graphs on Aegra replicas that share one PostgreSQL (`keelgraph serve --engine aegra`).

Aegra (`aegra-api`, Apache-2.0) is an open server of the same Agent Server API as LangGraph server:
`langgraph_sdk` talks to it unchanged. Every replica keeps threads, runs and assistants in
PostgreSQL and runs the runs it is asked for in its own process, so any replica can read, run and
resume any thread. keelgraph adds what Aegra 0.6.0 (the last release for Python 3.11) leaves out:

- **keelgraph's persistence**: the replicas' checkpointer and store are keelgraph's
  (`keelgraph.serving.persistence`, on `KEELGRAPH_DATABASE_URL`): a run leases its thread, so a
  second writer waits `KEELGRAPH_THREAD_WAIT_S` and then fails with `ThreadBusy` instead of hiding a
  turn (Aegra itself lets two runs on one thread write at once).
- **keelgraph's auth** (`keelgraph.serving.auth`), adapted: Aegra calls the auth rules for thread
  and store requests, but not when a run is created through `/runs/wait` or `/runs/stream`, and it
  never checks that a run's thread belongs to its caller. `GuardRuns` (this module's custom app
  middleware) applies keelgraph's thread rules to every run and state write, as LangGraph server
  describes them, answers 404 for another user's thread, and refuses a request that names the
  server's user (`langgraph_auth_user`), which Aegra would otherwise pass to the graph.
- **A replica that died mid-run** leaves its thread marked busy in Aegra's records forever. Before
  a new run on such a thread, the guard looks at the thread's lease: when no live run holds it, the
  thread's status is set from its last checkpoint (interrupted, or idle) and the dead runs are
  marked as errors, so the thread is resumable on another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from fastapi import FastAPI
from langgraph_sdk import Auth
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keelgraph.contracts.errors import UserError
from keelgraph.local.processes import free_port, port_free, start_helper, stop_group
from keelgraph.serving import auth as keel_auth
from keelgraph.serving.serve import _interrupt, serve_env
from keelgraph.settings import install_hint
from keelgraph.tools.identity import IDENTITY_KEY, SERVER_PERMISSIONS_KEY, SERVER_USER_KEY

__all__ = [
    "AEGRA_VERSION",
    "AegraServer",
    "GuardRuns",
    "Replicas",
    "aegra_config",
    "aegra_env",
    "app",
    "auth",
    "run",
    "write_aegra_config",
]

AEGRA_VERSION = "0.6.0"
"""The Aegra release keelgraph is tested with (0.7 and later need Python >= 3.12)."""
NAMES_SERVER_USER = (
    "a request cannot name the server's user ({key!r}): the graph acts for the user of your token; remove it"
)
NOT_FOUND = "Thread '{thread_id}' not found"
DEAD_RUN = "the replica running this run stopped before it ended (its thread's lease is free)"
CONTINUE: dict[str, Any] = {"__keelgraph_continue__": True}
"""The input the guard gives Aegra for a run without input; the replica runs it as `None`."""
_RUN_PATHS = ("runs", "runs/wait", "runs/stream")


def _absolute(root: Path, spec: str) -> str:
    path, _, attr = spec.rpartition(":")
    if "/" not in path and not path.endswith(".py"):
        return spec  # a module path (package.module:attr) stays as it is
    return f"{(root / path).resolve()}:{attr}"


def aegra_config(
    base: Path, *, graphs: Mapping[str, str] | None = None, extra_graphs: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Aegra's config (`aegra.json`) for the graphs of the `langgraph.json` at `base`.

    The same graph definitions, every path made absolute; keelgraph's auth adapted to Aegra
    (`keelgraph.serving.aegra:auth`) and its guard (`keelgraph.serving.aegra:app`). Aegra ignores
    `checkpointer` and `store`: the guard's app puts keelgraph's own in place at startup.
    """
    root = base.resolve().parent
    source = json.loads(base.read_text())
    chosen = dict(graphs) if graphs is not None else dict(source["graphs"])
    chosen.update(extra_graphs or {})
    return {
        "dependencies": [str(root / d) if d.startswith(".") else d for d in source.get("dependencies", [])],
        "graphs": {name: _absolute(root, spec) for name, spec in chosen.items()},
        "auth": {"path": "keelgraph.serving.aegra:auth"},
        "http": {"app": "keelgraph.serving.aegra:app"},
        "env": source.get("env", {}),
    }


def write_aegra_config(folder: Path, base: Path, **kwargs: Any) -> Path:
    """`aegra_config(base, **kwargs)` written to `folder/aegra.json`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "aegra.json"
    out.write_text(json.dumps(aegra_config(base, **kwargs), indent=2) + "\n")
    return out


def plain_database_url(url: str) -> str:
    """`url` without its query (`?sslmode=disable`): Aegra 0.6.0 hands the query to asyncpg, which
    refuses libpq's options."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def aegra_env(
    database_url: str,
    config: Path,
    base: Mapping[str, str] | None = None,
    *,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one replica: offline (`serve_env`), Aegra's database and config, and
    keelgraph's persistence on the same PostgreSQL."""
    env = serve_env(base)
    env.update(
        {
            "AEGRA_CONFIG": str(config),
            "DATABASE_URL": plain_database_url(database_url),
            "KEELGRAPH_DATABASE_URL": database_url,
            "OTEL_TARGETS": "",
            "OTEL_SDK_DISABLED": "true",
            "LOG_LEVEL": env.get("LOG_LEVEL", "WARNING"),
        }
    )
    env.update(json.loads(config.read_text()).get("env", {}))
    env.update(extra or {})
    return env


# --- auth: keelgraph's rules, adapted to how Aegra calls them ----------------------------------------

auth = Auth()
"""keelgraph's auth for Aegra (`"auth": {"path": "keelgraph.serving.aegra:auth"}`): the same
authenticator and rules as `keelgraph.serving.auth:auth`, except that the store rule hands the
namespace back as a filter, which is how Aegra applies a changed namespace."""


async def _authenticate(headers: Mapping[str, str]) -> Auth.types.MinimalUserDict:
    """keelgraph's authenticator as Aegra calls it: with the request's headers as one dict (LangGraph
    server passes `authorization` by name). It checks files and keys, so it runs in a thread."""
    return await asyncio.to_thread(keel_auth.authenticate, headers.get("authorization"))


auth._authenticate_handler = _authenticate
auth._handlers = {
    key: list(handlers) for key, handlers in keel_auth.auth._handlers.items() if key != ("store", "*")
}
auth._global_handlers = list(keel_auth.auth._global_handlers)


@auth.on.store()
async def _store_namespace(ctx: Auth.types.AuthContext, value: Any) -> dict[str, Any]:
    await keel_auth._own_namespace(ctx, value)
    return {"namespace": list(value["namespace"])}


# --- the guard --------------------------------------------------------------------------------------


def _run_value(body: Mapping[str, Any], thread_id: str | None) -> dict[str, Any]:
    """A run request as LangGraph server describes it to its auth rules (`threads.create_run`)."""
    kwargs = {
        k: body.get(k)
        for k in (
            "input",
            "command",
            "config",
            "context",
            "stream_mode",
            "interrupt_before",
            "interrupt_after",
        )
    }
    return {
        "thread_id": thread_id,
        "assistant_id": body.get("assistant_id"),
        "metadata": dict(body.get("metadata") or {}),
        "multitask_strategy": body.get("multitask_strategy"),
        "kwargs": kwargs,
    }


def _names_server_user(body: Mapping[str, Any]) -> str | None:
    for carrier in (body.get("config"), (body.get("config") or {}).get("configurable"), body.get("context")):
        if isinstance(carrier, Mapping):
            for key in (SERVER_USER_KEY, SERVER_PERMISSIONS_KEY, IDENTITY_KEY):
                if key in carrier:
                    return key
    return None


def _target(method: str, path: str) -> tuple[str, str | None] | None:
    """Which guarded request this is: ("run", thread_id or None) or ("state", thread_id)."""
    if method != "POST":
        return None
    parts = path.strip("/").split("/")
    if parts[:1] == ["runs"] and "/".join(parts) in _RUN_PATHS:
        return "run", None
    if len(parts) >= 3 and parts[0] == "threads":
        rest = "/".join(parts[2:])
        if rest in _RUN_PATHS:
            return "run", parts[1]
        if rest == "state":
            return "state", parts[1]
    return None


class _Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class GuardRuns:
    """ASGI middleware in front of Aegra: keelgraph's rules for every run and state write (see the
    module's docstring). Requests whose token does not check out pass through: Aegra's own auth
    answers them with keelgraph's 401 or 503."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = (
            _target(scope.get("method", ""), str(scope.get("path", ""))) if scope["type"] == "http" else None
        )
        if target is None:
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            raw = await _check(target, scope, raw)
        except _Refused as refused:
            await _answer(send, refused.status, refused.detail)
            return
        if len(raw) != int(Headers(scope=scope).get("content-length") or len(raw)):
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(raw)).encode())]}
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps(
        {"error": "forbidden" if status == 403 else "not_found", "message": detail, "detail": detail}
    )
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})


def _user(scope: Scope) -> Any | None:
    from aegra_api.models.auth import User

    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    try:
        found = keel_auth.authenticate(headers.get("authorization"))
    except Exception:  # 401 / 503: Aegra answers it with the same error
        return None
    return User(**dict(found))


async def _check(target: tuple[str, str | None], scope: Scope, raw: bytes) -> bytes:
    """Refuse the request (`_Refused`) or return its body, as Aegra should read it."""
    from aegra_api.core.auth_handlers import build_auth_context, handle_event
    from fastapi import HTTPException

    user = _user(scope)
    if user is None:
        return raw
    kind, thread_id = target
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        return raw  # Aegra answers 422
    if not isinstance(body, dict):
        return raw
    try:
        if kind == "state":
            await handle_event(build_auth_context(user, "threads", "update"), {"thread_id": thread_id})
        else:
            if (key := _names_server_user(body)) is not None:
                raise _Refused(403, NAMES_SERVER_USER.format(key=key))
            await handle_event(build_auth_context(user, "threads", "create_run"), _run_value(body, thread_id))
    except HTTPException as exc:
        raise _Refused(exc.status_code, str(exc.detail)) from None
    if thread_id is not None:
        await _owned_thread(thread_id, user.identity, settle=kind == "run")
    if kind == "run" and body.get("input") is None and body.get("command") is None:
        # A run without input continues the thread from its last checkpoint (the Agent Server API;
        # LangGraph's `invoke(None)`), e.g. after the replica that ran it died. Aegra 0.6.0 runs
        # it with `{}` as a new input instead (and LangGraph 1.2.24 fails on an empty `Command()`):
        # the guard marks it, and `_continue_without_input` hands the graph None.
        body["input"] = CONTINUE
        return json.dumps(body).encode()
    return raw


async def _owned_thread(thread_id: str, identity: str, *, settle: bool) -> None:
    """404 for another user's thread; a thread left busy by a dead replica is settled first."""
    from aegra_api.core.orm import Thread, _get_session_maker
    from sqlalchemy import select

    async with _get_session_maker()() as session:
        row = (
            await session.execute(select(Thread.user_id, Thread.status).where(Thread.thread_id == thread_id))
        ).first()
    if row is None:
        return  # Aegra creates it for this user
    if row.user_id != identity:
        raise _Refused(404, NOT_FOUND.format(thread_id=thread_id))
    if settle and row.status == "busy" and not await _lease_held(thread_id):
        await _settle(thread_id)


async def _lease_held(thread_id: str) -> bool:
    """Whether a live run holds the thread's keelgraph lease (`keelgraph.graphs.lease`)."""
    from aegra_api.core.orm import _get_session_maker
    from sqlalchemy import text

    from keelgraph.graphs.lease import holder_alive

    query = text(
        "SELECT owner, expires_at, released_on, extract(epoch FROM clock_timestamp())::float8 AS now "
        "FROM keelgraph_thread_leases WHERE thread_id = :thread_id"
    )
    async with _get_session_maker()() as session:
        row = (await session.execute(query, {"thread_id": thread_id})).first()
    if row is None or not row.owner or row.released_on is not None:
        return False
    return bool(row.expires_at > row.now and holder_alive(row.owner))


async def _settle(thread_id: str) -> None:
    """Set a thread whose runner died to what its last checkpoint says, and its dead runs to errors."""
    from aegra_api.core.database import db_manager
    from aegra_api.core.orm import Run, Thread, _get_session_maker
    from sqlalchemy import update

    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    found = await db_manager.get_checkpointer().aget_tuple(config)
    interrupted = found is not None and any(w[1] == "__interrupt__" for w in found.pending_writes or ())
    async with _get_session_maker()() as session:
        await session.execute(
            update(Thread)
            .where(Thread.thread_id == thread_id, Thread.status == "busy")
            .values(status="interrupted" if interrupted else "idle")
        )
        await session.execute(
            update(Run)
            .where(Run.thread_id == thread_id, Run.status.in_(("pending", "running")))
            .values(status="error", error_message=DEAD_RUN)
        )
        await session.commit()


def _continue_without_input() -> None:
    """Make Aegra's run executor pass None (not the guard's `CONTINUE` mark) to the graph."""
    from aegra_api.api import runs

    original = runs.execute_run_async
    if getattr(original, "keelgraph", False):
        return

    async def execute_run_async(
        run_id: str, thread_id: str, graph_id: str, input_data: Any, *args: Any, **kwargs: Any
    ) -> None:
        await original(
            run_id, thread_id, graph_id, None if input_data == CONTINUE else input_data, *args, **kwargs
        )

    execute_run_async.keelgraph = True  # type: ignore[attr-defined]
    runs.execute_run_async = execute_run_async


@asynccontextmanager
async def _lifespan(_app: Any) -> AsyncIterator[None]:
    """Runs inside Aegra's startup (after its database is up): keelgraph's checkpointer and store
    take the place of Aegra's, on the same PostgreSQL."""
    from aegra_api.core.database import db_manager

    from keelgraph.serving.persistence import checkpointer, store

    _continue_without_input()
    async with checkpointer() as saver, store() as opened:
        db_manager._checkpointer = saver
        db_manager._store = opened
        yield


app = FastAPI(title="keelgraph on Aegra", lifespan=_lifespan)
"""The custom app Aegra serves its API on (`"http": {"app": "keelgraph.serving.aegra:app"}`):
keelgraph's persistence at startup, `GuardRuns` in front of every request."""
app.add_middleware(GuardRuns)


# --- processes --------------------------------------------------------------------------------------


def _command(port: int) -> list[str]:
    try:
        import aegra_api  # noqa: F401
    except ImportError:
        raise UserError(f"serving on Aegra needs aegra-api: {install_hint('aegra')}") from None
    return [
        sys.executable, "-m", "keelgraph.local.orphan_guard", str(os.getpid()), "uvicorn",
        "aegra_api.main:app", "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
    ]  # fmt: skip


class AegraServer:
    """One Aegra replica on 127.0.0.1, started and stopped by this object (its own process group).

    >>> with AegraServer(Path("aegra.json"), "postgresql://...") as server:  # doctest: +SKIP
    ...     print(server.url)
    """

    def __init__(
        self,
        config: Path,
        database_url: str,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.config = config.resolve()
        self.port = port or free_port()
        self.env = aegra_env(database_url, self.config, env)
        self.log = log or Path(tempfile.gettempdir()) / f"keelgraph-aegra-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AegraServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 90.0) -> str:
        """Start the replica and wait until `GET /health` answers 200 (its database is up)."""
        if self.process is not None and self.process.poll() is None:
            return self.url
        if not port_free(self.port):
            raise UserError(
                f"port {self.port} on 127.0.0.1 is in use: choose another, or none for a free one"
            )
        self.process = start_helper(
            _command(self.port),
            name=f"Aegra replica on port {self.port}",
            log_path=self.log,
            ready=self._answers,
            timeout_s=timeout_s,
            cwd=self.config.parent,
            env=self.env,
        )
        return self.url

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL the replica's process group (a crash: no cleanup runs)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        process, self.process = self.process, None
        stop_group(process)


class Replicas:
    """`count` Aegra replicas on one PostgreSQL: the first starts alone (it applies Aegra's
    migrations), the others together. Stops every one it started, also when a start fails."""

    def __init__(
        self,
        config: Path,
        database_url: str,
        count: int,
        *,
        ports: Sequence[int] | None = None,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        ports = list(ports or [])
        self.servers = [
            AegraServer(
                config,
                database_url,
                port=ports[i] if i < len(ports) else None,
                env=env,
                log=None if log_dir is None else log_dir / f"replica-{i}.log",
            )
            for i in range(count)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def __enter__(self) -> Replicas:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 120.0) -> list[str]:
        try:
            self.servers[0].start(timeout_s)
            errors: list[BaseException] = []

            def start(server: AegraServer) -> None:
                try:
                    server.start(timeout_s)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=start, args=(s,)) for s in self.servers[1:]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        except BaseException:
            self.stop()
            raise
        return self.urls

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def run(
    *,
    replicas: int = 1,
    port: int | None = None,
    config: Path | None = None,
    database_url: str | None = None,
) -> int:
    """`keelgraph serve --engine aegra`: `replicas` Aegra processes (ports `port`, `port+1`, ...) on
    the PostgreSQL at `database_url` (default `KEELGRAPH_DATABASE_URL`), in the foreground until Ctrl-C."""
    url = database_url or os.environ.get("KEELGRAPH_DATABASE_URL", "")
    if not url.startswith(("postgresql://", "postgres://")):
        raise UserError(
            "serving on Aegra needs PostgreSQL: set KEELGRAPH_DATABASE_URL=postgresql://... (see deploy/README.md)"
        )
    base = config or Path.cwd() / "langgraph.json"
    if not base.is_file():
        raise UserError(f"no {base.name} in {base.parent}: run from the project's folder")
    folder = Path(tempfile.mkdtemp(prefix="keelgraph-aegra-"))
    generated = write_aegra_config(folder, base)
    ports = [port + i for i in range(replicas)] if port else None
    group = Replicas(generated, url, replicas, ports=ports, log_dir=folder)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        group.start()
        print(
            f"serving {base} on Aegra {AEGRA_VERSION}: {' '.join(group.urls)}; Ctrl-C stops them", flush=True
        )
        print(f"config: {generated}; logs: {folder}", flush=True)
        while all(s.process is not None and s.process.poll() is None for s in group.servers):
            time.sleep(0.5)
        print(f"a replica exited; see the logs in {folder}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        group.stop()
        signal.signal(signal.SIGTERM, previous)
