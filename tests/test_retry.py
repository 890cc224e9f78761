"""The one retry helper: backoff, jitter and server-asked waits, and every caller honouring them."""

from __future__ import annotations

import doctest
import itertools
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import httpx2
import openai
import pytest
from langchain_core.tools import StructuredTool
from pydantic import BaseModel

import keelgraph.tools.http as http_module
from keelgraph.contracts.errors import UserError
from keelgraph.runtime.models import ModelChain
from keelgraph.runtime.models import retry_after as models_retry_after
from keelgraph.testing import ScriptedChatModel
from keelgraph.tools import retry as retry_module
from keelgraph.tools.execution import run_tool_call, with_policy
from keelgraph.tools.http import HttpStatusError, http_tool
from keelgraph.tools.retry import Backoff, retry_after

REQUEST = httpx.Request("GET", "http://127.0.0.1:9/")


def future_date(seconds: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)


# --- retry_after -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "10"}, 0.01),
        ({"Retry-After-Ms": "1500", "Retry-After": "9"}, 1.5),  # milliseconds win, any case
        ({"retry-after-ms": "soon", "retry-after": "4"}, 4.0),  # unreadable ms: the seconds header
        ({"retry-after-ms": "-20"}, 0.0),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": " 0.25 "}, 0.25),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "nan"}, None),
        ({"retry-after": ""}, None),
        ({"content-type": "text/plain"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_both_headers(headers: dict[str, str], seconds: float | None) -> None:
    response = httpx.Response(429, headers=headers, request=REQUEST)
    assert retry_after(headers) == seconds  # a plain mapping
    assert retry_after(response) == seconds
    assert retry_after(response.headers) == seconds
    assert retry_after(httpx.HTTPStatusError("429", request=REQUEST, response=response)) == seconds


def test_retry_after_reads_an_openai_error_over_httpx2() -> None:
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx2.Response(429, headers={"retry-after-ms": "250"}, request=request, json={})
    error = openai.RateLimitError("Error code: 429", response=response, body=None)
    assert retry_after(error) == 0.25


def test_retry_after_as_an_http_date() -> None:
    asked = retry_after({"Retry-After": future_date(20)})
    assert asked is not None and 17 <= asked <= 20
    assert retry_after({"Retry-After": future_date(-60)}) == 0.0  # a date in the past: no wait
    assert retry_after({"Retry-After": "Sun, 32 Foo 2025 99:00:00 GMT"}) is None


def test_an_http_date_without_a_zone_is_read_as_gmt() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    asked = retry_after({"Retry-After": when.strftime("%a, %d %b %Y %H:%M:%S -0000")})
    assert asked is not None and 27 <= asked <= 30


def test_retry_after_without_headers_is_none() -> None:
    assert retry_after(TimeoutError()) is None
    assert retry_after(ConnectionError("reset")) is None
    assert retry_after(None) is None
    assert retry_after(httpx.ConnectError("refused", request=REQUEST)) is None


def test_the_model_runtime_uses_the_same_parser() -> None:
    assert models_retry_after is retry_after


# --- Backoff -----------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = Backoff(0.5, cap_s=3.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert [Backoff(0.1, multiplier=3.0).delay(n) for n in (1, 2, 3)] == pytest.approx([0.1, 0.3, 0.9])
    assert Backoff(0.5).delay(60) == 0.5 * 2.0**59  # no cap by default
    assert Backoff(0.5, cap_s=3.0).delay(5_000) == 3.0  # no overflow on a long run
    assert Backoff(0.0).delay(5_000) == 0.0


def test_jitter_stays_within_its_bounds() -> None:
    policy = Backoff(1.0, cap_s=8.0, jitter=0.5)
    assert [policy.delay(n, rng=lambda: 0.0) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert [policy.delay(n, rng=lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert policy.delay(2, rng=lambda: 0.5) == 1.5
    assert Backoff(1.0, jitter=0.0).delay(2, rng=lambda: 1.0) == 2.0  # no jitter: rng unused
    waits = [policy.delay(3) for _ in range(200)]
    assert all(2.0 <= w <= 4.0 for w in waits) and len(set(waits)) > 1


def test_a_server_asked_wait_is_exact_up_to_the_cap() -> None:
    policy = Backoff(0.5, cap_s=3.0, jitter=0.5)
    assert policy.delay(1, retry_after=2.0, rng=lambda: 1.0) == 2.0  # no jitter on an asked wait
    assert policy.delay(4, retry_after=0.01) == 0.01  # not the backoff's 3 s
    assert policy.delay(1, retry_after=3.0) == 3.0
    assert policy.delay(1, retry_after=3.5) is None  # beyond the cap: the caller does not wait
    assert policy.delay(1, retry_after=-1.0) == 0.0


@pytest.mark.parametrize(
    "bad",
    [{"base_s": -1.0}, {"cap_s": -1.0}, {"multiplier": 0.5}, {"jitter": 1.5}, {"base_s": float("nan")}],
)
def test_a_bad_backoff_is_refused(bad: dict[str, float]) -> None:
    options: dict[str, Any] = {"base_s": 0.5, **bad}
    with pytest.raises(UserError, match="a backoff needs base_s >= 0"):
        Backoff(**options)


# --- every caller honours retry-after-ms -------------------------------------------------------


def rate_limited_ms(millis: str) -> openai.RateLimitError:
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx2.Response(429, headers={"retry-after-ms": millis}, request=request, json={})
    return openai.RateLimitError("Error code: 429", response=response, body=None)


def test_the_model_chain_honours_retry_after_ms() -> None:
    chain = ModelChain((ScriptedChatModel([]),), base_s=5.0, max_wait_s=30.0)
    assert chain.wait(rate_limited_ms("10"), 1, rng=lambda: 0.0) == 0.01
    assert chain.wait(rate_limited_ms("31000"), 1) is None  # beyond the cap: the next model


class OrderQuery(BaseModel):
    order_id: str


def http_order_tool(*responses: httpx.Response, **declared: Any) -> tuple[Any, list[httpx.Request]]:
    queue, seen = list(responses), []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    client = httpx.Client(transport=httpx.MockTransport(handler))
    tool = http_tool(
        "get_order",
        "Look up one order.",
        url="https://api.example.com/orders/{order_id}",
        args=OrderQuery,
        allow_hosts=["api.example.com"],
        client=client,
        **declared,
    )
    return tool, seen


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waited: list[float] = []
    monkeypatch.setattr(http_module, "_sleep", waited.append)
    return waited


def test_the_http_tool_honours_retry_after_ms(sleeps: list[float]) -> None:
    tool, seen = http_order_tool(
        httpx.Response(429, headers={"retry-after-ms": "10"}), httpx.Response(200, json={"id": "A-1"})
    )
    assert tool.invoke({"order_id": "A-1"}) == {"status": 200, "body": {"id": "A-1"}}
    assert sleeps == [0.01] and len(seen) == 2


def test_the_http_tool_reports_a_retry_after_ms_beyond_its_cap(sleeps: list[float]) -> None:
    tool, seen = http_order_tool(httpx.Response(503, headers={"retry-after-ms": "7500"}))
    with pytest.raises(HttpStatusError) as caught:
        tool.invoke({"order_id": "A-1"})
    assert caught.value.retry_after_s == 7.5
    assert "(the service asks to wait 7.5 s)" in str(caught.value)
    assert len(seen) == 1 and sleeps == []


class Throttled(ConnectionError):
    """A transient tool failure carrying the response that asked to wait."""

    def __init__(self, millis: str) -> None:
        super().__init__("throttled")
        self.response = httpx.Response(429, headers={"retry-after-ms": millis}, request=REQUEST)


def throttled_tool(millis: str, failures: int, **policy: Any) -> tuple[Any, list[float]]:
    tries: list[float] = []

    def fetch(q: str) -> str:
        tries.append(time.perf_counter())
        if len(tries) <= failures:
            raise Throttled(millis)
        return f"result for {q}"

    made = StructuredTool.from_function(fetch, name="fetch", description="Fetch")
    return with_policy(made, retries=2, backoff_s=0.0, **policy), tries


def test_tool_retries_honour_retry_after_ms() -> None:
    tool, tries = throttled_tool("200", failures=1)
    outcome = run_tool_call(tool, "c1", {"q": "x"})
    assert outcome.ok and len(tries) == 2
    assert tries[1] - tries[0] >= 0.2  # the asked wait, not the 0 s backoff


def test_a_tool_asked_to_wait_past_its_cap_fails_at_once() -> None:
    tool, tries = throttled_tool("60000", failures=5, max_retry_wait_s=1.0)
    started = time.perf_counter()
    outcome = run_tool_call(tool, "c1", {"q": "x"})
    assert not outcome.ok and len(tries) == 1
    assert time.perf_counter() - started < 5
    assert outcome.content == "ERROR: fetch failed: Throttled: throttled."


def test_tool_backoff_still_doubles_without_a_server_wait() -> None:
    failures: list[float] = []

    def fetch(q: str) -> str:
        failures.append(time.perf_counter())
        raise ConnectionError("reset")

    made = StructuredTool.from_function(fetch, name="fetch", description="Fetch")
    outcome = run_tool_call(with_policy(made, retries=2, backoff_s=0.05), "c1", {"q": "x"})
    gaps = [b - a for a, b in itertools.pairwise(failures)]
    assert not outcome.ok and len(failures) == 3 and gaps[0] >= 0.05 and gaps[1] >= 0.1


def test_doctests() -> None:
    result = doctest.testmod(retry_module)
    assert result.attempted > 0 and result.failed == 0
