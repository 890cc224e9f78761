"""The HTTP API tool against a real HTTP server on 127.0.0.1: validation, timeouts, the size cap."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

import pytest
from pydantic import BaseModel

from keelgraph.tools.execution import policy_of, run_tool_call
from keelgraph.tools.http import (
    HostNotAllowed,
    HttpTimeout,
    ResponseTooLarge,
    http_tool,
)

TEN_MB = 10_000_000
CHUNK = 65_536


@dataclass
class Seen:
    """What the server saw, for the tests to assert on."""

    paths: list[str] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


class Api(BaseHTTPRequestHandler):
    seen: Seen

    def log_message(self, format: str, *args: object) -> None:  # keep pytest's output clean
        pass

    def do_GET(self) -> None:
        self.seen.paths.append(self.path)
        self.seen.auth.append(self.headers.get("Authorization"))
        # The client may stop reading mid-body: that is the point of the size cap.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._route()

    def _route(self) -> None:
        if self.path.startswith("/orders/"):
            order_id = self.path.removeprefix("/orders/").split("?", 1)[0]
            self._send(200, "application/json", json.dumps({"id": order_id, "status": "shipped"}).encode())
        elif self.path == "/slow":
            self.seen.stop.wait(5)  # far past the tool's timeout; released when the test ends
            self._send(200, "application/json", b"{}")
        elif self.path in {"/big.txt", "/big.json"}:
            kind = "text/plain" if self.path.endswith(".txt") else "application/json"
            self.send_response(200)
            self.send_header("Content-Type", kind)  # no Content-Length: only streaming can tell the size
            self.end_headers()
            for _ in range(TEN_MB // CHUNK):
                self.wfile.write(b"y" * CHUNK if kind == "text/plain" else b" " * CHUNK)
        elif self.path == "/away":
            port = self.server.server_address[1]
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/orders/1")
            self.end_headers()
        else:
            self._send(404, "application/json", b'{"detail": "unknown path"}')

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Seen]]:
    """A real HTTP server on a free 127.0.0.1 port, stopped at the end of the test."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    seen = Seen()
    handler = type("BoundApi", (Api,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="http-tool-test-api", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        seen.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


class OrderQuery(BaseModel):
    order_id: str


class Order(BaseModel):
    id: str
    status: Literal["open", "shipped"]


class Empty(BaseModel):
    pass


def test_get_with_a_validated_json_response(api: tuple[str, Seen]) -> None:
    base, seen = api
    tool = http_tool(
        "get_order",
        "Look up one order.",
        url=base + "/orders/{order_id}",
        args=OrderQuery,
        response=Order,
        allow_hosts=["127.0.0.1"],
        headers={"Authorization": "Bearer live-test-token"},
    )
    assert tool.invoke({"order_id": "A/17"}) == {"status": 200, "body": {"id": "A%2F17", "status": "shipped"}}
    assert seen.paths == ["/orders/A%2F17"]
    assert seen.auth == ["Bearer live-test-token"]
    outcome = run_tool_call(tool, "c1", {"order_id": "B-2"})
    assert (outcome.ok, outcome.output) == (True, {"status": 200, "body": {"id": "B-2", "status": "shipped"}})


def test_a_slow_endpoint_times_out_within_the_bound(api: tuple[str, Seen]) -> None:
    base, seen = api
    tool = http_tool(
        "slow",
        "A slow call.",
        url=base + "/slow",
        args=Empty,
        allow_hosts=["127.0.0.1"],
        timeout_s=0.5,
        retries=1,
    )
    started = time.monotonic()
    with pytest.raises(HttpTimeout) as caught:
        tool.invoke({})
    elapsed = time.monotonic() - started
    assert str(caught.value) == (
        f"GET {base}/slow got no answer within 0.5 s (2 attempts) -> try again later, or answer without this data"
    )
    assert 1.4 < elapsed < 3.0  # two 0.5 s attempts and a 0.5 s backoff, not the server's 5 s
    assert elapsed < policy_of(tool).timeout_s
    assert seen.paths == ["/slow", "/slow"]

    once = http_tool(
        "slow",
        "A slow call.",
        url=base + "/slow",
        args=Empty,
        allow_hosts=["127.0.0.1"],
        timeout_s=0.5,
        retries=0,
    )
    outcome = run_tool_call(once, "c2", {})
    assert (outcome.ok, outcome.kind) == (False, "tool_error")
    assert outcome.content.startswith("ERROR: slow failed: HttpTimeout: GET ")
    assert outcome.seconds < 2.0


def test_a_ten_megabyte_text_body_is_cut(api: tuple[str, Seen]) -> None:
    base, _ = api
    tool = http_tool(
        "big",
        "A large page.",
        url=base + "/big.txt",
        args=Empty,
        allow_hosts=["127.0.0.1"],
        max_response_bytes=200_000,
    )
    started = time.monotonic()
    out = tool.invoke({})
    assert time.monotonic() - started < 3.0
    assert out == {
        "status": 200,
        "body": "y" * 200_000,
        "truncated": True,
        "note": "the response was cut at 200,000 bytes; only its start is shown",
    }


def test_a_ten_megabyte_json_body_is_refused(api: tuple[str, Seen]) -> None:
    base, _ = api
    tool = http_tool(
        "big",
        "A large list.",
        url=base + "/big.json",
        args=Empty,
        allow_hosts=["127.0.0.1"],
        max_response_bytes=200_000,
    )
    with pytest.raises(ResponseTooLarge, match="sent more than 200,000 bytes of JSON"):
        tool.invoke({})


def test_a_redirect_off_the_allowlist_is_not_followed(api: tuple[str, Seen]) -> None:
    base, seen = api
    tool = http_tool("away", "Moves.", url=base + "/away", args=Empty, allow_hosts=["127.0.0.1"])
    with pytest.raises(HostNotAllowed) as caught:
        tool.invoke({})
    assert caught.value.host == "localhost"
    assert seen.paths == ["/away"]  # the redirect target was never requested
