"""The HTTP API tool on httpx.MockTransport: URLs, allowlist, retries, size cap, errors (no sockets)."""

from __future__ import annotations

import doctest
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, Literal

import httpx
import pytest
from langchain_core.tools import BaseTool
from pydantic import BaseModel, Field

import keelgraph.tools.http as http_module
from keelgraph.contracts.errors import UserError
from keelgraph.tools.execution import policy_of, run_tool_call
from keelgraph.tools.http import (
    ArgumentRejected,
    HostNotAllowed,
    HttpStatusError,
    HttpTimeout,
    HttpToolError,
    HttpUnreachable,
    ResponseInvalid,
    ResponseTooLarge,
    http_tool,
)

API = "https://api.example.com/orders/{order_id}"
TOKEN = "Bearer sk-live-abcdef123456"
ORDER = {"id": "A-1", "status": "open", "items": [{"sku": "k1", "price": 2.5}]}
Handler = Callable[[httpx.Request], httpx.Response]


class OrderQuery(BaseModel):
    order_id: str
    expand: str | None = None


class Item(BaseModel):
    sku: str
    price: float


class Order(BaseModel):
    id: str
    status: Literal["open", "shipped"]
    items: list[Item]


class NewOrder(BaseModel):
    customer_id: int
    sku: str
    quantity: int = Field(alias="qty")


def make(handler: Handler, **declared: Any) -> tuple[BaseTool, list[httpx.Request]]:
    """A tool on a MockTransport, and the list of requests it sent."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    options: dict[str, Any] = {"url": API, "args": OrderQuery, "allow_hosts": ["api.example.com"]}
    options.update(declared)
    client = httpx.Client(transport=httpx.MockTransport(record))
    return http_tool("get_order", "Look up one order.", client=client, **options), seen


def ok_json(body: Any = ORDER) -> Handler:
    return lambda request: httpx.Response(200, json=body)


def redirect_once(location: str) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/orders/A-1" and request.url.host == "api.example.com":
            return httpx.Response(302, headers={"Location": location})
        return httpx.Response(200, json={"at": str(request.url)})

    return handler


def scripted(*responses: httpx.Response | Exception) -> Handler:
    """Answer each request with the next scripted response (or raise the scripted error)."""
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        step = queue.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    return handler


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff waits are recorded instead of slept."""
    waited: list[float] = []
    monkeypatch.setattr(http_module, "_sleep", waited.append)
    return waited


class CountingStream(httpx.SyncByteStream):
    """A 10 MB body in 64 KiB chunks that counts how much was actually pulled from it."""

    def __init__(self, total: int = 10_000_000, chunk: int = 65_536, fill: bytes = b"x") -> None:
        self.total, self.chunk, self.fill = total, chunk, fill
        self.sent = 0
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < self.total:
            size = min(self.chunk, self.total - self.sent)
            self.sent += size
            yield self.fill * size

    def close(self) -> None:
        self.closed = True


# --- URL building ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order_id", "raw_path"),
    [
        ("../admin", b"/orders/..%2Fadmin"),
        ("a/b?x=1", b"/orders/a%2Fb%3Fx%3D1"),
        ("x#y@evil.com", b"/orders/x%23y%40evil.com"),
        ("A 1/é", b"/orders/A%201%2F%C3%A9"),
    ],
)
def test_path_params_stay_one_encoded_segment(order_id: str, raw_path: bytes) -> None:
    tool, seen = make(ok_json(), response=Order)
    assert tool.invoke({"order_id": order_id}) == {"status": 200, "body": ORDER}
    assert len(seen) == 1
    assert seen[0].url.host == "api.example.com"
    assert seen[0].url.raw_path == raw_path  # no query: `expand` was None and is left out


@pytest.mark.parametrize("order_id", ["..", ".", ""])
def test_dot_segments_and_empty_ids_are_rejected_before_sending(order_id: str) -> None:
    tool, seen = make(ok_json())
    with pytest.raises(ArgumentRejected, match=r"argument order_id=.* cannot be used in the URL"):
        tool.invoke({"order_id": order_id})
    assert seen == []


def test_get_sends_other_args_as_query_and_post_as_json_body() -> None:
    tool, seen = make(ok_json())
    tool.invoke({"order_id": "A-1", "expand": "items"})
    assert seen[0].method == "GET"
    assert seen[0].url.raw_path == b"/orders/A-1?expand=items"
    assert seen[0].content == b""

    create, posted = make(
        lambda r: httpx.Response(201, json={"id": "A-9"}),
        method="post",
        url="https://api.example.com/customers/{customer_id}/orders",
        args=NewOrder,
    )
    assert create.invoke({"customer_id": 7, "sku": "k1", "qty": 3}) == {"status": 201, "body": {"id": "A-9"}}
    assert posted[0].method == "POST"
    assert posted[0].url.raw_path == b"/customers/7/orders"
    assert posted[0].headers["content-type"] == "application/json"
    assert json.loads(posted[0].content) == {"sku": "k1", "qty": 3}  # by alias, path param left out


def test_declared_args_schema_and_policy() -> None:
    tool, _ = make(ok_json())
    assert tool.name == "get_order"
    assert tool.args_schema is OrderQuery
    policy = policy_of(tool)
    assert policy.side_effect == "read"
    assert policy.timeout_s == 10.0 * 3 + 5.0 * 2 + 1.0  # every attempt and wait, plus a margin
    post, _ = make(ok_json(), method="POST", timeout_s=2, retries=0)
    assert (policy_of(post).side_effect, policy_of(post).timeout_s) == ("external", 3.0)
    put, _ = make(ok_json(), method="PUT", side_effect="write")
    assert policy_of(put).side_effect == "write"


@pytest.mark.parametrize(
    ("declared", "says"),
    [
        ({"allow_hosts": ["other.example.com"]}, "the url's host 'api.example.com' is not in allow_hosts"),
        ({"allow_hosts": ["*.example.com"], "url": "https://example.com/{order_id}"}, "not in allow_hosts"),
        ({"allow_hosts": ["*"]}, "allow_hosts entry '*' is not a host"),
        ({"allow_hosts": ["https://api.example.com"]}, "is not a host"),
        ({"allow_hosts": []}, "allow_hosts is empty"),
        ({"url": "https://{order_id}.example.com/x"}, "the host part of the url must be fixed"),
        ({"url": "ftp://api.example.com/{order_id}"}, "url must start with http:// or https://"),
        ({"url": "https://api.example.com/{order}"}, "url placeholder(s) order are not fields of OrderQuery"),
        ({"url": "https://api.example.com/{order_id!r}"}, "must be a bare argument name"),
        ({"method": "FETCH"}, "method 'FETCH' is not one of"),
        ({"timeout_s": 0}, "timeout_s must be positive"),
    ],
)
def test_misdeclared_tools_fail_at_declaration(declared: dict[str, Any], says: str) -> None:
    with pytest.raises(UserError) as caught:
        make(ok_json(), **declared)
    assert says in str(caught.value)


# --- host allowlist and redirects --------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "followed_to"),
    [
        ("https://eu.example.com/v2/orders/A-1", "eu.example.com"),
        ("https://a.b.example.com/x", "a.b.example.com"),
        ("https://EU.Example.COM./x", "eu.example.com."),  # case and the root dot do not matter
        ("/orders/A-2", "api.example.com"),
    ],
)
def test_redirects_within_the_allowlist_are_followed(location: str, followed_to: str) -> None:
    tool, seen = make(redirect_once(location), allow_hosts=["*.example.com"])
    assert tool.invoke({"order_id": "A-1"})["status"] == 200
    assert [r.url.host for r in seen] == ["api.example.com", followed_to]


@pytest.mark.parametrize(
    ("location", "refused", "says"),
    [
        (
            "https://example.com/x",
            "example.com",
            "host 'example.com', which",
        ),  # a wildcard is not the bare domain
        ("https://example.com.evil.net/x", "example.com.evil.net", "host 'example.com.evil.net', which"),
        ("https://notexample.com/x", "notexample.com", "host 'notexample.com', which"),
        ("https://evil.com/?next=api.example.com", "evil.com", "host 'evil.com', which"),
        ("file:///etc/passwd", "", "a file: URL, and this tool speaks only http(s)"),
    ],
)
def test_redirects_off_the_allowlist_are_refused(location: str, refused: str, says: str) -> None:
    tool, seen = make(redirect_once(location), allow_hosts=["*.example.com"])
    with pytest.raises(HostNotAllowed) as caught:
        tool.invoke({"order_id": "A-1"})
    assert caught.value.host == refused
    assert f"the API redirected to {says}" in str(caught.value)
    assert [r.url.host for r in seen] == ["api.example.com"]  # nothing was sent to the target


def test_host_not_allowed_message_names_the_host() -> None:
    tool, seen = make(scripted(httpx.Response(301, headers={"Location": "https://evil.com/steal"})))
    with pytest.raises(HostNotAllowed) as caught:
        tool.invoke({"order_id": "A-1"})
    assert caught.value.host == "evil.com"
    assert str(caught.value) == (
        "the API redirected to host 'evil.com', which this tool may not contact (allowed: api.example.com); "
        "nothing was sent there -> do not retry the call; answer without this data"
    )
    assert len(seen) == 1


def test_credentials_do_not_follow_a_redirect_to_another_origin() -> None:
    tool, seen = make(
        scripted(
            httpx.Response(307, headers={"Location": "https://api.example.com/v2/orders/A-1"}),
            httpx.Response(302, headers={"Location": "https://cdn.example.com/o/A-1.json"}),
            httpx.Response(200, json=ORDER),
        ),
        allow_hosts=["api.example.com", "cdn.example.com"],
        headers={"Authorization": TOKEN, "accept": "application/vnd.api+json"},
    )
    assert tool.invoke({"order_id": "A-1"}) == {"status": 200, "body": ORDER}
    assert [r.headers.get("authorization") for r in seen] == [TOKEN, TOKEN, None]
    assert [r.headers.get_list("accept") for r in seen] == [["application/vnd.api+json"]] * 3


def test_a_redirect_loop_is_cut() -> None:
    tool, seen = make(lambda r: httpx.Response(302, headers={"Location": "/orders/A-1"}))
    with pytest.raises(HttpToolError, match="redirected more than 5 times"):
        tool.invoke({"order_id": "A-1"})
    assert len(seen) == 6


# --- response schema ---------------------------------------------------------------------------


def test_an_invalid_response_names_the_field() -> None:
    bad = {"id": "A-1", "status": "lost", "items": [{"sku": "k1"}]}
    tool, _ = make(ok_json(bad), response=Order)
    with pytest.raises(ResponseInvalid) as caught:
        tool.invoke({"order_id": "A-1"})
    assert str(caught.value) == (
        "GET https://api.example.com/orders/A-1 answered, but not as Order expects: "
        "body.status: Input should be 'open' or 'shipped' (got 'lost'); body.items.0.price: Field required "
        "-> the service sent data in an unexpected shape; do not repeat the call; answer without this data"
    )


def test_a_non_json_body_is_invalid_when_a_schema_is_declared() -> None:
    tool, _ = make(lambda r: httpx.Response(200, text="<html>maintenance</html>"), response=Order)
    with pytest.raises(ResponseInvalid, match=r"did not answer with JSON \(got '<html>maintenance</html>'\)"):
        tool.invoke({"order_id": "A-1"})


def test_text_and_empty_bodies_without_a_schema() -> None:
    tool, _ = make(lambda r: httpx.Response(200, text="plain words"))
    assert tool.invoke({"order_id": "A-1"}) == {"status": 200, "body": "plain words"}
    empty, _ = make(lambda r: httpx.Response(204))
    assert empty.invoke({"order_id": "A-1"}) == {"status": 204, "body": None}


# --- retries -----------------------------------------------------------------------------------


def test_get_retries_503_with_backoff_then_succeeds(sleeps: list[float]) -> None:
    tool, seen = make(
        scripted(httpx.Response(503), httpx.Response(503), httpx.Response(200, json=ORDER)), response=Order
    )
    assert tool.invoke({"order_id": "A-1"}) == {"status": 200, "body": ORDER}
    assert len(seen) == 3
    assert sleeps == [0.5, 1.0]


def test_retries_run_out_and_the_last_status_is_reported(sleeps: list[float]) -> None:
    tool, seen = make(lambda r: httpx.Response(502, text="bad gateway"))
    with pytest.raises(HttpStatusError) as caught:
        tool.invoke({"order_id": "A-1"})
    assert caught.value.status == 502
    assert len(seen) == 3
    assert sleeps == [0.5, 1.0]
    assert str(caught.value) == (
        "HTTP 502 Bad Gateway from GET https://api.example.com/orders/A-1: bad gateway "
        "-> the service failed; try again later, or answer without this data"
    )


def test_post_is_not_retried_on_503(sleeps: list[float]) -> None:
    tool, seen = make(lambda r: httpx.Response(503), method="POST")
    with pytest.raises(HttpStatusError, match="HTTP 503 Service Unavailable"):
        tool.invoke({"order_id": "A-1"})
    assert len(seen) == 1
    assert sleeps == []


def test_post_is_not_retried_after_a_read_timeout(sleeps: list[float]) -> None:
    tool, seen = make(scripted(httpx.ReadTimeout("slow"), httpx.Response(200, json={})), method="POST")
    with pytest.raises(HttpTimeout, match=r"got no answer within 10 s \(1 attempt\)"):
        tool.invoke({"order_id": "A-1"})
    assert len(seen) == 1


def test_post_is_retried_when_the_connection_never_opened(sleeps: list[float]) -> None:
    tool, seen = make(
        scripted(httpx.ConnectError("refused"), httpx.Response(201, json={"id": "A-9"})), method="POST"
    )
    assert tool.invoke({"order_id": "A-1"}) == {"status": 201, "body": {"id": "A-9"}}
    assert len(seen) == 2
    assert sleeps == [0.5]


def test_get_timeouts_are_retried_then_reported(sleeps: list[float]) -> None:
    tool, seen = make(lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=r)))
    with pytest.raises(HttpTimeout) as caught:
        tool.invoke({"order_id": "A-1"})
    assert len(seen) == 3
    assert str(caught.value) == (
        "GET https://api.example.com/orders/A-1 got no answer within 10 s (3 attempts) "
        "-> try again later, or answer without this data"
    )


def test_connection_errors_are_reported_as_unreachable(sleeps: list[float]) -> None:
    tool, seen = make(lambda r: (_ for _ in ()).throw(httpx.ConnectError("Connection refused")), retries=1)
    with pytest.raises(HttpUnreachable, match=r"failed: ConnectError: Connection refused \(2 attempts\)"):
        tool.invoke({"order_id": "A-1"})
    assert len(seen) == 2


def test_an_undecodable_body_is_an_error_and_not_retried(sleeps: list[float]) -> None:
    tool, seen = make(
        lambda r: httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"not gzip at all")
    )
    with pytest.raises(HttpToolError) as caught:
        tool.invoke({"order_id": "A-1"})
    assert type(caught.value) is HttpToolError
    assert str(caught.value).startswith(
        "GET https://api.example.com/orders/A-1 sent a response that could not be read (DecodingError: "
    )
    assert str(caught.value).endswith("-> do not repeat the call; answer without this data")
    assert len(seen) == 1


def test_retry_after_seconds_are_honoured(sleeps: list[float]) -> None:
    tool, seen = make(
        scripted(httpx.Response(429, headers={"Retry-After": "3"}), httpx.Response(200, json=ORDER))
    )
    assert tool.invoke({"order_id": "A-1"})["status"] == 200
    assert sleeps == [3.0]
    assert len(seen) == 2


def test_retry_after_as_a_date_is_honoured(sleeps: list[float]) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=10), usegmt=True)
    tool, _ = make(
        scripted(httpx.Response(503, headers={"Retry-After": when}), httpx.Response(200, json=ORDER)),
        max_retry_wait_s=30,
    )
    tool.invoke({"order_id": "A-1"})
    assert len(sleeps) == 1
    assert 8.0 < sleeps[0] <= 10.0


@pytest.mark.parametrize("asked", [8, 120])  # past the 5 s cap; 120 s is also past the call's budget
def test_a_retry_after_beyond_the_cap_is_reported_not_waited(sleeps: list[float], asked: int) -> None:
    tool, seen = make(lambda r: httpx.Response(429, headers={"Retry-After": str(asked)}))
    with pytest.raises(HttpStatusError) as caught:
        tool.invoke({"order_id": "A-1"})
    assert (caught.value.status, caught.value.retry_after_s) == (429, float(asked))
    assert str(caught.value).endswith(
        f"-> the service is busy; try again later (the service asks to wait {asked} s), or answer without this data"
    )
    assert len(seen) == 1
    assert sleeps == []


# --- response size -----------------------------------------------------------------------------


def test_a_long_text_body_is_cut_while_streaming() -> None:
    stream = CountingStream()
    tool, _ = make(
        lambda r: httpx.Response(200, headers={"Content-Type": "text/plain"}, stream=stream),
        max_response_bytes=100_000,
    )
    out = tool.invoke({"order_id": "A-1"})
    assert out["status"] == 200
    assert out["body"] == "x" * 100_000
    assert out["truncated"] is True
    assert out["note"] == "the response was cut at 100,000 bytes; only its start is shown"
    assert stream.sent == 2 * 65_536  # stopped at the chunk that crossed the cap, of 10 MB
    assert stream.closed


def test_a_cut_never_splits_a_character() -> None:
    tool, _ = make(
        lambda r: httpx.Response(
            200, headers={"Content-Type": "text/plain; charset=utf-8"}, content="aé" * 10
        ),
        max_response_bytes=5,
    )
    assert tool.invoke({"order_id": "A-1"})["body"] == "aéa"  # 5 bytes end inside the second "é"


def test_a_json_body_over_the_cap_is_an_error() -> None:
    stream = CountingStream(fill=b" ")
    tool, _ = make(
        lambda r: httpx.Response(200, headers={"Content-Type": "application/json"}, stream=stream),
        max_response_bytes=100_000,
    )
    with pytest.raises(
        ResponseTooLarge,
        match=r"sent more than 100,000 bytes of JSON, more than this tool reads -> ask for less",
    ):
        tool.invoke({"order_id": "A-1"})
    assert stream.sent <= 100_000 + 65_536
    assert stream.closed


def test_a_declared_length_over_the_cap_is_not_read_at_all() -> None:
    stream = CountingStream()
    tool, _ = make(
        lambda r: httpx.Response(
            200, headers={"Content-Type": "application/json", "Content-Length": "10000000"}, stream=stream
        ),
        response=Order,
    )
    with pytest.raises(ResponseTooLarge):
        tool.invoke({"order_id": "A-1"})
    assert stream.sent == 0


# --- errors for the model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        (
            404,
            "-> check order_id='A-1': it may be mistyped or not exist; do not repeat the call with the same value",
        ),
        (400, "-> fix the arguments as the response says and call again"),
        (422, "-> fix the arguments as the response says and call again"),
        (401, "-> the tool's credentials were refused; changing the arguments will not help, tell the user"),
        (500, "-> the service failed; try again later, or answer without this data"),
    ],
)
def test_non_2xx_becomes_an_error_with_a_hint(status: int, hint: str) -> None:
    tool, _ = make(lambda r: httpx.Response(status, json={"detail": "no such order"}), retries=0)
    with pytest.raises(HttpStatusError) as caught:
        tool.invoke({"order_id": "A-1"})
    reason = httpx.codes.get_reason_phrase(status)
    assert caught.value.status == status
    assert str(caught.value) == (
        f'HTTP {status} {reason} from GET https://api.example.com/orders/A-1: {{"detail":"no such order"}} {hint}'
    )


def test_an_error_excerpt_is_short_and_the_query_is_not_shown() -> None:
    tool, _ = make(lambda r: httpx.Response(400, text="bad " * 1000))
    with pytest.raises(HttpStatusError) as caught:
        tool.invoke({"order_id": "A-1", "expand": "secret-filter"})
    message = str(caught.value)
    assert "secret-filter" not in message and "?" not in message
    assert message.startswith("HTTP 400 Bad Request from GET https://api.example.com/orders/A-1: bad bad")
    assert "... [cut] -> fix the arguments" in message
    assert len(message) < 450


def test_credentials_are_never_echoed() -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, text=f"token {request.headers['authorization']} is expired")

    tool, seen = make(echo, headers={"Authorization": TOKEN})
    assert seen == [] and TOKEN not in repr(tool)
    with pytest.raises(HttpStatusError) as caught:
        tool.invoke({"order_id": "A-1"})
    assert seen[0].headers["authorization"] == TOKEN  # it was sent ...
    assert str(caught.value).startswith(
        "HTTP 401 Unauthorized from GET https://api.example.com/orders/A-1: token [redacted] is expired"
    )  # ... but never shown
    outcome = run_tool_call(tool, "c1", {"order_id": "A-1"})
    assert "sk-live-abcdef123456" not in outcome.content
    mirror, _ = make(
        lambda r: httpx.Response(200, json={"seen": r.headers["authorization"][7:]}),
        headers={"Authorization": TOKEN},
    )
    assert mirror.invoke({"order_id": "A-1"}) == {"status": 200, "body": {"seen": "[redacted]"}}


def test_masking_leaves_ordinary_words_alone() -> None:
    text = "send a Bearer token, accept application/json, tenant acme"
    tool, _ = make(
        lambda r: httpx.Response(200, json={"help": text}),
        headers={"Authorization": TOKEN, "Accept": "application/json", "X-Tenant": "acme"},
    )
    assert tool.invoke({"order_id": "A-1"}) == {"status": 200, "body": {"help": text}}


def test_run_tool_call_turns_an_http_error_into_an_error_outcome() -> None:
    tool, _ = make(lambda r: httpx.Response(404, json={"detail": "no such order"}))
    outcome = run_tool_call(tool, "call-1", {"order_id": "A-404"})
    assert (outcome.ok, outcome.kind, outcome.call_id) == (False, "tool_error", "call-1")
    assert outcome.content == (
        "ERROR: get_order failed: HttpStatusError: HTTP 404 Not Found from GET "
        'https://api.example.com/orders/A-404: {"detail":"no such order"} -> check order_id=\'A-404\': '
        "it may be mistyped or not exist; do not repeat the call with the same value."
    )


def test_run_tool_call_fences_a_successful_call_and_keeps_the_output() -> None:
    tool, _ = make(ok_json(), response=Order)
    outcome = run_tool_call(tool, "call-2", {"order_id": "A-1"})
    assert (outcome.ok, outcome.kind) == (True, "ok")
    assert outcome.output == {"status": 200, "body": ORDER}
    assert outcome.content == f'<tool_result name="get_order">\n{json.dumps(outcome.output)}\n</tool_result>'


def test_run_tool_call_rejects_bad_arguments_without_sending() -> None:
    tool, seen = make(ok_json())
    outcome = run_tool_call(tool, "call-3", {"order": "A-1"})
    assert (outcome.ok, outcome.kind) == (False, "tool_args")
    assert "args.order_id: Field required" in outcome.content
    assert seen == []


def test_the_default_client_keeps_no_cookies() -> None:
    client = http_module._default_client()
    request = httpx.Request("GET", "https://api.example.com/login")
    client.cookies.extract_cookies(httpx.Response(200, headers={"Set-Cookie": "session=u1"}, request=request))
    assert len(client.cookies) == 0
    client.close()


def test_the_docstring_example_runs() -> None:
    result = doctest.testmod(http_module)
    assert (result.failed, result.attempted) == (0, 7)
