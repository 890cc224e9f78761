"""Model failover over real HTTP: a fault-injecting proxy in front of the embedded model server."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

import keelgraph
from keelgraph import Contract, build_graph
from keelgraph.runtime.models import ModelChain, ModelUnavailable, chat_model
from keelgraph.settings import Settings
from keelgraph.testing.faultproxy import Fault, FaultProxy

TIMEOUT_S = 60.0
"""The client timeout where timeouts are not the point: the model server may be busy with other runs."""
SHORT_TIMEOUT_S = 5.0
"""The client timeout of the slow-response test: a warm call takes about 1.1-1.5 s here."""


class Ask(BaseModel):
    city: str


class Reply(BaseModel):
    city: str = Field(max_length=40)


# No semantic checks: every test here is about transport, so any schema-valid answer is an answer.
CONTRACT = Contract(input=Ask, output=Reply, instructions="Repeat the city's name.")


def model(url: str, name: str | None = None, timeout_s: float = TIMEOUT_S) -> Any:
    settings = dataclasses.replace(Settings.from_env(), timeout_s=timeout_s, max_tokens=48)
    return chat_model(settings, base_url=url, model=name)


@pytest.fixture(scope="module")
def upstream(model_server: str) -> str:
    """The model server, warmed up: its first call with this prompt takes longer than the client
    timeout (about 5 s), and a request the client gave up on still holds the server."""
    warm = dataclasses.replace(Settings.from_env(), timeout_s=120.0, max_tokens=48)
    assert ask(chat_model(warm, base_url=model_server))["status"] == "ok"
    return model_server


@pytest.fixture
def proxy(upstream: str) -> Iterator[FaultProxy]:
    with FaultProxy(upstream) as running:
        yield running


def ask(*models: Any, **chain: Any) -> dict[str, Any]:
    graph = build_graph(
        CONTRACT, model=ModelChain(models, **chain), strategy="json_object", checkpointer=None
    )
    return graph.invoke({"request": {"city": "Oslo"}})  # type: ignore[no-any-return]


def outcomes(result: dict[str, Any]) -> list[str]:
    return [a["outcome"] for a in result["stats"]["model_attempts"]]


def test_429_waits_for_retry_after_then_answers(proxy: FaultProxy) -> None:
    proxy.push(Fault.error(429, retry_after=1))
    result = ask(model(proxy.url))
    assert result["status"] == "ok", result["error"]
    limited, answered = proxy.seen
    assert (limited.status, answered.status) == (429, 200)
    assert limited.finished is not None
    waited = answered.started - limited.finished
    assert 1.0 <= waited < 2.0, waited
    assert outcomes(result) == ["OpenAIRateLimitError", "ok"]
    assert result["stats"]["model_attempts"][0]["wait_s"] == 1.0


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_then_success(proxy: FaultProxy, status: int) -> None:
    proxy.push(Fault.error(status))
    result = ask(model(proxy.url))
    assert result["status"] == "ok", result["error"]
    failed, answered = proxy.seen
    assert failed.finished is not None
    assert 0.25 <= answered.started - failed.finished < 1.0  # 0.5 s backoff with up to 50 % jitter
    assert result["stats"]["model_attempts"][0]["status"] == status


def test_a_response_slower_than_the_client_timeout_is_retried(proxy: FaultProxy) -> None:
    proxy.push(Fault.slow(60))
    started = time.monotonic()
    result = ask(model(proxy.url, timeout_s=SHORT_TIMEOUT_S))
    assert result["status"] == "ok", result["error"]
    slow, answered = proxy.seen
    assert slow.client_left and slow.status is None  # the client gave up; nothing went upstream
    assert answered.status == 200
    assert slow.finished is not None
    assert SHORT_TIMEOUT_S <= slow.finished - slow.started < SHORT_TIMEOUT_S + 0.5
    assert outcomes(result) == ["OpenAITimeoutError", "ok"]
    assert time.monotonic() - started < 2 * SHORT_TIMEOUT_S


@pytest.mark.parametrize("fault", [Fault.drop(), Fault.drop_mid_body()], ids=["drop", "drop_mid_body"])
def test_a_dropped_connection_is_retried(proxy: FaultProxy, fault: Fault) -> None:
    proxy.push(fault)
    result = ask(model(proxy.url))
    assert result["status"] == "ok", result["error"]
    assert [e.fault.kind for e in proxy.seen] == [fault.kind, "pass"]
    assert outcomes(result) == ["OpenAIConnectionError", "ok"]


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault.malformed(b"<html>502 Bad Gateway</html>"), "JSONDecodeError"),
        (Fault.malformed(b"{}"), "TypeError"),
        (Fault.truncated(), "JSONDecodeError"),
    ],
    ids=["not-json", "not-a-completion", "truncated"],
)
def test_a_malformed_body_is_retried(proxy: FaultProxy, fault: Fault, error: str) -> None:
    proxy.push(fault)
    result = ask(model(proxy.url))
    assert result["status"] == "ok", result["error"]
    assert outcomes(result) == [error, "ok"]


def test_primary_always_failing_falls_back_to_the_next_model(proxy: FaultProxy, upstream: str) -> None:
    proxy.default = Fault.error(503)
    started = time.monotonic()
    result = ask(model(proxy.url, "primary"), model(upstream, "fallback"), attempts=2)
    assert result["status"] == "ok", result["error"]
    assert len(proxy.seen) == 2  # the primary's two attempts, no more
    assert result["stats"]["model"] == "fallback"
    assert [(a["model"], a["outcome"]) for a in result["stats"]["model_attempts"]] == [
        ("primary", "OpenAIAPIError"),
        ("primary", "OpenAIAPIError"),
        ("fallback", "ok"),
    ]
    assert time.monotonic() - started < 10


def test_a_retry_after_beyond_the_cap_fails_over_at_once(proxy: FaultProxy, upstream: str) -> None:
    proxy.default = Fault.error(429, retry_after=120)
    result = ask(model(proxy.url, "primary"), model(upstream, "fallback"), max_wait_s=30)
    assert result["status"] == "ok", result["error"]
    assert len(proxy.seen) == 1
    first = result["stats"]["model_attempts"][0]
    assert (first["outcome"], first["wait_s"]) == ("OpenAIRateLimitError", 0.0)


def test_every_model_failing_ends_typed(upstream: str) -> None:
    with (
        FaultProxy(upstream, default=Fault.drop()) as one,
        FaultProxy(upstream, default=Fault.error(503)) as two,
    ):
        with pytest.raises(ModelUnavailable) as caught:
            ask(model(one.url, "primary"), model(two.url, "fallback"), attempts=2, base_s=0.05)
        assert (len(one.seen), len(two.seen)) == (2, 2)
    message = str(caught.value)
    assert "primary, fallback" in message and "last error OpenAIAPIError" in message


def test_streaming_passes_through_the_proxy(proxy: FaultProxy) -> None:
    proxy.push(Fault.error(503))
    graph = build_graph(CONTRACT, model=model(proxy.url), strategy="json_object", checkpointer=None)
    chunks = [
        chunk
        for chunk, _ in graph.stream({"request": {"city": "Oslo"}}, stream_mode="messages")
        if getattr(chunk, "content", "")
    ]
    assert len(chunks) > 3  # token by token, relayed as the server sent them
    assert [e.status for e in proxy.seen] == [503, 200]


def test_readme_failover_example(proxy: FaultProxy, upstream: str, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Model failover", 1)[1]
    code = re.findall(r"```py\n(.*?)```", section, re.DOTALL)[0]
    proxy.default = Fault.error(503)
    monkeypatch.setenv("KEELGRAPH_BASE_URL", proxy.url)
    monkeypatch.setenv("KEELGRAPH_MODEL", "hosted-model")
    namespace: dict[str, Any] = {"keelgraph": keelgraph, "contract": CONTRACT}
    exec(compile(code.replace("http://127.0.0.1:18089/v1", upstream), "README.md", "exec"), namespace)
    stats = namespace["result"]["stats"]
    assert namespace["result"]["status"] == "ok"
    assert stats["model"] == "qwen2.5-coder-0.5b-instruct"
    assert [a["model"] for a in stats["model_attempts"]] == ["hosted-model"] * 2 + [stats["model"]]
