"""One structured record, and an OpenTelemetry span, per node run (`keelgraph.runtime.observability`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from langchain_core.tools import StructuredTool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.runtime import Runtime
from pydantic import BaseModel

from keelgraph import Context, Contract, build_graph, with_policy
from keelgraph.runtime.observability import LOGGER, JsonFormatter, configure_from_env, traced
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools import MemoryLedger


class Question(BaseModel):
    city: str


class Forecast(BaseModel):
    city: str
    celsius: int


def weather(city: str) -> str:
    return f"{city}: 21 C"


def refund(city: str) -> str:
    return f"refunded in {city}"


CONTRACT = Contract(input=Question, output=Forecast, instructions="Report the weather.")
CFG: Any = {"configurable": {"thread_id": "obs-1"}}


def _graph(script: list[Any], tools: list[Any] | None = None) -> tuple[Any, ScriptedChatModel]:
    model = ScriptedChatModel(script)
    default = [StructuredTool.from_function(weather, name="weather", description="Weather for a city")]
    graph = build_graph(
        CONTRACT,
        default if tools is None else tools,
        model=model,
        checkpointer=InMemorySaver(),
        effects=MemoryLedger(),
        strategy="json_object",
    )
    return graph, model


def _records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.keelgraph for r in caplog.records if r.name == "keelgraph.trace"]


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="keelgraph.trace")


def test_a_turn_with_a_tool_logs_every_node_in_order(caplog: pytest.LogCaptureFixture) -> None:
    graph, _ = _graph([call("weather", city="Oslo"), answer(city="Oslo", celsius=21)])
    result = graph.invoke({"request": {"city": "Oslo"}}, {**CFG, "metadata": {"run_id": "run-1"}})
    assert result["status"] == "ok"
    records = _records(caplog)
    assert [r["node"] for r in records] == ["validate_input", "reason", "act", "reason", "check_output"]
    assert {r["thread_id"] for r in records} == {"obs-1"}
    assert {r["run_id"] for r in records} == {"run-1"}
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["event"] == "node" and r["outcome"] == "ok" and r["duration_ms"] >= 0 for r in records)
    reasons = [r for r in records if r["node"] == "reason"]
    assert [r["attempt"] for r in reasons] == [1, 2]
    assert all(r["input_tokens"] > 0 and r["output_tokens"] > 0 for r in reasons)
    assert all(r["input_tokens"] == 0 for r in records if r["node"] != "reason")
    assert records[0]["status"] == "running" and records[-1]["status"] == "ok"


def test_a_rejected_request_is_logged_as_rejected(caplog: pytest.LogCaptureFixture) -> None:
    graph, _ = _graph([])
    assert graph.invoke({"request": {"town": "Oslo"}}, CFG)["status"] == "rejected"
    [record] = _records(caplog)
    assert record["node"] == "validate_input" and record["outcome"] == "rejected"


def test_a_node_that_raises_is_logged_and_the_error_propagates(caplog: pytest.LogCaptureFixture) -> None:
    graph, _ = _graph([RuntimeError("the model fell over")])
    with pytest.raises(RuntimeError, match="fell over"):
        graph.invoke({"request": {"city": "Oslo"}}, CFG)
    last = _records(caplog)[-1]
    assert last["node"] == "reason" and last["outcome"] == "error" and last["error"] == "RuntimeError"


def test_an_approval_interrupt_is_logged_and_the_run_pauses(caplog: pytest.LogCaptureFixture) -> None:
    tool = with_policy(
        StructuredTool.from_function(refund, name="refund", description="Refund"),
        side_effect="write",
        approval="always",
    )
    graph, _ = _graph([call("refund", city="Oslo"), answer(city="Oslo", celsius=1)], [tool])
    paused = graph.invoke({"request": {"city": "Oslo"}}, CFG)
    assert paused["__interrupt__"] and graph.get_state(CFG).next == ("approve",)
    last = _records(caplog)[-1]
    assert last["node"] == "approve" and last["outcome"] == "interrupt"


def test_runtime_still_reaches_the_nodes_that_take_it() -> None:
    seen: list[Any] = []

    def node(state: dict[str, Any], runtime: Runtime[Context] | None = None) -> dict[str, Any]:
        seen.append(runtime)
        return {}

    from langgraph.graph import START, StateGraph

    builder: Any = StateGraph(dict, context_schema=Context)  # type: ignore[type-var]
    builder.add_node("n", traced("n", node))
    builder.add_edge(START, "n")
    builder.compile().invoke({"x": 1}, context=Context(user_id="u1"))
    assert seen[0] is not None and seen[0].context.user_id == "u1"


def test_the_json_formatter_writes_one_parseable_line(caplog: pytest.LogCaptureFixture) -> None:
    graph, _ = _graph([answer(city="Oslo", celsius=21)], [])
    graph.invoke({"request": {"city": "Oslo"}}, CFG)
    record = next(
        r for r in caplog.records if r.name == "keelgraph.trace" and r.keelgraph["node"] == "reason"
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "INFO" and data["logger"] == "keelgraph.trace"
    assert data["timestamp"].endswith("Z") and data["message"].startswith("node reason ok")
    assert data["node"] == "reason" and data["thread_id"] == "obs-1" and data["input_tokens"] > 0


def test_keelgraph_log_json_installs_one_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    before = list(LOGGER.handlers)
    monkeypatch.setattr(LOGGER, "handlers", [])
    try:
        monkeypatch.delenv("KEELGRAPH_LOG", raising=False)
        configure_from_env()
        assert LOGGER.handlers == []  # unset: users configure logging
        monkeypatch.setenv("KEELGRAPH_LOG", "json")
        configure_from_env()
        configure_from_env()
        [handler] = LOGGER.handlers
        assert isinstance(handler.formatter, JsonFormatter)
    finally:
        LOGGER.handlers = before


def test_each_node_run_is_an_opentelemetry_span(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Only this test sees the provider: the global one stays unset for the rest of the suite.
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    graph, _ = _graph([call("weather", city="Oslo"), RuntimeError("down")])
    with pytest.raises(RuntimeError):
        graph.invoke({"request": {"city": "Oslo"}}, CFG)
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == [
        "keelgraph.validate_input",
        "keelgraph.reason",
        "keelgraph.act",
        "keelgraph.reason",
    ]
    first = spans[1].attributes or {}
    assert first["keelgraph.node"] == "reason" and first["keelgraph.thread_id"] == "obs-1"
    assert first["keelgraph.outcome"] == "ok" and int(first["keelgraph.input_tokens"]) > 0  # type: ignore[call-overload]
    failed = spans[-1]
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert (failed.attributes or {})["keelgraph.error"] == "RuntimeError"
    assert [e.name for e in failed.events] == ["exception"]


def test_traced_works_outside_a_graph(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    assert traced("solo", lambda state: {"status": "failed"})({}) == {"status": "failed"}
    [record] = _records(caplog)
    assert record["thread_id"] is None and record["outcome"] == "failed"
