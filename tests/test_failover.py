"""Model failover without a network: keelgraph's transient-error rule, backoff, and the model chain."""

from __future__ import annotations

import doctest
import json
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from langchain_core.exceptions import ModelAuthenticationError, ModelRateLimitError
from langchain_core.language_models import BaseChatModel
from langchain_core.tools import StructuredTool
from langgraph.types import RetryPolicy
from pydantic import BaseModel, Field

from keelgraph import Contract, UserError, build_graph, sqlite_checkpointer
from keelgraph.graphs import graph_builder
from keelgraph.runtime import models as models_module
from keelgraph.runtime.models import (
    ModelChain,
    ModelUnavailable,
    as_chain,
    default_chain,
    is_transient,
    model_label,
    retry_after,
)
from keelgraph.settings import Settings
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.testing import faultproxy as faultproxy_module

REQUEST = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
REQUEST2 = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")  # what openai sends with


def reply(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers, request=REQUEST, json={"error": {"message": "x"}})


def status_error(cls: type[openai.APIStatusError], status: int, **headers: str) -> openai.APIStatusError:
    response = httpx2.Response(status, headers=headers, request=REQUEST2, json={"error": {"message": "x"}})
    return cls(f"Error code: {status}", response=response, body=None)  # type: ignore[arg-type]


def http_error(status: int, **headers: str) -> httpx.HTTPStatusError:
    return httpx.HTTPStatusError(str(status), request=REQUEST, response=reply(status, **headers))


def rate_limited(seconds: str | None = None) -> openai.RateLimitError:
    headers = {"retry-after": seconds} if seconds is not None else {}
    error = status_error(openai.RateLimitError, 429, **headers)
    assert isinstance(error, openai.RateLimitError)
    return error


def not_json() -> json.JSONDecodeError:
    try:
        json.loads("<html>")
    except json.JSONDecodeError as exc:
        return exc
    raise AssertionError("unreachable")


TRANSIENT = {
    "openai timeout": openai.APITimeoutError(request=REQUEST),
    "openai connection": openai.APIConnectionError(request=REQUEST),
    "httpx connect": httpx.ConnectError("refused", request=REQUEST),
    "httpx read timeout": httpx.ReadTimeout("slow", request=REQUEST),
    "httpx dropped": httpx.RemoteProtocolError("Server disconnected without sending a response."),
    "httpx2 dropped": httpx2.RemoteProtocolError("Server disconnected without sending a response."),
    "httpx2 read timeout": httpx2.ReadTimeout("slow", request=REQUEST2),
    "builtin timeout": TimeoutError(),
    "connection reset": ConnectionResetError(),
    "openai 429": rate_limited(),
    "httpx 429": http_error(429),
    "openai 408": status_error(openai.APIStatusError, 408),
    "openai 500": status_error(openai.InternalServerError, 500),
    "openai 502": status_error(openai.InternalServerError, 502),
    "openai 503": status_error(openai.InternalServerError, 503),
    "httpx 504": http_error(504),
    "httpx2 503": httpx2.HTTPStatusError(
        "503", request=REQUEST2, response=httpx2.Response(503, request=REQUEST2)
    ),
    "malformed: not json": not_json(),
    "malformed: not a dict": ValueError(
        "Unexpected response type from OpenAI-compatible endpoint. Expected a dict or openai.BaseModel"
    ),
    "malformed: no choices": TypeError("Received response with null value for 'choices'. This can happen"),
    "langchain rate limit": ModelRateLimitError("slow down"),
}
PERMANENT = {
    "openai 400": status_error(openai.BadRequestError, 400),
    "openai 401": status_error(openai.AuthenticationError, 401),
    "openai 403": status_error(openai.PermissionDeniedError, 403),
    "openai 404": status_error(openai.NotFoundError, 404),
    "openai 422": status_error(openai.UnprocessableEntityError, 422),
    "openai 501": status_error(openai.InternalServerError, 501),
    "httpx 400": http_error(400),
    "httpx 401": http_error(401),
    "plain ValueError": ValueError("invalid literal"),
    "KeyError": KeyError("x"),
    "langchain auth": ModelAuthenticationError("bad key"),
    "script exhausted": AssertionError("no more replies"),
}


@pytest.mark.parametrize("exc", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_transient_errors_are_retried(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", PERMANENT.values(), ids=PERMANENT.keys())
def test_caller_and_config_errors_are_not(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_the_rule_fixes_what_langgraphs_default_gets_wrong() -> None:
    default = RetryPolicy().retry_on
    assert callable(default)
    cases = [(http_error(429), True), (TimeoutError(), True), (PERMANENT["openai 400"], False)]
    for exc, ours in cases:
        assert default(exc) is not ours  # type: ignore[arg-type]
        assert is_transient(exc) is ours


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after(status_error(openai.RateLimitError, 429, **headers)) == seconds
    assert retry_after(http_error(429, **headers)) == seconds


def test_retry_after_as_an_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    asked = retry_after(http_error(503, **{"retry-after": when}))
    assert asked is not None and 17 <= asked <= 20
    assert retry_after(TimeoutError()) is None


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    chain = ModelChain((ScriptedChatModel([]),), attempts=10, base_s=0.5, max_wait_s=3.0, jitter=0.5)
    timeout = TRANSIENT["openai timeout"]
    assert [chain.wait(timeout, n, rng=lambda: 0.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert [chain.wait(timeout, n, rng=lambda: 1.0) for n in range(1, 4)] == [0.25, 0.5, 1.0]
    assert chain.wait(timeout, 10) is None  # the last attempt: move on
    assert chain.wait(PERMANENT["openai 401"], 1) is None


def test_retry_after_is_honoured_exactly_or_the_chain_moves_on() -> None:
    chain = ModelChain((ScriptedChatModel([]),), max_wait_s=30.0)
    assert chain.wait(rate_limited("7"), 1) == 7.0
    assert chain.wait(rate_limited("31"), 1) is None  # beyond the cap: the next model, at once


@pytest.mark.parametrize(
    "kwargs",
    [{"models": ()}, {"attempts": 0}, {"base_s": -1.0}, {"jitter": 1.5}, {"handover_after": 0}],
)
def test_a_chain_that_cannot_work_is_refused(kwargs: dict[str, Any]) -> None:
    kwargs.setdefault("models", (ScriptedChatModel([]),))
    with pytest.raises(UserError):
        ModelChain(**kwargs)


def test_model_argument_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEELGRAPH_MODEL_ATTEMPTS", "5")
    monkeypatch.setenv("KEELGRAPH_MAX_RETRY_WAIT", "4")
    a, b = ScriptedChatModel([]), ScriptedChatModel([])
    assert as_chain(a).models == (a,) and as_chain(a).attempts == 5 and as_chain(a).max_wait_s == 4.0
    assert as_chain([a, b]).models == (a, b)
    assert as_chain(lambda: a).model(0) is a
    chain = ModelChain((a,), attempts=1)
    assert as_chain(chain) is chain
    with pytest.raises(UserError, match="names no model"):
        as_chain([])


def test_fallback_models_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEELGRAPH_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("KEELGRAPH_MODEL", "big")
    monkeypatch.setenv("KEELGRAPH_FALLBACK_MODELS", "small, tiny")
    monkeypatch.setenv("KEELGRAPH_MODEL_ATTEMPTS", "2")
    chain = default_chain()
    assert len(chain.models) == 3 and chain.attempts == 2 and chain.max_wait_s == 30.0
    fallback = chain.model(1)
    assert model_label(fallback) == "small" and model_label(chain.model(2)) == "tiny"
    assert getattr(fallback, "openai_api_base", None) == "http://127.0.0.1:9/v1"
    assert getattr(fallback, "max_retries", None) == 0
    monkeypatch.setenv("KEELGRAPH_FALLBACK_BASE_URL", "http://127.0.0.1:8/v1")
    monkeypatch.delenv("KEELGRAPH_FALLBACK_MODELS")
    chain = default_chain()
    assert len(chain.models) == 2
    assert model_label(chain.model(1)) == "big"
    assert getattr(chain.model(1), "openai_api_base", None) == "http://127.0.0.1:8/v1"
    assert Settings.from_env({}).fallback_models == ()
    with pytest.raises(UserError, match="KEELGRAPH_MODEL_ATTEMPTS"):
        Settings.from_env({"KEELGRAPH_MODEL_ATTEMPTS": "many"})


# -- the chain inside a graph -----------------------------------------------------------------


class Question(BaseModel):
    city: str = Field(min_length=1, max_length=40)


class Forecast(BaseModel):
    city: str
    celsius: int = Field(ge=-60, le=60)


CONTRACT = Contract(input=Question, output=Forecast, instructions="Report the weather.", repair_budget=3)
GOOD = answer(city="Oslo", celsius=21)


def weather(city: str) -> dict[str, Any]:
    return {"city": city, "celsius": 21}


WEATHER = StructuredTool.from_function(weather, name="weather", description="Weather of a city")


def graph_for(
    *models: BaseChatModel,
    tmp: Path | None = None,
    tools: Any = (),
    strategy: str = "json_object",
    **chain: Any,
) -> Any:
    chain.setdefault("base_s", 0.01)
    return build_graph(
        CONTRACT,
        tools,
        model=ModelChain(models, **chain),
        strategy=strategy,  # type: ignore[arg-type]
        checkpointer=sqlite_checkpointer(tmp / "threads.db") if tmp else None,
    )


def ask(graph: Any, thread: str = "t") -> dict[str, Any]:
    return graph.invoke({"request": {"city": "Oslo"}}, {"configurable": {"thread_id": thread}})  # type: ignore[no-any-return]


def test_a_transient_error_is_retried_on_the_same_model_and_recorded() -> None:
    model = ScriptedChatModel([TRANSIENT["openai 503"], GOOD])
    result = ask(graph_for(model))
    assert result["status"] == "ok" and len(model.calls) == 2
    stats = result["stats"]
    assert (
        stats["model_calls"] == 1
        and stats["transport_errors"] == 1
        and stats["model"] == "keelgraph-scripted"
    )
    first, second = stats["model_attempts"]
    assert (first["outcome"], first["status"], first["position"]) == ("InternalServerError", 503, 0)
    assert 0.005 <= first["wait_s"] <= 0.01
    assert (second["outcome"], second["status"], second["wait_s"]) == ("ok", None, 0.0)


def test_the_reason_node_has_no_langgraph_retry_policy_to_multiply_attempts() -> None:
    builder = graph_builder(CONTRACT, model=ScriptedChatModel([]), effects=None)
    assert not builder.nodes["reason"].retry_policy


def test_primary_failing_hands_the_call_to_the_fallback_with_tools_bound() -> None:
    primary = ScriptedChatModel([TRANSIENT["openai timeout"]], repeat_last=True)
    fallback = ScriptedChatModel(
        [_native("weather", {"city": "Oslo"}), _native("final_answer", {"city": "Oslo", "celsius": 21})]
    )
    result = ask(graph_for(primary, fallback, tools=[WEATHER], strategy="tool_calling", attempts=2))
    assert result["status"] == "ok", result
    assert len(primary.calls) == 2  # its attempts, then never again in this turn
    assert len(fallback.calls) == 2
    offered = [t["function"]["name"] for t in fallback.calls[0]["kwargs"]["tools"]]
    assert offered == ["weather", "final_answer"]
    assert fallback.calls[0]["kwargs"]["tool_choice"] == "required"
    assert fallback.calls[1]["kwargs"]["tool_choice"] == "final_answer"
    positions = [(a["position"], a["outcome"]) for a in result["stats"]["model_attempts"]]
    assert positions == [(0, "APITimeoutError"), (0, "APITimeoutError"), (1, "ok"), (1, "ok")]
    assert result["stats"]["transport_errors"] == 2


def _native(name: str, args: dict[str, Any]) -> Any:
    from langchain_core.messages import AIMessage

    return AIMessage("", tool_calls=[{"name": name, "args": args, "id": f"c_{name}", "type": "tool_call"}])


def test_the_fallback_gets_the_json_schema_format_too() -> None:
    primary = ScriptedChatModel([TRANSIENT["openai 429"]], repeat_last=True)
    fallback = ScriptedChatModel([GOOD])
    result = ask(graph_for(primary, fallback, attempts=1))
    assert result["status"] == "ok"
    fmt = fallback.calls[0]["kwargs"]["extra_body"]["response_format"]
    assert fmt["type"] == "json_object" and "answer" in json.dumps(fmt["schema"])


@pytest.mark.parametrize("attempts", [1, 2, 3])
@pytest.mark.parametrize("n_models", [1, 2, 3])
def test_never_more_requests_than_the_bound_and_a_typed_error_at_the_end(
    attempts: int, n_models: int, tmp_path: Path
) -> None:
    errors = [TRANSIENT["openai 503"], TRANSIENT["httpx dropped"], TRANSIENT["builtin timeout"]]
    models = [ScriptedChatModel([errors[i]], repeat_last=True) for i in range(n_models)]
    graph = graph_for(*models, tmp=tmp_path, attempts=attempts, base_s=0.0)
    with pytest.raises(ModelUnavailable) as caught:
        ask(graph)
    assert [len(m.calls) for m in models] == [attempts] * n_models
    error = caught.value
    assert error.code == "model_unavailable" and len(error.attempts) == attempts * n_models
    assert error.models == ["keelgraph-scripted"]
    assert type(error.last_error).__name__ in str(error) and "keelgraph-scripted" in str(error)
    assert error.__cause__ is error.last_error
    # The request is kept: the thread resumes where it stopped once a model answers.
    models[-1].script = [GOOD]
    models[-1].calls.clear()
    config: Any = {"configurable": {"thread_id": "t"}}
    assert graph.get_state(config).next == ("reason",)
    assert graph.invoke(None, config)["status"] == "ok"


def test_a_caller_error_is_raised_at_once_without_failover() -> None:
    primary = ScriptedChatModel([PERMANENT["openai 401"]])
    fallback = ScriptedChatModel([GOOD])
    with pytest.raises(openai.AuthenticationError):
        ask(graph_for(primary, fallback))
    assert len(primary.calls) == 1 and fallback.calls == []


def test_a_retry_after_beyond_the_cap_fails_over_without_waiting() -> None:
    primary = ScriptedChatModel([rate_limited("120")], repeat_last=True)
    fallback = ScriptedChatModel([GOOD])
    started = time.monotonic()
    result = ask(graph_for(primary, fallback, attempts=3, max_wait_s=30.0))
    assert time.monotonic() - started < 1.0
    assert result["status"] == "ok" and len(primary.calls) == 1


def test_a_short_retry_after_is_waited_for() -> None:
    model = ScriptedChatModel([rate_limited("0.3"), GOOD])
    started = time.monotonic()
    result = ask(graph_for(model))
    assert time.monotonic() - started >= 0.3
    assert result["stats"]["model_attempts"][0]["wait_s"] == 0.3


def test_a_malformed_body_is_retried_once_then_the_next_model_answers() -> None:
    primary = ScriptedChatModel([TRANSIENT["malformed: not json"]], repeat_last=True)
    fallback = ScriptedChatModel([GOOD])
    result = ask(graph_for(primary, fallback, attempts=5))
    assert result["status"] == "ok" and len(primary.calls) == 2 and len(fallback.calls) == 1


def test_a_model_that_keeps_breaking_the_contract_hands_over() -> None:
    primary = ScriptedChatModel(["not json", "still not json"])
    fallback = ScriptedChatModel([answer(city="Oslo", celsius=99), GOOD])
    result = ask(graph_for(primary, fallback, handover_after=2))
    assert result["status"] == "ok", result
    assert len(primary.calls) == 2 and len(fallback.calls) == 2
    assert result["stats"]["repairs"] == 3 and result["stats"]["transport_errors"] == 0
    assert [a["position"] for a in result["stats"]["model_attempts"]] == [0, 0, 1, 1]


def test_after_a_failover_the_turn_stays_on_the_fallback_and_the_next_turn_tries_the_primary(
    tmp_path: Path,
) -> None:
    primary = ScriptedChatModel([TRANSIENT["openai 503"], GOOD])
    fallback = ScriptedChatModel([call("weather", city="Oslo"), GOOD])
    graph = graph_for(primary, fallback, tmp=tmp_path, tools=[WEATHER], attempts=1)
    first = ask(graph)
    assert first["status"] == "ok" and len(primary.calls) == 1 and len(fallback.calls) == 2
    second = ask(graph)
    assert second["status"] == "ok" and len(primary.calls) == 2
    assert [(a["position"], a["outcome"]) for a in second["stats"]["model_attempts"]] == [(0, "ok")]


def test_a_factory_is_resolved_only_when_the_chain_reaches_it() -> None:
    made: list[str] = []

    def fallback() -> BaseChatModel:
        made.append("fallback")
        return ScriptedChatModel([GOOD])

    primary = ScriptedChatModel([GOOD])
    graph = build_graph(CONTRACT, model=[primary, fallback], strategy="json_object", checkpointer=None)
    assert ask(graph)["status"] == "ok" and made == []


def test_doctests() -> None:
    for module in (models_module, faultproxy_module):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
