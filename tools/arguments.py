"""A tool's arguments: one JSON schema whatever form the tool declares, validated strictly.

Tools come with a Pydantic model, a JSON-Schema dict (which langchain-core accepts and then never
checks) or a function signature. Every form is shown to the model as the same JSON schema and
validated the same way before anything runs:

- unknown arguments are refused, whatever the model's `extra` setting (a misspelt argument would
  otherwise be dropped and the tool run with its default);
- values are not coerced: `"10"` for an integer, `true` or `1.0` for an integer are refused with
  the fix, as JSON Schema and Pydantic's strict mode read them (the model writes the value again;
  a silent coercion would hide what it wrote). Dates and other strings-with-a-format stay text, as
  JSON has them.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from typing import Any, cast

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from langchain_core.tools import BaseTool
from pydantic import BaseModel, ValidationError

from keelgraph.contracts.decision import inline_refs
from keelgraph.contracts.errors import Problem, UserError, explain

__all__ = ["UNKNOWN_ARGUMENT", "args_schema", "validate_args"]

UNKNOWN_ARGUMENT = "there is no argument named {name!r}"
UNKNOWN_ARGUMENT_FIX = "use only the arguments {names}"
NO_ARGUMENTS_FIX = "call it without arguments"
SCHEMA_FIX = "send a value that matches the schema: {hint}"
_SHOWN = 60


def args_schema(tool: BaseTool) -> dict[str, Any]:
    """The JSON schema of `tool`'s arguments, `$ref`s resolved, whatever form the tool declares.

    >>> from langchain_core.tools import StructuredTool
    >>> schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    >>> t = StructuredTool.from_function(lambda n: n, name="t", description="d", args_schema=schema)
    >>> args_schema(t)["properties"]
    {'n': {'type': 'integer'}}
    """
    declared = tool.args_schema
    if isinstance(declared, Mapping):
        return inline_refs(dict(declared))
    # A Pydantic model's schema is built once per model (pydantic takes about 0.6 ms each time, and
    # every step asks for every offered tool's); each caller gets its own copy to narrow.
    model = declared if isinstance(declared, type) and issubclass(declared, BaseModel) else None
    model = model or cast(type[BaseModel], tool.get_input_schema())
    text = _SCHEMAS.get(model)
    if text is None:
        text = _SCHEMAS[model] = json.dumps(inline_refs(model.model_json_schema()))
    return cast(dict[str, Any], json.loads(text))


_SCHEMAS: weakref.WeakKeyDictionary[type[BaseModel], str] = weakref.WeakKeyDictionary()


def _unknown(args: Mapping[str, Any], schema: Mapping[str, Any]) -> list[Problem]:
    names = list(schema.get("properties", {}))
    if schema.get("additionalProperties") not in (None, False) and names == []:
        return []  # a tool that takes any object on purpose
    unknown = [k for k in args if k not in names]
    fix = UNKNOWN_ARGUMENT_FIX.format(names=", ".join(names)) if names else NO_ARGUMENTS_FIX
    return [
        Problem(field=f"args.{name}", reason=UNKNOWN_ARGUMENT.format(name=str(name)[:_SHOWN]), fix=fix)
        for name in unknown
    ]


def _pydantic(model: type[BaseModel], args: Mapping[str, Any]) -> list[Problem]:
    try:
        # JSON mode, strict: what a model writes is JSON, so dates stay text while "10" is no integer.
        model.model_validate_json(json.dumps(dict(args), default=str), strict=True)
    except ValidationError as exc:
        return explain(exc, prefix="args", model=model)
    return []


def _json_schema(schema: Mapping[str, Any], args: Mapping[str, Any]) -> list[Problem]:
    try:
        validator = Draft202012Validator(dict(schema))
    except SchemaError as exc:
        raise UserError(f"a tool's args_schema is not a valid JSON schema: {exc.message}") from None
    problems = []
    for error in sorted(validator.iter_errors(dict(args)), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in error.absolute_path)
        hint = json.dumps(error.schema, default=str)[:200] if isinstance(error.schema, Mapping) else ""
        problems.append(
            Problem(
                field=f"args.{path}" if path else "args",
                reason=error.message[:300],
                fix=SCHEMA_FIX.format(hint=hint),
            )
        )
    return problems


def validate_args(tool: BaseTool, args: Mapping[str, Any]) -> list[Problem]:
    """The problems of `args` against the tool's arguments (empty when valid): unknown arguments
    first, then the schema, strictly (see the module docstring)."""
    schema = args_schema(tool)
    problems = _unknown(args, schema)
    named = {p.field for p in problems}
    declared = tool.args_schema
    if isinstance(declared, Mapping):
        return problems + _json_schema(schema, args)
    model = declared if isinstance(declared, type) else tool.get_input_schema()
    if isinstance(model, type) and issubclass(model, BaseModel) and "properties" in schema:
        return problems + [p for p in _pydantic(model, args) if p.field not in named]
    return problems
