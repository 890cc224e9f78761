"""Typed errors, grouped by who must act: the caller, the model, or the developer."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "Attempt",
    "BudgetExceeded",
    "ContractError",
    "Failure",
    "InputRejected",
    "KeelgraphError",
    "ModelUnavailable",
    "Problem",
    "RepairExhausted",
    "RunError",
    "ThreadBusy",
    "Uncertain",
    "UserError",
    "explain",
]


class Problem(BaseModel):
    """One thing that was wrong: where, why, and what to do about it."""

    model_config = ConfigDict(frozen=True)

    field: str
    """Dotted path of the offending field (`(root)` for the whole value)."""
    reason: str
    """What was wrong, in plain words."""
    fix: str
    """What to send instead."""

    def line(self) -> str:
        return f"{self.field}: {self.reason} -> {self.fix}"


AttemptKind = Literal[
    "output",
    "check",
    "parse",
    "tool_args",
    "unknown_tool",
    "repeated_call",
    "rejected_call",
    "sample",
    "no_tool",
]
"""What a failed try got wrong; `no_tool`: it answered where a tool call was required."""


class Attempt(BaseModel):
    """One failed try of the model inside a turn, kept so a failure can be audited."""

    number: int
    kind: AttemptKind
    raw: str
    """What the model wrote, verbatim (truncated to 4,000 characters)."""
    problems: list[Problem]


class Failure(BaseModel):
    """A run's typed failure as plain data: stored in the thread and returned over HTTP."""

    type: Literal[
        "InputRejected", "RepairExhausted", "BudgetExceeded", "ModelUnavailable", "Uncertain", "ThreadBusy"
    ]
    code: str
    message: str
    problems: list[Problem] = Field(default_factory=list)
    attempts: list[Attempt] = Field(default_factory=list)
    usage: dict[str, int] = Field(default_factory=dict)

    def to_exception(self) -> RunError:
        if self.type == "InputRejected":
            return InputRejected(self.problems)
        if self.type == "BudgetExceeded":
            return BudgetExceeded.from_failure(self)
        if self.type == "ModelUnavailable":
            return ModelUnavailable([], None, message=self.message)
        if self.type == "Uncertain":
            return Uncertain(self.problems, self.attempts, usage=self.usage, message=self.message)
        if self.type == "ThreadBusy":
            return ThreadBusy.from_failure(self)
        return RepairExhausted(self.attempts, usage=self.usage, message=self.message)


class KeelgraphError(Exception):
    """Base of every keelgraph error; `code` is stable and safe to match on."""

    code: ClassVar[str] = "keelgraph_error"


class UserError(KeelgraphError):
    """The developer's mistake (a misconfigured contract, tool or graph): fix the code."""

    code = "user_error"


class ContractError(UserError):
    """A contract that cannot work, caught when it is declared rather than at run time."""

    code = "contract_misconfigured"


class RunError(KeelgraphError):
    """A run ended without a valid answer; `failure` holds the same facts as data."""

    code = "run_error"

    def to_failure(self) -> Failure:
        raise NotImplementedError


class InputRejected(RunError):
    """The caller's request broke the input contract. Fix the request and send it again.

    >>> InputRejected([Problem(field="message", reason="is empty", fix="write a message")]).code
    'input_rejected'
    """

    code = "input_rejected"

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        lines = "; ".join(p.line() for p in self.problems)
        super().__init__(f"request rejected: {lines}")

    def to_failure(self) -> Failure:
        return Failure(type="InputRejected", code=self.code, message=str(self), problems=self.problems)


class RepairExhausted(RunError):
    """The model kept breaking the output contract until the repair budget ran out.

    `attempts` has every failed try with its raw output and errors; `usage` is what was spent.
    Raise the budget, strengthen the prompt, or use a stronger model.
    """

    code = "repair_exhausted"

    def __init__(
        self, attempts: list[Attempt], *, usage: dict[str, int] | None = None, message: str = ""
    ) -> None:
        self.attempts = list(attempts)
        self.usage = dict(usage or {})
        self.last_raw = self.attempts[-1].raw if self.attempts else ""
        super().__init__(
            message
            or f"no valid answer after {len(self.attempts)} failed attempt(s); last problems: "
            + "; ".join(p.line() for p in (self.attempts[-1].problems if self.attempts else []))
        )

    def to_failure(self) -> Failure:
        return Failure(
            type="RepairExhausted",
            code=self.code,
            message=str(self),
            problems=self.attempts[-1].problems if self.attempts else [],
            attempts=self.attempts,
            usage=self.usage,
        )


class Uncertain(RunError):
    """The answer passed every check, but the model did not give its `judgement` fields again when
    asked again (see `Contract.judgement`): an answer it would not stand behind is not shipped.

    `problems` names each field with the values the samples gave; `attempts` holds the samples
    (their raw output). Route the request to a person, give the model more to go on (the request,
    the instructions), or use a stronger model.

    >>> Uncertain([Problem(field="answer.category", reason="samples gave 'a', 'b'", fix="ask a person")]).code
    'uncertain'
    """

    code = "uncertain"

    def __init__(
        self,
        problems: list[Problem],
        attempts: list[Attempt] | None = None,
        *,
        usage: dict[str, int] | None = None,
        message: str = "",
    ) -> None:
        self.problems = list(problems)
        self.attempts = list(attempts or [])
        self.usage = dict(usage or {})
        super().__init__(
            message or "the model did not agree with itself: " + "; ".join(p.line() for p in self.problems)
        )

    def to_failure(self) -> Failure:
        return Failure(
            type="Uncertain",
            code=self.code,
            message=str(self),
            problems=self.problems,
            attempts=self.attempts,
            usage=self.usage,
        )


BusyReason = Literal["held", "lost", "changed"]


class ThreadBusy(RunError):
    """Another run holds the thread, so this turn was refused: one writer per thread.

    `reason` says how it was found: "held" (another run held the thread when this one began, so this
    run wrote nothing and ran no tools), "lost" (this run's hold on the thread expired while it ran
    and another run took the thread: this run's later writes were refused) or "changed" (another
    writer, one that takes no lease, wrote the thread after this run read it). `remaining_s` is how
    long the other run's hold has left (None when unknown). Retry the turn later (it was not kept),
    or send each thread's turns through one writer at a time; see `keelgraph.graphs.lease`.

    >>> error = ThreadBusy("t-1", remaining_s=12.5)
    >>> error.code, error.thread_id
    ('thread_busy', 't-1')
    """

    code = "thread_busy"

    def __init__(
        self,
        thread_id: str,
        *,
        reason: BusyReason = "held",
        remaining_s: float | None = None,
        waited_s: float = 0.0,
        message: str = "",
    ) -> None:
        self.thread_id = thread_id
        self.reason: BusyReason = reason
        self.remaining_s = remaining_s
        self.waited_s = waited_s
        super().__init__(message or self._message())

    def _message(self) -> str:
        thread = f"thread {self.thread_id!r}"
        if self.reason == "lost":
            return (
                f"{thread} was taken by another run while this one ran (this run's lease expired "
                "without a write), so this run's later writes were refused and its turn was not kept; "
                "send the turn again, and raise KEELGRAPH_THREAD_LEASE_S above the slowest step of a turn"
            )
        if self.reason == "changed":
            return (
                f"{thread} was written by another writer after this run read it, so this run's write "
                "was refused and its turn was not kept; send the turn again, and write each thread "
                "through keelgraph's checkpointers only (one writer per thread)"
            )
        held = "" if self.remaining_s is None else f" for up to {self.remaining_s:.0f} s more"
        waited = f" after waiting {self.waited_s:.1f} s" if self.waited_s else ""
        return (
            f"{thread} is busy: another run holds it{held}, so this turn was refused{waited} before "
            "it wrote anything or ran any tool; retry later (or set KEELGRAPH_THREAD_WAIT_S to wait), "
            "and send each thread's turns through one writer at a time"
        )

    def to_failure(self) -> Failure:
        problem = Problem(
            field="thread_id",
            reason=f"{self.reason}: {self.thread_id}",
            fix="retry later, or send each thread's turns through one writer at a time",
        )
        return Failure(type="ThreadBusy", code=self.code, message=str(self), problems=[problem])

    @classmethod
    def from_failure(cls, failure: Failure) -> ThreadBusy:
        """The error back from its `to_failure()` data.

        >>> again = ThreadBusy("t-1", reason="lost").to_failure().to_exception()
        >>> type(again).__name__, again.thread_id, again.reason
        ('ThreadBusy', 't-1', 'lost')
        """
        reason, _, thread = failure.problems[0].reason.partition(": ") if failure.problems else ("", "", "")
        known: BusyReason = "lost" if reason == "lost" else "changed" if reason == "changed" else "held"
        return cls(thread, reason=known, message=failure.message)


Budget = Literal["turn", "thread"]
BudgetUnit = Literal["tokens", "cost", "seconds"]


class BudgetExceeded(RunError):
    """The next model call could take a spend budget past its limit, so it was not made; or the
    turn ran out of time, so nothing more was started.

    `budget` is "turn" or "thread"; `unit` is "tokens" (`max_turn_tokens` / `max_thread_tokens`:
    `limit`, `spent` and `estimate` count input + output tokens), "cost" (`max_turn_cost` /
    `max_thread_cost`: in the currency of the graph's `prices`) or "seconds" (`turn_timeout_s`,
    turn only: `spent` is the turn's time so far, `estimate` 0). `estimate` is the next call's
    estimated cost; `usage` is what the turn spent. Raise the budget, or start a new thread for a
    spent thread budget.

    >>> BudgetExceeded("turn", limit=100, spent=80, estimate=40).code
    'budget_exceeded'
    >>> BudgetExceeded("thread", limit=0.5, spent=0.49, estimate=0.02, unit="cost").to_failure().problems[0].field
    'max_thread_cost'
    >>> BudgetExceeded("turn", limit=30, spent=30.2, estimate=0, unit="seconds").to_failure().problems[0].field
    'turn_timeout_s'
    """

    code = "budget_exceeded"

    def __init__(
        self,
        budget: Budget,
        *,
        limit: float,
        spent: float,
        estimate: float,
        usage: dict[str, int] | None = None,
        unit: BudgetUnit = "tokens",
    ) -> None:
        self.budget: Budget = budget
        self.unit: BudgetUnit = unit
        self.limit, self.spent, self.estimate = limit, spent, estimate
        self.usage = dict(usage or {})
        if unit == "seconds":
            super().__init__(
                f"the turn ran out of time, so nothing more was started: {self._n(spent)} s of "
                f"{self.setting}={self._n(limit)} spent; " + self.fix
            )
            return
        what = "token budget" if unit == "tokens" else "cost budget"
        super().__init__(
            f"the {budget} {what} would be exceeded, so the model was not called: "
            f"{self._n(spent)} of {self.setting}={self._n(limit)} spent, next call estimated at "
            f"{self._n(estimate)}; " + self.fix
        )

    def _n(self, value: float) -> str:
        if self.unit == "tokens":
            return str(int(value))
        return f"{value:.{3 if self.unit == 'seconds' else 6}f}".rstrip("0").rstrip(".")

    @property
    def setting(self) -> str:
        if self.unit == "seconds":
            return "turn_timeout_s"
        return f"max_{self.budget}_{'tokens' if self.unit == 'tokens' else 'cost'}"

    @property
    def fix(self) -> str:
        if self.unit == "seconds":
            return f"raise {self.setting}, or send a narrower request"
        if self.budget == "turn":
            return f"raise {self.setting}, or send a shorter request"
        return f"raise {self.setting}, or start a new thread"

    def to_failure(self) -> Failure:
        reason = f"{self._n(self.spent)} spent + {self._n(self.estimate)} estimated > {self._n(self.limit)}"
        if self.unit == "seconds":
            reason = f"{self._n(self.spent)} s since the turn began >= {self._n(self.limit)} s"
        problem = Problem(field=self.setting, reason=reason, fix=self.fix)
        # Failure.usage holds integers: a cost is kept in millionths of the currency unit, a time
        # in milliseconds.
        scale = _SCALE[self.unit]
        numbers = {k: round(getattr(self, k) * scale) for k in ("limit", "spent", "estimate")}
        return Failure(
            type="BudgetExceeded",
            code=self.code,
            message=str(self),
            problems=[problem],
            usage={**self.usage, **numbers},
        )

    @classmethod
    def from_failure(cls, failure: Failure) -> BudgetExceeded:
        usage = dict(failure.usage)
        field = failure.problems[0].field if failure.problems else ""
        unit: BudgetUnit = (
            "seconds" if field == "turn_timeout_s" else "cost" if field.endswith("_cost") else "tokens"
        )
        scale = _SCALE[unit]
        numbers = {k: usage.pop(k, 0) / scale for k in ("limit", "spent", "estimate")}
        if unit == "tokens":
            numbers = {k: int(v) for k, v in numbers.items()}
        budget: Budget = "thread" if field.startswith("max_thread") else "turn"
        return cls(budget, usage=usage, unit=unit, **numbers)


_SCALE: dict[BudgetUnit, int] = {"tokens": 1, "cost": 1_000_000, "seconds": 1_000}


def _field(loc: tuple[int | str, ...], prefix: str) -> str:
    parts = [str(p) for p in loc]
    path = ".".join(parts)
    if prefix:
        return f"{prefix}.{path}" if path else prefix
    return path or "(root)"


def _fix(err: Any, allowed: list[str]) -> str:
    kind: str = err["type"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    name = str(err["loc"][-1]) if err["loc"] else "value"
    if kind == "missing":
        return f"add the required field `{name}`"
    if kind == "extra_forbidden":
        hint = f"; allowed fields: {', '.join(allowed)}" if allowed else ""
        return f"remove `{name}`{hint}"
    if kind == "string_too_short":
        return f"send at least {ctx.get('min_length', 1)} character(s) of text"
    if kind == "string_too_long":
        return f"shorten it to at most {ctx.get('max_length')} characters"
    if kind in {"too_short", "too_long"}:
        return f"send a list with {err['msg'].split('should have ', 1)[-1].split(' after')[0]}"
    if kind.startswith("int_") or kind == "int_type":
        return "send a whole number, for example 42"
    if kind.startswith("float_") or kind.startswith("decimal_"):
        return "send a number, for example 12.5"
    if kind.startswith("bool_"):
        return "send true or false"
    if kind in {"string_type", "string_unicode"}:
        return "send text in double quotes"
    if kind in {"dict_type", "model_type", "model_attributes_type"}:
        return "send a JSON object ({...})"
    if kind in {"list_type", "tuple_type", "set_type"}:
        return "send a JSON list ([...])"
    if kind in {"literal_error", "enum"}:
        return f"use one of: {ctx.get('expected', '')}".rstrip(": ")
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        return f"send a number that {err['msg'].lower().removeprefix('input ')}"
    if kind == "string_pattern_mismatch":
        return f"match the pattern {ctx.get('pattern')}"
    if kind in {"value_error", "assertion_error"}:
        return "correct the value as the reason says"
    return f"correct the value ({err['msg']})"


def explain(
    error: ValidationError, *, prefix: str = "", model: type[BaseModel] | None = None
) -> list[Problem]:
    """Turn a Pydantic `ValidationError` into `Problem`s that name the field and the fix.

    The same text serves as the caller's error message and as the model's correction prompt.
    """
    allowed = list(model.model_fields) if model is not None else []
    problems: list[Problem] = []
    for err in error.errors(include_url=False):
        reason = err["msg"]
        if err["type"] not in {"missing", "extra_forbidden"} and "input" in err:
            shown = repr(err["input"])
            reason = f"{reason} (got {shown[:80]}{'...' if len(shown) > 80 else ''})"
        problems.append(Problem(field=_field(err["loc"], prefix), reason=reason, fix=_fix(err, allowed)))
    return problems


class ModelUnavailable(RunError):
    """No model of the chain answered: every one failed with transient errors (or a `Retry-After`
    longer than the chain waits). `attempts` has every request that was made.

    The one failure `invoke` raises instead of returning as data, on purpose: it says nothing about
    the request, only that the endpoint is down. The turn stays where it was (the request is in the
    thread, the checkpoint before the model call is the latest), so `graph.invoke(None, config)`
    resumes it unchanged once the endpoint is back, and LangGraph server marks the run as an error
    its own retry and alerting see. `to_failure()` gives the same facts as data (for logs or a reply).
    """

    code = "model_unavailable"

    def __init__(
        self, attempts: list[dict[str, Any]], last: BaseException | None, *, message: str = ""
    ) -> None:
        self.attempts = list(attempts)
        self.models = list(dict.fromkeys(str(a["model"]) for a in self.attempts))
        self.last_error = last
        if not message:
            outcomes = ", ".join(f"{a['model']}: {a['outcome']}" for a in self.attempts)
            last_text = f"{type(last).__name__}: {str(last)[:300]}" if last is not None else "none"
            message = (
                f"no model answered after {len(self.attempts)} request(s) to {', '.join(self.models)} "
                f"({outcomes}); last error {last_text}. The request is kept in the thread: resume "
                "with graph.invoke(None, config) when the endpoint is back, or add a fallback model "
                "(build_graph(model=[primary, fallback]) or KEELGRAPH_FALLBACK_MODELS)"
            )
        super().__init__(message)

    def to_failure(self) -> Failure:
        return Failure(type="ModelUnavailable", code=self.code, message=str(self))
