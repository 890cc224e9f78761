"""The `Contract`: what a graph accepts, what it must answer, and how hard it may try."""

from __future__ import annotations

import asyncio
import concurrent.futures
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

__all__ = ["Check", "CheckContext", "Contract", "OutputInvalid"]

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


CheckResult = str | Problem | Iterable[str | Problem] | None
Check = Callable[[OutT, CheckContext[Any]], CheckResult | Awaitable[CheckResult]]
"""A semantic check: return (or raise `ValueError` with) what is wrong, or None when all is well.

Say which field is wrong, and a repair can change that field alone: begin the message with the
field's path (`"gift_wrap is true but the e-mail does not ask for it"`, `"ship_to.city ..."`), or
return a `Problem` whose `field` is the path (`Problem(field="gift_wrap", reason=..., fix=...)`).
See `keelgraph.contracts.repair.repair_schema`."""


class OutputInvalid(ValueError):
    """The answer broke the output contract; `problems` is the correction prompt."""

    def __init__(self, problems: list[Problem], kind: str = "output") -> None:
        self.problems = problems
        self.kind = kind
        super().__init__("; ".join(p.line() for p in problems))


def _run_sync(awaitable: Awaitable[CheckResult]) -> CheckResult:
    async def wrap() -> CheckResult:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wrap())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wrap()).result()


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
        try:
            self.output.model_json_schema()
            self.input.model_json_schema()
        except Exception as exc:
            raise ContractError(f"Contract models must have a JSON schema: {exc}") from exc

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
        problems: list[Problem] = []
        for check in self.checks:
            named = getattr(check, "func", check)  # a functools.partial names its function
            name = getattr(named, "__name__", type(check).__name__)
            try:
                result = check(output, ctx)
                if inspect.isawaitable(result):
                    result = _run_sync(result)
            except ValueError as exc:
                result = str(exc)
            if result is None:
                continue
            for item in [result] if isinstance(result, (str, Problem)) else list(result):
                problems.append(self._check_problem(item, name))
        return problems

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
        return Problem(field=f"{where} ({check})", reason=str(item), fix="correct the answer")


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
