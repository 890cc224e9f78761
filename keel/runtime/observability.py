"""One structured log record, and an OpenTelemetry span, for every node run of a keelgraph graph.

`graph_builder` wraps each node with `traced`. Every run of a node logs one record at INFO on the
logger `keelgraph.trace`, with its fields in `record.keelgraph` (a dict):

- `event`: always `"node"`; `node`: the node's name.
- `thread_id`, `run_id`, `step`, `checkpoint_ns`: from the run's config. `run_id` is what LangGraph
  server sets (`metadata.run_id` or `configurable.run_id`); LangGraph does not pass `invoke`'s own
  `run_id` down to nodes, so locally it is None unless you send `{"metadata": {"run_id": ...}}`.
  `checkpoint_ns` is the node task's namespace (`node:task-id`, after its parents' in a subgraph).
- `attempt`: the turn's model calls so far, this node's included (1 on the first `reason` of a turn,
  2 after a repair or a tool round...); `repairs`: the turn's failed attempts fed back to the model.
- `duration_ms`; `input_tokens` / `output_tokens`: the tokens this node spent (model calls only).
- `outcome`: `ok`, `rejected` or `failed` (the status the node set), `interrupt` (it paused for a
  person; LangGraph resumes it later) or `error` (it raised; `error` then names the exception type).
- `status`: the status the node set, if it set one.

Nothing is printed unless logging is configured: keelgraph installs no handler of its own, except
with `KEELGRAPH_LOG=json` (read when a graph is built), which puts a stderr handler with
`JsonFormatter` (one JSON object per line) on `keelgraph.trace` if it has none yet.

When the `opentelemetry` API is installed each node run is also a span `keelgraph.<node>` with the
same fields as attributes (`keelgraph.node`, `keelgraph.outcome`...). The API does nothing until an
SDK `TracerProvider` is configured, so by default this costs almost nothing.

To send the records somewhere of your choice, as JSON lines:

    handler = logging.FileHandler("nodes.jsonl")
    handler.setFormatter(JsonFormatter())
    logging.getLogger("keelgraph.trace").addHandler(handler)
    logging.getLogger("keelgraph.trace").setLevel(logging.INFO)
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any, TypeVar

from langgraph.config import get_config
from langgraph.errors import GraphInterrupt

otel_trace: ModuleType | None
try:
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - opentelemetry-api is optional
    otel_trace = None

__all__ = ["LOGGER", "JsonFormatter", "configure_from_env", "traced"]

LOGGER = logging.getLogger("keelgraph.trace")
"""Where the node records go (`keelgraph.trace`)."""

F = TypeVar("F", bound=Callable[..., Any])
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def traced(name: str, fn: F, *, tracer_provider: Any = None) -> F:
    """`fn`, a node, logging one record (and a span, with OpenTelemetry) per run; see the module.

    The wrapper keeps `fn`'s signature (`functools.wraps`), so LangGraph still injects `runtime` or
    `config` where the node asks for them. `tracer_provider` overrides the global OpenTelemetry one.
    GraphInterrupt and every other exception are recorded, then raised again unchanged.
    """

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def anode(*args: Any, **kwargs: Any) -> Any:
            run = _Run(name, tracer_provider, args, kwargs)
            with run:
                return run.done(await fn(*args, **kwargs))

        return anode  # type: ignore[return-value]

    @functools.wraps(fn)
    def node(*args: Any, **kwargs: Any) -> Any:
        run = _Run(name, tracer_provider, args, kwargs)
        with run:
            return run.done(fn(*args, **kwargs))

    return node  # type: ignore[return-value]


class _Run:
    """One node run's record and span: entered before the node, left after it (see `traced`)."""

    def __init__(
        self, name: str, tracer_provider: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.name = name
        self.state = args[0] if args else kwargs.get("state")
        self.fields = _run_fields(name)
        self.started = time.perf_counter()
        self._span_cm = _span(name, tracer_provider)
        self.span: Any = None

    def __enter__(self) -> _Run:
        self.span = self._span_cm.__enter__()
        return self

    def done(self, update: Any) -> Any:
        self.fields.update(_update_fields(self.state, update))
        return update

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        fields, span = self.fields, self.span
        if exc is not None and isinstance(exc, GraphInterrupt):
            fields["outcome"] = "interrupt"
        elif exc is not None:
            fields["outcome"] = "error"
            fields["error"] = type(exc).__name__
            if span is not None:
                span.record_exception(exc)
                span.set_status(otel_trace.StatusCode.ERROR, type(exc).__name__)  # type: ignore[union-attr]
        fields["duration_ms"] = round((time.perf_counter() - self.started) * 1000, 3)
        if span is not None:
            span.set_attributes(
                {f"keelgraph.{k}": v for k, v in fields.items() if isinstance(v, str | int | float)}
            )
        LOGGER.info(
            "node %s %s in %.1f ms",
            self.name,
            fields.get("outcome"),
            fields["duration_ms"],
            extra={"keelgraph": fields},
        )
        self._span_cm.__exit__(kind, exc, tb)


def _run_fields(name: str) -> dict[str, Any]:
    try:
        config = get_config()
    except RuntimeError:  # called outside a graph run (a unit test of the node alone)
        config = {}
    configurable = config.get("configurable") or {}
    metadata = config.get("metadata") or {}
    run_id = config.get("run_id") or configurable.get("run_id") or metadata.get("run_id")
    return {
        "event": "node",
        "node": name,
        "thread_id": _str_or_none(configurable.get("thread_id")),
        "run_id": _str_or_none(run_id),
        "step": metadata.get("langgraph_step"),
        "checkpoint_ns": configurable.get("checkpoint_ns") or "",
        "outcome": "ok",
    }


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _update_fields(state: Any, update: Any) -> dict[str, Any]:
    if not isinstance(update, Mapping):
        return {"input_tokens": 0, "output_tokens": 0}
    stats = update.get("stats") or (state.get("stats") if isinstance(state, Mapping) else None) or {}
    usage = update.get("usage") or {}
    fields: dict[str, Any] = {
        "attempt": int(stats.get("model_calls", 0)),
        "repairs": int(stats.get("repairs", 0)),
        "input_tokens": int(usage.get("input_tokens", 0)),
        "output_tokens": int(usage.get("output_tokens", 0)),
    }
    status = update.get("status")
    if status is not None:
        fields["status"] = status
        if status in ("rejected", "failed"):
            fields["outcome"] = status
    return fields


@contextmanager
def _span(name: str, provider: Any) -> Iterator[Any]:
    if otel_trace is None:
        yield None
        return
    tracer = otel_trace.get_tracer("keelgraph", tracer_provider=provider)
    # Exceptions are recorded by the wrapper: an interrupt is a pause, not an error.
    with tracer.start_as_current_span(
        f"keelgraph.{name}", record_exception=False, set_status_on_exception=False
    ) as span:
        yield span if span.is_recording() else None


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON: `timestamp` (UTC, ISO 8601), `level`, `logger`, `message`,
    then the `keelgraph` fields and any other `extra` fields; `exception` when there is one.

    >>> record = logging.makeLogRecord({"msg": "hi", "levelname": "INFO", "keelgraph": {"node": "reason"}})
    >>> json.loads(JsonFormatter().format(record))["node"]
    'reason'
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key == "keelgraph" and isinstance(value, Mapping):
                out.update(value)
            elif key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `KEELGRAPH_LOG=json` installs (a class of its own, so it is installed once)."""


def configure_from_env() -> None:
    """With `KEELGRAPH_LOG=json`, log node records as JSON lines on stderr (once; only when
    `keelgraph.trace` has no handler yet). Called by `graph_builder`; otherwise does nothing."""
    if os.environ.get("KEELGRAPH_LOG", "").strip().lower() != "json" or LOGGER.handlers:
        return
    handler = _JsonHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    LOGGER.addHandler(handler)
    if LOGGER.getEffectiveLevel() > logging.INFO:
        LOGGER.setLevel(logging.INFO)
