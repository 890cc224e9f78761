"""Running one tool call: validated arguments, a deadline, and output fenced as data."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from langchain_core.tools import BaseTool
from pydantic import BaseModel, ValidationError

from keelgraph.contracts.errors import Problem, explain
from keelgraph.contracts.parsing import storable
from keelgraph.tools.ledger import running_with_key
from keelgraph.tools.retry import Backoff, retry_after

__all__ = [
    "Approval",
    "CallOutcome",
    "SideEffect",
    "ToolPolicy",
    "fence",
    "needs_approval",
    "policy_of",
    "run_tool_call",
    "validate_args",
    "with_policy",
]

SideEffect = Literal["read", "write", "external"]
_POLICY_KEY = "keelgraph_policy"


@dataclass(frozen=True)
class GuardContext:
    """What a tool guard may look at."""

    request: Mapping[str, Any]
    """This turn's validated request."""
    earlier_answers: Sequence[Mapping[str, Any]]
    """The thread's earlier validated answers, oldest first."""
    tool_results: Sequence[Mapping[str, Any]]
    """This turn's successful tool calls so far."""


Approval = Literal["never", "always"] | Callable[[Mapping[str, Any], GuardContext], bool]
"""When a person must approve a call: never, always, or when a predicate on (args, context) holds."""


@dataclass(frozen=True)
class ToolPolicy:
    """How keelgraph runs a tool. Attach with `with_policy(tool, ...)`."""

    timeout_s: float = 15.0
    """A call still running after this is reported to the model as a failure: an async tool is
    cancelled; a sync one is abandoned (its thread cannot be killed) and never waited for."""
    retries: int = 0
    """Further tries after a transient failure (an exception in `retry_on`), with exponential
    backoff from `backoff_s`, or the wait the failure's response asks for (`retry-after-ms`,
    `Retry-After`). `write`/`external` tools retry only when `idempotent`."""
    retry_on: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    """Exceptions that mean "try again later" rather than "this call is wrong"."""
    backoff_s: float = 0.5
    max_retry_wait_s: float = 30.0
    """The longest wait between tries; when a response asks for longer, the failure is reported
    at once instead."""
    side_effect: SideEffect = "read"
    """`read` tools may be repeated safely; `write` and `external` ones change the world."""
    max_output_chars: int = 4_000
    """Longer results are cut, and the cut is said, so one tool cannot flood the context."""
    max_stored_chars: int = 100_000
    """Results longer than this (as JSON text) are kept in the thread only as their first
    `max_stored_chars` characters, so one tool cannot bloat every checkpoint of the thread."""
    offer_when: Callable[[Mapping[str, Any]], bool] | None = None
    """Offer the tool to the model only for requests where this holds (given the validated
    request). A write tool gated this way cannot be called needlessly."""
    present: Callable[[Any], str] | None = None
    """How the result is shown to the model (a line per record reads better than nested JSON for
    small models); checks and the thread still get the structured output."""
    guard: Callable[[Mapping[str, Any], GuardContext], str | None] | None = None
    """Checked before the tool runs: return why this call must not run (it goes back to the model
    as a repair), or None. For write tools, the place to demand evidence for the arguments."""
    choices: Callable[[GuardContext], Mapping[str, Sequence[Any]]] | None = None
    """Allowed values per argument, given the request and the thread (an empty list: no limit).
    Enforced before the tool runs, and written into the step's schema as an `enum`, so a
    schema-constrained model cannot even write another value."""
    preload: bool = False
    """Run the tool at the start of every turn, with all arguments from the request, before the
    model is asked anything: facts the model always needs are fetched, not hoped for."""
    from_input: tuple[str, ...] = ()
    """Arguments always taken from the validated request (e.g. `customer_id`), whatever the
    model wrote: the model cannot act for another customer."""
    from_user: tuple[str, ...] = ()
    """Arguments whose values must be written by the user in this thread (a recipient, an
    account, an amount): a value that appears only in a tool result is refused, so an instruction
    planted in tool output cannot choose where a write goes. A person's approval overrides."""
    approval: Approval = "never"
    """Whether a person must approve a call before it runs: `"never"`, `"always"`, or a predicate
    on the arguments and context (e.g. refunds over 100). The graph pauses with a LangGraph
    `interrupt()`; the person approves, edits the arguments, or rejects (see README, Approvals)."""
    idempotency_key: Callable[[Mapping[str, Any], GuardContext], str] | None = None
    """For `write`/`external` tools: the key under which a completed call is recorded in the
    effect ledger (a replay with the same key returns the recorded result instead of acting
    again). By default: the thread, the turn, the tool and its arguments."""
    idempotent: bool = False
    """The tool passes `keelgraph.tools.effect_key()` to a system that deduplicates by it, so a
    call cut off mid-way (process killed, timeout) may be repeated with the same key. Without
    it such a call is not repeated and the model is told its outcome is unknown."""


def with_policy(tool: BaseTool, **policy: Any) -> BaseTool:
    """Return `tool` with a keelgraph `ToolPolicy` in its metadata (the tool itself is unchanged).

    >>> from langchain_core.tools import tool
    >>> @tool
    ... def ping() -> str:
    ...     '''Answer pong.'''
    ...     return "pong"
    >>> policy_of(with_policy(ping, timeout_s=2)).timeout_s
    2
    """
    base = policy_of(tool)
    copy = tool.model_copy()
    copy.metadata = {**(tool.metadata or {}), _POLICY_KEY: replace(base, **policy)}
    return copy


def policy_of(tool: BaseTool) -> ToolPolicy:
    found = (tool.metadata or {}).get(_POLICY_KEY)
    return found if isinstance(found, ToolPolicy) else ToolPolicy()


@dataclass
class CallOutcome:
    """What happened to one tool call; `content` is what the model will read."""

    call_id: str
    name: str
    args: dict[str, Any]
    ok: bool
    content: str
    output: Any = None
    problems: list[Problem] = field(default_factory=list)
    kind: Literal["ok", "tool_args", "tool_error", "timeout"] = "ok"
    seconds: float = 0.0

    @classmethod
    def failed(
        cls,
        call_id: str,
        name: str,
        args: dict[str, Any],
        *,
        kind: Literal["tool_error", "timeout"],
        reason: str,
        fix: str,
        seconds: float = 0.0,
    ) -> CallOutcome:
        """A call that did not succeed; the model reads `ERROR: <reason>.`"""
        problem = Problem(field=name, reason=reason, fix=fix)
        return cls(
            call_id,
            name,
            args,
            ok=False,
            content=f"ERROR: {reason}.",
            problems=[problem],
            kind=kind,
            seconds=seconds,
        )


def fence(name: str, output: Any, limit: int) -> str:
    """Label a tool result as untrusted data, capped at `limit` characters."""
    text = output if isinstance(output, str) else json.dumps(output, default=str, ensure_ascii=False)
    if len(text) > limit:
        text = f"{text[:limit]}... [cut: {len(text) - limit} more characters]"
    return f"<tool_result name={json.dumps(name)}>\n{text}\n</tool_result>"


def needs_approval(tool: BaseTool, args: Mapping[str, Any], ctx: GuardContext) -> bool:
    """Whether this call must wait for a person, by the tool's `approval` policy."""
    rule = policy_of(tool).approval
    if rule == "never":
        return False
    if rule == "always":
        return True
    return bool(rule(args, ctx))


def allowed_values(tool: BaseTool, ctx: GuardContext) -> dict[str, list[Any]]:
    """The tool's argument choices in this context, without the empty (unlimited) ones."""
    policy = policy_of(tool)
    if policy.choices is None:
        return {}
    return {name: list(values) for name, values in policy.choices(ctx).items() if values}


def validate_args(tool: BaseTool, args: Mapping[str, Any]) -> list[Problem]:
    """The problems of `args` against the tool's argument schema (empty when valid)."""
    schema = tool.args_schema
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        try:
            schema.model_validate(dict(args))
        except ValidationError as exc:
            return explain(exc, prefix="args", model=schema)
    return []


def _attempt_call(tool: BaseTool, args: dict[str, Any], timeout_s: float, key: str | None) -> dict[str, Any]:
    """One try under the deadline: `{"output": ...}`, `{"error": exc}` or `{"timeout": True}`."""
    box: dict[str, Any] = {}
    is_async = getattr(tool, "func", None) is None and getattr(tool, "coroutine", None) is not None

    def target() -> None:
        try:
            with running_with_key(key):
                if is_async:  # cancelled at the deadline, so it stops instead of running on
                    box["output"] = asyncio.run(asyncio.wait_for(tool.ainvoke(args), timeout_s))
                else:
                    box["output"] = tool.invoke(args)
        except TimeoutError:
            box["timeout"] = True
        except Exception as exc:  # a tool's failure is reported to the model, not raised
            box["error"] = exc

    # A daemon thread per call: a hung sync tool is abandoned without blocking later calls.
    worker = threading.Thread(target=target, name=f"keelgraph-tool-{tool.name}", daemon=True)
    worker.start()
    worker.join(timeout_s + (1.0 if is_async else 0.0))  # an async tool gets time to be cancelled
    if worker.is_alive():
        return {"timeout": True}
    return box


def run_tool_call(
    tool: BaseTool, call_id: str, args: dict[str, Any], *, effect_key: str | None = None
) -> CallOutcome:
    """Validate `args`, run the tool under its deadline, and describe the outcome for the model.

    `effect_key` is what `keelgraph.tools.effect_key()` returns inside the tool.
    """
    policy = policy_of(tool)
    problems = validate_args(tool, args)
    if problems:
        lines = "\n".join(f"- {p.line()}" for p in problems)
        return CallOutcome(
            call_id,
            tool.name,
            args,
            ok=False,
            content=f"ERROR: invalid arguments for {tool.name}; nothing was run.\n{lines}",
            problems=problems,
            kind="tool_args",
        )
    tries = 1 + (policy.retries if policy.side_effect == "read" or policy.idempotent else 0)
    backoff = Backoff(policy.backoff_s, cap_s=policy.max_retry_wait_s)
    started = time.perf_counter()
    for number in range(1, tries + 1):
        box = _attempt_call(tool, args, policy.timeout_s, effect_key)
        error = box.get("error")
        if number == tries or not isinstance(error, policy.retry_on):
            break
        wait = backoff.delay(number, retry_after=retry_after(error))
        if wait is None:  # the service asks for longer than the policy waits
            break
        time.sleep(wait)
    seconds = time.perf_counter() - started
    failure: tuple[Literal["timeout", "tool_error"], str, str] | None = None
    tried = f" ({number} tries)" if number > 1 else ""
    if box.get("timeout"):
        reason = f"the tool did not finish within {policy.timeout_s:g} s{tried}"
        failure = ("timeout", reason, "answer with what you know, or try a narrower request")
    elif "error" in box:
        exc = box["error"]
        failure = (
            "tool_error",
            f"{tool.name} failed{tried}: {type(exc).__name__}: {exc}",
            "check the arguments",
        )
    if failure is not None:
        kind, reason, fix = failure
        return CallOutcome.failed(
            call_id, tool.name, args, kind=kind, reason=reason, fix=fix, seconds=seconds
        )
    output = box.get("output")
    if isinstance(output, BaseModel):
        output = output.model_dump(mode="json")
    output = storable(output)  # integers past 64 bits become text: the thread must be able to keep it
    text = output if isinstance(output, str) else json.dumps(output, default=str, ensure_ascii=False)
    content = fence(tool.name, policy.present(output) if policy.present else text, policy.max_output_chars)
    if len(text) > policy.max_stored_chars:
        cut = len(text) - policy.max_stored_chars
        output = f"{text[: policy.max_stored_chars]}... [cut for storage: {cut} more characters]"
    return CallOutcome(call_id, tool.name, args, ok=True, content=content, output=output, seconds=seconds)
