"""Tool arguments validated strictly whatever the schema form (issue 15, item 2): a JSON-Schema dict
tool is validated and shown with its arguments, unknown arguments are refused for every tool, and
values are not coerced ("10" is not an integer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.tools import StructuredTool, tool
from pydantic import BaseModel, ConfigDict, Field

from keelgraph import Contract, build_graph, with_policy
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools.arguments import args_schema, validate_args

RAN: list[dict[str, Any]] = []

DICT_SCHEMA = {
    "type": "object",
    "properties": {"customer_id": {"type": "integer"}, "note": {"type": "string", "maxLength": 20}},
    "required": ["customer_id"],
}


def _dict_tool() -> StructuredTool:
    def lookup(**kwargs: Any) -> dict[str, Any]:
        RAN.append(kwargs)
        return {"ok": True}

    return StructuredTool.from_function(lookup, name="lookup", description="Look up", args_schema=DICT_SCHEMA)


class Args(BaseModel):  # Pydantic's default: extra arguments ignored
    customer_id: int
    express: bool = False


def _model_tool() -> StructuredTool:
    def ship(customer_id: int, express: bool = False) -> dict[str, Any]:
        RAN.append({"customer_id": customer_id, "express": express})
        return {"shipped": customer_id}

    return StructuredTool.from_function(ship, name="ship", description="Ship", args_schema=Args)


@tool
def plain(customer_id: int, when: str = "today") -> str:
    """A plain @tool, as the README shows it."""
    RAN.append({"customer_id": customer_id, "when": when})
    return "done"


@pytest.fixture(autouse=True)
def _clear() -> None:
    RAN.clear()


def fields(problems: list[Any]) -> list[str]:
    return [p.field for p in problems]


def test_a_dict_schema_tool_is_shown_with_its_arguments() -> None:
    schema = args_schema(_dict_tool())
    assert schema["properties"]["customer_id"] == {"type": "integer"}
    assert schema["required"] == ["customer_id"]


@pytest.mark.parametrize(
    ("args", "where"),
    [
        ({"note": "x"}, ["args"]),  # the required argument is missing
        ({"customer_id": "10"}, ["args.customer_id"]),
        ({"customer_id": True}, ["args.customer_id"]),
        ({"customer_id": 1.5}, ["args.customer_id"]),
        ({"customer_id": 1, "note": "x" * 30}, ["args.note"]),
        ({"customer_id": 1, "nite": "typo"}, ["args.nite"]),
    ],
)
def test_a_dict_schema_tool_is_validated(args: dict[str, Any], where: list[str]) -> None:
    assert fields(validate_args(_dict_tool(), args)) == where
    assert validate_args(_dict_tool(), {"customer_id": 7, "note": "ok"}) == []


@pytest.mark.parametrize("make", [_model_tool, lambda: plain])
@pytest.mark.parametrize(
    ("args", "where"),
    [
        ({"customer_id": "10"}, ["args.customer_id"]),
        ({"customer_id": True}, ["args.customer_id"]),
        ({"customer_id": 1.0}, ["args.customer_id"]),
        ({"customer_id": 1, "expres": True}, ["args.expres"]),
    ],
)
def test_no_coercion_and_no_unknown_argument_for_model_and_plain_tools(
    make: Any, args: dict[str, Any], where: list[str]
) -> None:
    assert fields(validate_args(make(), args)) == where


def test_valid_arguments_pass_in_every_form() -> None:
    assert validate_args(_model_tool(), {"customer_id": 3, "express": True}) == []
    assert validate_args(plain, {"customer_id": 3}) == []


def test_a_date_stays_text_as_json_writes_it() -> None:
    from datetime import date

    class When(BaseModel):
        model_config = ConfigDict(extra="forbid")
        day: date = Field(description="A day")

    t = StructuredTool.from_function(lambda day: day, name="t", description="d", args_schema=When)
    assert validate_args(t, {"day": "2026-12-04"}) == []
    assert fields(validate_args(t, {"day": "04/12/2026"})) == ["args.day"]


class Ask(BaseModel):
    city: str


class Reply(BaseModel):
    city: str


def test_in_a_graph_a_refused_call_never_runs_and_the_model_is_told(tmp_path: Path) -> None:
    graph = build_graph(
        Contract(input=Ask, output=Reply, instructions="Answer.", repair_budget=2),
        [with_policy(_dict_tool(), side_effect="read")],
        model=ScriptedChatModel(
            [call("lookup", customer_id="10"), call("lookup", customer_id=10), answer(city="Oslo")]
        ),
        checkpointer=None,
        strategy="json_object",
    )
    result = graph.invoke({"request": {"city": "Oslo"}})
    assert result["status"] == "ok"
    assert RAN == [{"customer_id": 10}]
    assert result["stats"]["repairs"] == 1


class Temp(BaseModel):
    celsius: int


@pytest.mark.parametrize("strict", [False, True])
def test_a_contract_validates_strictly_when_asked_and_laxly_by_default(strict: bool) -> None:
    contract = Contract(input=Temp, output=Temp, instructions="Echo.", strict=strict)
    from keelgraph import InputRejected
    from keelgraph.contracts import OutputInvalid

    if strict:
        with pytest.raises(InputRejected) as caught:
            contract.parse_input({"celsius": "21"})
        assert caught.value.problems[0].field == "celsius"
        with pytest.raises(OutputInvalid):
            contract.parse_output({"celsius": 21.0})
        with pytest.raises(InputRejected):
            contract.parse_input('{"celsius": "21"}')
    else:
        assert contract.parse_input({"celsius": "21"}).celsius == 21
        assert contract.parse_output({"celsius": 21.0}).celsius == 21
    assert contract.parse_input({"celsius": 21}).celsius == 21
    assert contract.parse_output('{"celsius": 21}').celsius == 21
