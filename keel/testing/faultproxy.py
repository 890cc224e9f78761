"""A fault-injecting HTTP reverse proxy on 127.0.0.1, in front of an OpenAI-compatible endpoint.

Failover is tested over real sockets: the client under test talks HTTP to the proxy, and each
request either passes through to the upstream server or meets the next scripted fault.

>>> Fault.error(429, retry_after=2).label
'429 Retry-After 2'
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Literal
from urllib.parse import urlsplit

import httpx

__all__ = ["Exchange", "Fault", "FaultKind", "FaultProxy", "ProxyRequest"]

FaultKind = Literal["pass", "error", "slow", "drop", "drop_mid_body", "malformed", "truncated"]

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade", "te"}
)
_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Fault:
    """What the proxy does with one request. Build one with the class methods."""

    kind: FaultKind = "pass"
    status: int = 200
    retry_after: float | None = None
    """`error`: the `Retry-After` header in seconds (None: no header)."""
    seconds: float = 0.0
    """`slow`: how long to wait before forwarding (the client may give up first)."""
    body: bytes = b""
    """`error` / `malformed`: the body sent instead of the upstream's."""
    content_type: str = "application/json"

    @classmethod
    def passthrough(cls) -> Fault:
        """Forward the request and relay the upstream's reply unchanged (streams included)."""
        return cls()

    @classmethod
    def error(cls, status: int, *, retry_after: float | None = None, body: bytes | None = None) -> Fault:
        """Answer `status` at once (429, 500, 502, 503...) with an OpenAI-style error body."""
        if body is None:
            message = f"{status} {HTTPStatus(status).phrase} (injected by keelgraph.testing.faultproxy)"
            body = json.dumps({"error": {"message": message, "type": "injected", "code": status}}).encode()
        return cls("error", status=status, retry_after=retry_after, body=body)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Wait `seconds` before the response headers, then forward, unless the client hung up
        meanwhile (then nothing reaches the upstream, so a slow fault does not keep it busy)."""
        return cls("slow", seconds=seconds)

    @classmethod
    def drop(cls) -> Fault:
        """Close the connection without sending a response."""
        return cls("drop")

    @classmethod
    def drop_mid_body(cls) -> Fault:
        """Forward, send the upstream's headers and the first half of its body, then close."""
        return cls("drop_mid_body")

    @classmethod
    def malformed(
        cls, body: bytes = b"<html>upstream error</html>", content_type: str = "application/json"
    ) -> Fault:
        """Answer 200 with `body`, which is not the JSON the client expects."""
        return cls("malformed", body=body, content_type=content_type)

    @classmethod
    def truncated(cls) -> Fault:
        """Forward, then answer 200 with only the first half of the upstream's body: a complete HTTP
        response whose JSON is cut off."""
        return cls("truncated")

    @property
    def label(self) -> str:
        if self.kind == "error":
            after = f" Retry-After {self.retry_after:g}" if self.retry_after is not None else ""
            return f"{self.status}{after}"
        if self.kind == "slow":
            return f"slow {self.seconds:g} s"
        return self.kind


@dataclass(frozen=True)
class ProxyRequest:
    """A request as the proxy received it, for a `rule` to choose a fault by."""

    method: str
    path: str
    body: bytes

    @property
    def model(self) -> str | None:
        """The `model` field of a JSON body, if any."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return None
        name = value.get("model") if isinstance(value, dict) else None
        return name if isinstance(name, str) else None


@dataclass
class Exchange:
    """One request the proxy saw, recorded when it arrived; `finished` and `status` are filled in
    when the proxy is done with it."""

    method: str
    path: str
    model: str | None
    fault: Fault
    started: float
    """`time.monotonic()` when the request had arrived in full."""
    finished: float | None = None
    status: int | None = None
    """The status sent to the client; None when nothing was (a drop, or the client left first)."""
    client_left: bool = False
    """The client closed the connection before the proxy answered (a timeout on its side)."""


@dataclass
class _State:
    faults: deque[Fault] = field(default_factory=deque)
    seen: list[Exchange] = field(default_factory=list)


class FaultProxy:
    """A reverse proxy on 127.0.0.1 that injects faults into requests to `upstream`.

    Requests whose path contains `match` take the next queued fault (`push`), else the fault a
    `rule` returns, else `default`; other requests (such as `GET /v1/models`) pass through.
    `url` has the upstream's path, so it replaces the upstream's base URL as is. Runs its own event
    loop in a background thread: usable from sync and async code alike.

        with FaultProxy("http://127.0.0.1:18089/v1") as proxy:
            proxy.push(Fault.error(429, retry_after=1), Fault.drop())
            model = ChatOpenAI(base_url=proxy.url, ...)
            ...
            assert [e.fault.kind for e in proxy.seen] == ["error", "drop", "pass"]
    """

    def __init__(
        self,
        upstream: str,
        *,
        default: Fault | None = None,
        rule: Callable[[ProxyRequest], Fault | None] | None = None,
        match: str = "/chat/completions",
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(f"upstream must be an http(s) URL, got {upstream!r}")
        self.upstream = f"{parts.scheme}://{parts.netloc}"
        self.prefix = parts.path.rstrip("/")
        self.default = default or Fault.passthrough()
        self.rule = rule
        self.match = match
        self.port = 0
        self._state = _State()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("the proxy is not running; call start() or use it as a context manager")
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def push(self, *faults: Fault) -> None:
        """Queue faults for the next matching requests, in order."""
        with self._lock:
            self._state.faults.extend(faults)

    def script(self, faults: Iterable[Fault]) -> None:
        """Replace the queue of faults."""
        with self._lock:
            self._state.faults = deque(faults)

    @property
    def seen(self) -> list[Exchange]:
        """Every matching request so far, in order of arrival."""
        with self._lock:
            return list(self._state.seen)

    def reset(self) -> None:
        """Forget the queued faults and the requests seen (the default and rule stay)."""
        with self._lock:
            self._state = _State()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        if self._thread is not None:
            return self.url
        ready = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failed), name="keelgraph-faultproxy", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failed:
            self._thread.join()
            self._thread = None
            raise failed[0]
        return self.url

    def stop(self) -> None:
        thread, loop, stopped = self._thread, self._loop, self._stopped
        if thread is None or loop is None or stopped is None:
            return
        loop.call_soon_threadsafe(stopped.set)
        thread.join()
        self._thread = None
        self.port = 0

    # -- the server, on its own loop --------------------------------------------------------

    def _run(self, ready: threading.Event, failed: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as exc:
            failed.append(exc)
        finally:
            ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._stopped = asyncio.Event()
        handlers: set[asyncio.Task[None]] = set()
        async with httpx.AsyncClient(base_url=self.upstream, timeout=httpx.Timeout(600.0)) as client:

            async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                task = asyncio.current_task()
                assert task is not None
                handlers.add(task)
                try:
                    await self._connection(client, reader, writer)
                except asyncio.CancelledError:
                    # Stopping: end quietly (Python 3.11's stream server reads the exception of the
                    # handler's task, which raises when the task ended cancelled).
                    pass
                finally:
                    handlers.discard(task)

            server = await asyncio.start_server(accept, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await self._stopped.wait()
            server.close()
            for task in list(handlers):
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            await server.wait_closed()

    def _choose(self, request: ProxyRequest) -> Fault | None:
        if self.match not in request.path:
            return None
        with self._lock:
            if self._state.faults:
                return self._state.faults.popleft()
        chosen = self.rule(request) if self.rule is not None else None
        return chosen or self.default

    async def _connection(
        self, client: httpx.AsyncClient, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                method, target, headers = _parse_head(head)
                body = await _read_body(reader, headers)
                request = ProxyRequest(method, target, body)
                fault = self._choose(request)
                exchange = None
                if fault is not None:
                    exchange = Exchange(method, target, request.model, fault, time.monotonic())
                    with self._lock:
                        self._state.seen.append(exchange)
                keep = await self._answer(
                    client,
                    request,
                    headers=headers,
                    fault=fault or Fault(),
                    exchange=exchange,
                    reader=reader,
                    writer=writer,
                )
                if exchange is not None and exchange.finished is None:
                    exchange.finished = time.monotonic()
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(
        self,
        client: httpx.AsyncClient,
        request: ProxyRequest,
        *,
        headers: dict[str, str],
        fault: Fault,
        exchange: Exchange | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Serve one request under `fault`; False when the connection must close."""

        def sent(status: int | None) -> None:
            _record(exchange, status)

        if fault.kind == "drop":
            sent(None)
            return False
        if fault.kind in {"error", "malformed"}:
            extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            sent(fault.status)
            await _respond(writer, fault.status, {"Content-Type": fault.content_type, **extra}, fault.body)
            return True
        if fault.kind == "slow":
            try:
                # The client never sends more on this connection while it waits: data or EOF here
                # means it gave up.
                await asyncio.wait_for(reader.read(1), fault.seconds)
            except TimeoutError:
                pass
            else:
                if exchange is not None:
                    exchange.client_left = True
                return False
        forward = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP and k != "host"}
        forward["accept-encoding"] = "identity"  # so a cut body is cut plain text, not gzip
        upstream = client.build_request(request.method, request.path, headers=forward, content=request.body)
        try:
            reply = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            sent(502)
            await _respond(writer, 502, {"Content-Type": "text/plain"}, f"upstream: {exc!r}".encode())
            return True
        try:
            return await _relay(reply, fault, exchange, writer)
        finally:
            await reply.aclose()


def _record(exchange: Exchange | None, status: int | None) -> None:
    # Called before the last bytes go out, so a client that has its answer also sees the record.
    if exchange is not None:
        exchange.status = status
        exchange.finished = time.monotonic()


async def _relay(
    reply: httpx.Response, fault: Fault, exchange: Exchange | None, writer: asyncio.StreamWriter
) -> bool:
    """Send the upstream's reply on, whole, cut (`drop_mid_body`, `truncated`) or as a stream."""
    relay = {k: v for k, v in reply.headers.items() if k.lower() not in _HOP_BY_HOP}
    if fault.kind in {"drop_mid_body", "truncated"}:
        full = await reply.aread()
        cut = full[: len(full) // 2]
        length = len(full) if fault.kind == "drop_mid_body" else len(cut)
        _record(exchange, reply.status_code)
        await _respond(writer, reply.status_code, {**relay, "Content-Length": str(length)}, cut)
        return fault.kind == "truncated"
    if "content-length" in reply.headers:
        body = await reply.aread()
        _record(exchange, reply.status_code)
        await _respond(writer, reply.status_code, relay, body)
        return True
    # A stream (server-sent events): relay it chunk by chunk as it comes.
    if exchange is not None:
        exchange.status = reply.status_code
    writer.write(_head(reply.status_code, {**relay, "Transfer-Encoding": "chunked"}))
    async for chunk in reply.aiter_raw():
        if chunk:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
    _record(exchange, reply.status_code)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return True


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    if len(head) > _MAX_HEAD:
        raise ValueError("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


def _head(status: int, headers: dict[str, str]) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {status} {phrase}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _respond(writer: asyncio.StreamWriter, status: int, headers: dict[str, str], body: bytes) -> None:
    headers = {k: v for k, v in headers.items() if k.lower() != "content-length"} | {
        "Content-Length": headers.get("Content-Length", str(len(body)))
    }
    writer.write(_head(status, headers) + body)
    await writer.drain()
