"""The `Contract`: what a graph accepts, what it must answer, and how hard it may try."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from keelgraph.contracts.boundary import LIMITS, REFUSED_REQUEST, ROOT, UNSTORABLE, Limits, check_value
from keelgraph.contracts.decision import inline_refs
from keelgraph.contracts.errors import ContractError, InputRejected, Problem, explain
from keelgraph.contracts.parsing import ParseError, loads_strict, oversized_ints
from keelgraph.contracts.repair import field_paths, named_field
from keelgraph.contracts.suspend import Await, Steps, adrive, drive

__all__ = ["Check", "CheckContext", "Computed", "Contract", "OutputInvalid", "Review"]

PLAIN_FIX = "change the answer so this no longer holds"
"""The fix a check's plain-text complaint gets when it names none (`"...; write y"` names one)."""

InT = TypeVar("InT", bound=BaseModel)
ModelT = TypeVar("ModelT", bound=BaseModel)
OutT = TypeVar("OutT", bound=BaseModel)


@dataclass(frozen=True)
class CheckContext(Generic[InT]):
    """What a semantic check may look at besides the answer."""

    input: InT
    """The validated request of this turn."""
    tool_results: Sequence[Mapping[str, Any]] = ()
    """This turn's successful tool calls: `{"name", "args", "output"}` each."""
    context: Any = None
    """The run's `Context` object (user id, knobs), when the graph has one."""
    earlier_answers: Sequence[Mapping[str, Any]] = ()
    """The thread's earlier answers, oldest first (as far as the graph's `history_tokens` reaches
    back): what a check compares a follow-up against ("keep the order id unless the customer
    changes it")."""


@dataclass(frozen=True)
class Computed:
    """A check's complaint that a field must hold a value the check computed itself: a total that
    must equal the sum of the items, a date the request states. Return it like any complaint.

    keelgraph does not ask the model for a value it was handed: when every complaint about an answer
    is a `Computed` one, the values are written into the answer and it is checked again (no model
    call); otherwise the repair's grammar pins these fields to their values while the model fixes
    the rest.

    >>> Computed("total", 32.87, "the items add up to 32.87").value
    32.87
    """

    field: str
    """The answer field's dotted path (`"total"`, `"items.0.line_total"`)."""
    value: Any
    """The value the field must hold (JSON data)."""
    reason: str = ""
    """Why, in plain words (shown in the repair prompt and the record of the turn)."""


CheckResult = str | Problem | Computed | Iterable[str | Problem | Computed] | None
Check = Callable[[OutT, CheckContext[Any]], CheckResult | Awaitable[CheckResult]]
"""A semantic check: return (or raise `ValueError` with) what is wrong, or None when all is well.

Say which field is wrong, and a repair can change that field alone: begin the message with the
field's path (`"gift_wrap is true but the e-mail does not ask for it"`, `"ship_to.city ..."`), or
return a `Problem` whose `field` is the path (`Problem(field="gift_wrap", reason=..., fix=...)`).
See `keelgraph.contracts.repair.repair_schema`. Where the check knows the right value, return
`Computed(field, value, reason)`: it is written in rather than asked for.

A check that reads `ctx.tool_results` and complains is taken to say that the answer needs tool
evidence it does not have (no result yet, or not the right one): the next step must call a tool,
while the turn still offers one (see `Review.needs_tool`)."""


@dataclass(frozen=True)
class Review:
    """What the checks found in one answer (`Contract.review`)."""

    problems: list[Problem]
    """Every complaint, as the correction prompt states it."""
    computed: dict[str, Any] = field(default_factory=dict)
    """Values checks computed for fields (`Computed`), by dotted answer path."""
    needs_tool: bool = False
    """A failing check read `tool_results`: the answer is judged by tool evidence (none yet, or not
    the evidence it needs), so the repair step must call a tool while any is still offered."""
    computed_only: bool = False
    """Every problem is a `Computed` one: writing the values in may be the whole repair."""


class _Watched(Sequence[Mapping[str, Any]]):
    """A check context's tool results that remember being read."""

    def __init__(self, items: Sequence[Mapping[str, Any]]) -> None:
        self._items = list(items)
        self.read = False

    def __getitem__(self, index: Any) -> Any:
        self.read = True
        return self._items[index]

    def __len__(self) -> int:
        self.read = True
        return len(self._items)

    def __iter__(self) -> Any:
        self.read = True
        return iter(self._items)

    def __bool__(self) -> bool:
        self.read = True
        return bool(self._items)

    def __repr__(self) -> str:
        return repr(self._items)


class OutputInvalid(ValueError):
    """The answer broke the output contract; `problems` is the correction prompt."""

    def __init__(self, problems: list[Problem], kind: str = "output") -> None:
        self.problems = problems
        self.kind = kind
        super().__init__("; ".join(p.line() for p in problems))


def _too_big(value: BaseModel, prefix: str) -> list[Problem]:
    return [
        Problem(
            field=f"{prefix}.{path}" if prefix else path,
            reason="the integer is beyond the 64-bit range and cannot be stored",
            fix="send a number between -9223372036854775808 and 9223372036854775807",
        )
        for path in oversized_ints(value.model_dump(mode="json"))
    ]


def _narrow(node: dict[str, Any], path: list[str], values: list[Any]) -> bool:
    """Put `enum` on the field at `path`, through lists and optional (`anyOf`) branches.

    Returns whether the path named a field at all.
    """
    found = False
    for option in node.get("anyOf", []):
        if isinstance(option, dict) and option.get("type") != "null":
            found = _narrow(option, path, values) or found
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        return _narrow(node["items"], path, values) or found
    if not path:
        if "anyOf" not in node:
            # Values the field itself refuses (a quantity over its maximum) are not offered: the
            # grammar would let the model write them, and validation would reject them.
            node["enum"] = [v for v in values if _admissible(node, v)] or values
        return True
    sub = node.get("properties", {}).get(path[0])
    if isinstance(sub, dict):
        found = _narrow(sub, path[1:], values) or found
    return found


_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def _admissible(node: Mapping[str, Any], value: Any) -> bool:
    """Whether `value` passes the field schema's own type, enum and limits (as far as checked here)."""
    kind = node.get("type")
    if isinstance(kind, str) and kind in _TYPES and not _TYPES[kind](value):
        return False
    if "enum" in node and value not in node["enum"]:
        return False
    if "const" in node and value != node["const"]:
        return False
    if _TYPES["number"](value):
        low, high = node.get("minimum"), node.get("maximum")
        above, below = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
        if (
            (low is not None and value < low)
            or (high is not None and value > high)
            or (above is not None and value <= above)
            or (below is not None and value >= below)
        ):
            return False
    if isinstance(value, str):
        if len(value) < node.get("minLength", 0) or len(value) > node.get("maxLength", len(value)):
            return False
        pattern = node.get("pattern")
        try:
            if isinstance(pattern, str) and re.search(pattern, value) is None:
                return False
        except re.error:  # a dialect Python does not read: validation will judge
            pass
    return True


def _values_at(data: Any, path: list[str]) -> list[Any]:
    """The values at a dotted path of dumped data, through lists; missing and null ones skipped."""
    if isinstance(data, list):
        return [v for item in data for v in _values_at(item, path)]
    if not path:
        return [] if data is None else [data]
    if isinstance(data, dict) and path[0] in data:
        return _values_at(data[path[0]], path[1:])
    return []


@dataclass(frozen=True)
class Contract(Generic[InT, OutT]):
    """One declaration per graph: input model, output model, semantic checks, repair budget.

    >>> from pydantic import BaseModel, Field
    >>> class Ask(BaseModel):
    ...     question: str = Field(min_length=1, max_length=500)
    >>> class Reply(BaseModel):
    ...     text: str
    >>> c = Contract(input=Ask, output=Reply, instructions="Answer briefly.")
    >>> c.parse_output('{"text": "hi"}').text
    'hi'
    """

    input: type[InT]
    output: type[OutT]
    instructions: str
    checks: Sequence[Check[OutT]] = ()
    repair_budget: int = 3
    """Failed attempts (bad output, failed check, bad tool call) tolerated in one turn."""
    max_request_chars: int = 20_000
    """Requests longer than this (as JSON text) are rejected before parsing."""
    render: Callable[[InT], str] | None = None
    """How a validated request is shown to the model; JSON of its fields by default."""
    choices: Callable[[CheckContext[InT]], Mapping[str, Sequence[Any]]] | None = None
    """Allowed values of output fields in this turn's context, by dotted path (`"result"`,
    `"items.product"` for a field of every list item). Written into the answer's schema as an
    `enum`, so a schema-constrained model cannot write anything else, and enforced on the answer.
    An empty list means no limit. Like a tool policy's `choices`, for answers."""
    derive: Callable[[dict[str, Any], CheckContext[InT]], dict[str, Any]] | None = None
    """Fill or correct the answer's fields that the system knows for certain (an id returned
    by a tool, the action that ran) before validation, instead of trusting the model with them."""
    needs_tool: bool = False
    """The answer must rest on what a tool returned this turn ("use exactly one tool to get the
    fact"). Until a tool has returned, the model is offered tool calls only: its step's grammar has
    no final answer, and native tool calling gets `tool_choice="required"` without the answer tool.
    When no tool may be offered (none passes `offer_when`, or the tool rounds are spent) the answer
    is offered as usual, and the checks judge it."""
    judgement: Sequence[str] = ()
    """Answer fields whose value is a judgement no check can verify (a category, a priority, a
    yes/no): before such an answer ships, the model is asked `judgement_samples - 1` more times
    (sampled, answer only) and every valid sample must agree with it on these fields (strings
    compared without case and surrounding space). When they disagree the turn fails with
    `Uncertain` carrying the votes, for a person or a larger model to decide: an answer the model
    itself would not give twice is not shipped. Dotted paths (`"ticket.category"`)."""
    judgement_samples: int = 3
    """How many answers (the checked one included) must agree on the `judgement` fields."""
    name: str = field(default="")
    strict: bool = False
    """Validate requests and answers in Pydantic's strict mode, as JSON: `"21"` is then no integer
    and `1.0` no `int`, while dates and other formatted strings stay text. Off by default (Pydantic's
    lax mode: such values are converted); tool arguments are always strict
    (`keelgraph.tools.arguments`). Either way the boundary policy (depth, sizes, text, finite
    numbers) applies."""

    def __post_init__(self) -> None:
        for role, model in (("input", self.input), ("output", self.output)):
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise ContractError(f"Contract {role} must be a Pydantic BaseModel subclass, got {model!r}")
        if not self.instructions.strip():
            raise ContractError("Contract instructions are empty: tell the model its job")
        if not 0 <= self.repair_budget <= 20:
            raise ContractError(f"repair_budget must be between 0 and 20, got {self.repair_budget}")
        for check in self.checks:
            if not callable(check):
                raise ContractError(f"Contract check {check!r} is not callable")
        if not 2 <= self.judgement_samples <= 9:
            raise ContractError(f"judgement_samples must be between 2 and 9, got {self.judgement_samples}")
        if isinstance(self.judgement, str):
            raise ContractError(f"judgement is a list of field paths, like ({self.judgement!r},)")
        try:
            self.output.model_json_schema()
            self.input.model_json_schema()
        except Exception as exc:
            raise ContractError(f"Contract models must have a JSON schema: {exc}") from exc
        for path in self.judgement:
            if tuple(path.split(".")) not in self._field_paths:
                raise ContractError(
                    f"Contract judgement names {path!r}, which is not a field of {self.output.__name__}; "
                    "use a dotted path of its fields, like 'category'"
                )

    # -- input ---------------------------------------------------------------------------------

    def parse_input(self, raw: Any) -> InT:
        """Validate a request (a dict, or JSON text); raise `InputRejected` naming each fix."""
        fields = ", ".join(self.input.model_fields)
        example = "{" + ", ".join(f'"{f}": ...' for f in self.input.model_fields) + "}"
        if raw is None:
            raise InputRejected(
                [Problem(field="request", reason="no request was sent", fix=f"send {example}")]
            )
        if (
            isinstance(raw, Mapping)
            and len(raw) == 1
            and (key := next(iter(raw))) in {REFUSED_REQUEST, UNSTORABLE}
        ):
            raise InputRejected(_record_problems(raw[key], example))
        if isinstance(raw, (bytes, bytearray)):
            try:
                raw = bytes(raw).decode("utf-8")
            except UnicodeDecodeError as exc:
                reason = f"the body is not valid UTF-8 (byte {exc.start:,})"
                raise InputRejected(
                    [Problem(field="request", reason=reason, fix="send UTF-8 text")]
                ) from None
        if isinstance(raw, str):
            if len(raw) > self.max_request_chars:
                raise InputRejected([self._oversize(len(raw))])
            try:
                raw = loads_strict(raw, limits=self.limits)
            except ParseError as exc:
                raise InputRejected(_at_request(exc.problems)) from None
            except json.JSONDecodeError as exc:
                raise InputRejected(
                    [
                        Problem(
                            field="request",
                            reason=f"the body is not valid JSON ({exc.msg} at column {exc.colno})",
                            fix=f"send a JSON object like {example}",
                        )
                    ]
                ) from None
        elif isinstance(raw, Mapping) and (problems := check_value(raw, self.limits)):
            raise InputRejected(_at_request(problems))
        if not isinstance(raw, Mapping):
            raise InputRejected(
                [
                    Problem(
                        field="request",
                        reason=f"expected a JSON object with fields {fields}, got {type(raw).__name__}",
                        fix=f"send {example}",
                    )
                ]
            )
        size = len(json.dumps(raw, default=str))
        if size > self.max_request_chars:
            raise InputRejected([self._oversize(size)])
        try:
            value = self._validate(self.input, raw)
        except ValidationError as exc:
            raise InputRejected(explain(exc, model=self.input)) from None
        if too_big := _too_big(value, ""):
            raise InputRejected(too_big)
        return value

    @property
    def limits(self) -> Limits:
        """The boundary limits of this contract's requests and answers (depth, sizes, numbers)."""
        return LIMITS

    def _validate(self, model: type[ModelT], value: Any) -> ModelT:
        if self.strict:
            return model.model_validate_json(json.dumps(value, default=str), strict=True)
        return model.model_validate(value)

    def _oversize(self, size: int) -> Problem:
        return Problem(
            field="request",
            reason=f"the request is {size:,} characters, over the limit of {self.max_request_chars:,}",
            fix="shorten the message or split it into several requests",
        )

    def render_input(self, value: InT) -> str:
        if self.render is not None:
            return self.render(value)
        return value.model_dump_json()

    # -- output --------------------------------------------------------------------------------

    def output_schema(self) -> dict[str, Any]:
        """The output model's JSON schema, generated once per contract (read it, don't mutate it)."""
        return self._output_schema

    @functools.cached_property
    def _output_schema(self) -> dict[str, Any]:
        return self.output.model_json_schema()

    def allowed_output(self, ctx: CheckContext[InT]) -> dict[str, list[Any]]:
        """The output choices in this context, without the empty (unlimited) ones."""
        if self.choices is None:
            return {}
        return {path: list(values) for path, values in self.choices(ctx).items() if values}

    def output_schema_for(self, ctx: CheckContext[InT]) -> dict[str, Any]:
        """The output schema narrowed by `choices` for this context (refs inlined when narrowed)."""
        allowed = self.allowed_output(ctx)
        if not allowed:
            return self.output_schema()
        schema = inline_refs(self.output_schema())  # a fresh copy: choices never leak into the shared schema
        for path, values in allowed.items():
            if not _narrow(schema, path.split("."), values):
                raise ContractError(
                    f"Contract choices name {path!r}, which is not a field of {self.output.__name__}; "
                    "use a dotted path of its fields, like 'items.product'"
                )
        return schema

    def choice_problems(self, output: OutT, ctx: CheckContext[InT]) -> list[Problem]:
        """A problem for every answer value outside its field's choices in this context."""
        problems = []
        data = output.model_dump(mode="json")
        for path, values in self.allowed_output(ctx).items():
            for found in _values_at(data, path.split(".")):
                if found not in values:
                    problems.append(
                        Problem(
                            field=f"answer.{path}",
                            reason=f"{found!r} is not one of the values allowed here",
                            fix=f"use one of {values}",
                        )
                    )
        return problems

    def parse_output(self, value: Any) -> OutT:
        """Validate an answer (dict or JSON text) against the output model; raise `OutputInvalid`."""
        if isinstance(value, str):
            try:
                value = loads_strict(value, limits=self.limits)
            except ParseError as exc:
                raise OutputInvalid(
                    [p.model_copy(update={"field": "answer"}) if p.field == ROOT else p for p in exc.problems]
                ) from None
            except json.JSONDecodeError as exc:
                raise OutputInvalid(
                    [
                        Problem(
                            field="answer",
                            reason=f"the answer is not valid JSON ({exc.msg})",
                            fix="write one JSON object",
                        )
                    ]
                ) from None
        elif problems := check_value(value, self.limits, where="answer"):
            raise OutputInvalid(problems)
        try:
            output = self._validate(self.output, value)
        except ValidationError as exc:
            raise OutputInvalid(explain(exc, prefix="answer", model=self.output)) from None
        if too_big := _too_big(output, "answer"):
            raise OutputInvalid(too_big)
        return output

    def run_checks(self, output: OutT, ctx: CheckContext[InT]) -> list[Problem]:
        """Run every semantic check; each complaint becomes a `Problem` (the correction prompt)."""
        return self.review(output, ctx).problems

    def review(self, output: OutT, ctx: CheckContext[InT]) -> Review:
        """Run every semantic check: the problems, the values checks computed, and whether a
        failing check asked for a tool result that is not there (see `Review`). An async check
        is run to completion here; `areview` awaits it instead."""
        return drive(self.reviewing(output, ctx))

    async def areview(self, output: OutT, ctx: CheckContext[InT]) -> Review:
        """`review`, awaiting async checks on the running event loop."""
        return await adrive(self.reviewing(output, ctx))

    def reviewing(self, output: OutT, ctx: CheckContext[InT]) -> Steps[Review]:
        """`review` as steps (`keelgraph.contracts.suspend`): it yields each async check's result."""
        problems: list[Problem] = []
        computed: dict[str, Any] = {}
        needs_tool = False
        plain = 0
        for check in self.checks:
            named = getattr(check, "func", check)  # a functools.partial names its function
            name = getattr(named, "__name__", type(check).__name__)
            watched = _Watched(ctx.tool_results)
            try:
                result = check(output, dataclasses.replace(ctx, tool_results=watched))
                if inspect.isawaitable(result):
                    result = yield Await(result)
            except ValueError as exc:
                result = str(exc)
            if result is None:
                continue
            items = [result] if isinstance(result, (str, Problem, Computed)) else list(result)
            if items and watched.read:
                needs_tool = True  # judged by tool evidence: more of it may be what fixes the answer
            for item in items:
                if isinstance(item, Computed):
                    path = item.field.removeprefix("answer.")
                    computed[path] = item.value
                    fix = f"write {json.dumps(item.value, default=str)}"
                    why = item.reason or f"{path} must be {item.value!r}"
                    problems.append(self._check_problem(Problem(field=path, reason=why, fix=fix), name))
                else:
                    plain += 1
                    problems.append(self._check_problem(item, name))
        return Review(problems, computed, needs_tool, computed_only=bool(computed) and not plain)

    @functools.cached_property
    def _field_paths(self) -> set[tuple[str, ...]]:
        return field_paths(inline_refs(self.output_schema()))

    def _check_problem(self, item: str | Problem, check: str) -> Problem:
        """A check's complaint as a `Problem` on `answer.<field> (<check>)`, or on `answer (<check>)`
        when it names no field of the answer."""
        if isinstance(item, Problem):
            given = item.field.removeprefix("answer.")
            path = tuple(p for p in given.split(".") if p and not p.isdigit())
            where = f"answer.{given}" if path in self._field_paths else "answer"
            return Problem(field=f"{where} ({check})", reason=item.reason, fix=item.fix)
        named = named_field(str(item), self._field_paths)
        where = f"answer.{'.'.join(named)}" if named else "answer"
        reason, _, fix = str(item).partition("; ")  # "x is wrong; write y": the check's own fix
        if not fix.strip():
            fix = f"change {'.'.join(named)} so this no longer holds" if named else PLAIN_FIX
        return Problem(field=f"{where} ({check})", reason=reason, fix=fix)


def _at_request(problems: list[Problem]) -> list[Problem]:
    """Boundary problems of a request: paths as the fields are named, the whole value as `request`."""
    return [p.model_copy(update={"field": "request"}) if p.field in {ROOT, ""} else p for p in problems]


def _record_problems(record: Any, example: str) -> list[Problem]:
    """The problems a thread's bounded record of a request holds (see `stored_request`)."""
    found = record.get("problems") if isinstance(record, Mapping) else None
    problems = [Problem.model_validate(p) for p in found or []]
    return problems or [
        Problem(field="request", reason="the request could not be kept", fix=f"send {example}")
    ]
