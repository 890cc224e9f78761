"""The input boundary, output validation and semantic checks of `Contract`."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from keelgraph import CheckContext, Contract, ContractError, InputRejected
from keelgraph.contracts import OutputInvalid


class Ask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: int = Field(ge=1)
    message: str = Field(min_length=1, max_length=50)


class Reply(BaseModel):
    text: str
    score: int = Field(ge=0, le=10)


def contract(**kwargs: Any) -> Contract[Ask, Reply]:
    return Contract(input=Ask, output=Reply, instructions="Reply.", **kwargs)


def fields(exc: InputRejected) -> dict[str, str]:
    return {p.field: p.fix for p in exc.problems}


@pytest.mark.parametrize(
    ("raw", "field", "fix"),
    [
        ({"user_id": "abc", "message": "hi"}, "user_id", "whole number"),
        ({"user_id": 1}, "message", "add the required field `message`"),
        ({"user_id": 1, "message": ""}, "message", "at least 1 character"),
        ({"user_id": 1, "message": "x" * 51}, "message", "at most 50 characters"),
        ({"user_id": 0, "message": "hi"}, "user_id", "greater than or equal to 1"),
        (
            {"user_id": 1, "message": "hi", "admin": True},
            "admin",
            "remove `admin`; allowed fields: user_id, message",
        ),
        ("not json{", "request", "send a JSON object like"),
        ([1, 2], "request", "send {"),
        (None, "request", "send {"),
    ],
)
def test_bad_input_names_the_field_and_the_fix(raw: Any, field: str, fix: str) -> None:
    with pytest.raises(InputRejected) as caught:
        contract().parse_input(raw)
    assert field in fields(caught.value)
    assert fix in fields(caught.value)[field]
    assert caught.value.code == "input_rejected"


def test_oversize_request_is_rejected_before_parsing() -> None:
    with pytest.raises(InputRejected) as caught:
        contract(max_request_chars=100).parse_input("{" + " " * 200 + "}")
    assert caught.value.problems[0].reason.startswith("the request is 202 characters")


def test_json_text_and_dict_are_equivalent() -> None:
    c = contract()
    assert c.parse_input('{"user_id": 3, "message": "hi"}') == c.parse_input({"user_id": 3, "message": "hi"})


def test_failure_round_trips_as_data() -> None:
    with pytest.raises(InputRejected) as caught:
        contract().parse_input({"user_id": "x"})
    failure = caught.value.to_failure()
    again = failure.model_validate(json.loads(failure.model_dump_json())).to_exception()
    assert isinstance(again, InputRejected)
    assert again.problems == caught.value.problems


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input": dict}, "input must be a Pydantic BaseModel"),
        ({"output": "Reply"}, "output must be a Pydantic BaseModel"),
        ({"instructions": "  "}, "instructions are empty"),
        ({"repair_budget": -1}, "repair_budget must be between 0 and 20"),
        ({"checks": ("not callable",)}, "is not callable"),
    ],
)
def test_misconfigured_contract_fails_at_build_time(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"input": Ask, "output": Reply, "instructions": "Reply."}
    with pytest.raises(ContractError, match=message):
        Contract(**{**base, **kwargs})


def test_output_errors_are_prefixed_for_the_model() -> None:
    with pytest.raises(OutputInvalid) as caught:
        contract().parse_output({"text": "ok", "score": 11})
    assert caught.value.problems[0].field == "answer.score"
    assert "less than or equal to 10" in caught.value.problems[0].reason


def test_checks_sync_async_and_raising() -> None:
    def low(reply: Reply, ctx: CheckContext[Ask]) -> str | None:
        return "score too low" if reply.score < 5 else None

    async def mentions_user(reply: Reply, ctx: CheckContext[Ask]) -> list[str]:
        return [] if str(ctx.input.user_id) in reply.text else [f"mention user {ctx.input.user_id}"]

    def raises(reply: Reply, ctx: CheckContext[Ask]) -> None:
        if not reply.text.strip():
            raise ValueError("text must not be empty")

    c = contract(checks=(low, mentions_user, raises))
    ctx = CheckContext(input=Ask(user_id=7, message="hi"))
    problems = c.run_checks(Reply(text=" ", score=1), ctx)
    assert [p.reason for p in problems] == [
        "score too low",
        "mention user 7",
        "text must not be empty",
    ]
    assert problems[0].field == "answer (low)"
    assert c.run_checks(Reply(text="user 7", score=9), ctx) == []


class Line(BaseModel):
    product: str
    quantity: int = Field(ge=1)


class Basket(BaseModel):
    owner: str
    lines: list[Line]
    note: str | None = None


class Shop(BaseModel):
    stock: list[str]


def _basket_contract(**kw: Any) -> Contract[Shop, Basket]:
    return Contract(
        input=Shop,
        output=Basket,
        instructions="Fill the basket.",
        choices=lambda ctx: {"lines.product": ctx.input.stock, "note": ["fragile"], "owner": [], **kw},
    )


def test_output_choices_narrow_the_schema_for_this_context() -> None:
    contract = _basket_contract()
    ctx = CheckContext(input=Shop(stock=["mug", "pot"]))
    schema = contract.output_schema_for(ctx)
    line = schema["properties"]["lines"]["items"]
    assert line["properties"]["product"]["enum"] == ["mug", "pot"]
    assert "enum" not in line["properties"]["quantity"] and "$defs" not in schema
    assert [o.get("enum") for o in schema["properties"]["note"]["anyOf"]] == [["fragile"], None]
    assert "enum" not in schema["properties"]["owner"]  # an empty list: no limit
    assert "enum" not in json.dumps(contract.output_schema())  # the shared schema is untouched
    other = contract.output_schema_for(CheckContext(input=Shop(stock=["cup"])))
    assert other["properties"]["lines"]["items"]["properties"]["product"]["enum"] == ["cup"]


def test_output_choices_are_enforced_on_the_answer() -> None:
    contract = _basket_contract()
    ctx = CheckContext(input=Shop(stock=["mug"]))
    good = Basket(owner="Ann", lines=[Line(product="mug", quantity=1)])
    assert contract.choice_problems(good, ctx) == []
    bad = Basket(owner="Ann", lines=[Line(product="mug", quantity=1), Line(product="vase", quantity=2)])
    [problem] = contract.choice_problems(bad, ctx)
    assert problem.field == "answer.lines.product"
    assert problem.reason == "'vase' is not one of the values allowed here"
    assert problem.fix == "use one of ['mug']"


def test_output_choices_naming_no_field_is_a_developer_error() -> None:
    contract = _basket_contract(**{"lines.colour": ["red"]})
    with pytest.raises(ContractError, match=r"'lines.colour', which is not a field of Basket"):
        contract.output_schema_for(CheckContext(input=Shop(stock=["mug"])))


def test_a_field_named_title_survives_ref_inlining() -> None:
    from keelgraph.contracts.decision import inline_refs

    class Book(BaseModel):
        title: str
        year: int

    class Shelf(BaseModel):
        books: list[Book]

    schema = inline_refs(Shelf.model_json_schema())
    book = schema["properties"]["books"]["items"]
    assert book["properties"] == {"title": {"type": "string"}, "year": {"type": "integer"}}
    assert "title" not in schema and "title" not in book  # the keyword is still dropped
