"""The input boundary, output validation and semantic checks of `Contract`."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from keelgraph import CheckContext, Contract, ContractError, InputRejected, Problem
from keelgraph.contracts import OutputInvalid
from keelgraph.contracts.contract import PLAIN_FIX
from keelgraph.contracts.repair import not_equal_pattern


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
    # a message that begins with a field's name is about that field; the others are about the answer
    assert [p.field for p in problems] == [
        "answer.score (low)",
        "answer (mentions_user)",
        "answer.text (raises)",
    ]
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


def test_output_choices_leave_out_values_the_field_itself_refuses() -> None:
    """A quantity written in a street number is no choice for a field limited to 1..20."""

    class Order(BaseModel):
        quantity: int = Field(ge=1, le=20)
        size: str = Field(pattern=r"^[SML]$")

    class Text(BaseModel):
        text: str

    c = Contract(
        input=Text,
        output=Order,
        instructions="x",
        choices=lambda ctx: {"quantity": [2, 27, 0, 20], "size": ["M", "XL"], "text": []},
    )
    schema = c.output_schema_for(CheckContext(input=Text(text="2 mugs to 27 Oak St")))
    assert schema["properties"]["quantity"]["enum"] == [2, 20]
    assert schema["properties"]["size"]["enum"] == ["M"]
    nothing_fits = Contract(
        input=Text, output=Order, instructions="x", choices=lambda ctx: {"quantity": [99]}
    )
    # when no choice fits, the choices stand: the answer is then refused, as before, not unconstrained
    assert nothing_fits.output_schema_for(CheckContext(input=Text(text="t")))["properties"]["quantity"][
        "enum"
    ] == [99]


class Parcel(BaseModel):
    owner: str
    lines: list[Line] = Field(min_length=1)
    to: Shop
    gift: bool
    speed: Literal["slow", "fast", "express"] = "slow"


def test_checks_name_the_field_they_object_to() -> None:
    def check(parcel: Parcel, ctx: CheckContext[Shop]) -> list[str | Problem]:
        return [
            "gift is true but nobody asked for it",
            "to.stock 'x' is wrong",
            "quantity 3 is not written",  # a field's unique name, inside a list
            "the owner must be someone else",  # names a field, but does not begin with it
            Problem(field="speed", reason="too slow", fix="use express"),
            Problem(field="answer.lines.0.product", reason="no such product", fix="pick one"),
            Problem(field="colour", reason="not a field", fix="-"),
        ]

    c: Contract[Shop, Parcel] = Contract(input=Shop, output=Parcel, instructions="x", checks=(check,))
    parcel = Parcel(owner="Ann", lines=[Line(product="mug", quantity=3)], to=Shop(stock=["x"]), gift=True)
    problems = c.run_checks(parcel, CheckContext(input=Shop(stock=[])))
    assert [p.field for p in problems] == [
        "answer.gift (check)",
        "answer.to.stock (check)",
        "answer.lines.quantity (check)",
        "answer (check)",
        "answer.speed (check)",
        "answer.lines.0.product (check)",
        "answer (check)",
    ]
    assert problems[4].fix == "use express" and problems[0].fix == "change gift so this no longer holds"
    assert problems[3].fix == PLAIN_FIX


def _parcel_schema() -> dict[str, Any]:
    from keelgraph.contracts.decision import inline_refs

    return inline_refs(Parcel.model_json_schema())


_PREVIOUS = {
    "owner": "Ann",
    "lines": [{"product": "mug", "quantity": 3}],
    "to": {"stock": ["x"]},
    "gift": True,
    "speed": "fast",
}


def test_a_repair_schema_rules_out_rejected_values_and_pins_the_rest() -> None:
    from keelgraph.contracts.repair import repair_schema

    schema = _parcel_schema()
    before = json.dumps(schema)
    problems = [
        Problem(field="answer.gift (c)", reason="gift is true but nobody asked", fix="-"),
        Problem(field="answer.speed (c)", reason="speed 'fast' is wrong", fix="-"),
        Problem(field="answer.owner", reason="owner 'Ann' is not the customer", fix="-"),
    ]
    out = repair_schema(schema, _PREVIOUS, problems)
    props = out["properties"]
    assert props["gift"]["enum"] == [False]  # a boolean flips
    assert props["speed"]["enum"] == ["slow", "express"]  # an enum loses the rejected value
    assert props["owner"]["pattern"] == not_equal_pattern("Ann")  # a string may be anything else
    assert props["lines"] == {"const": _PREVIOUS["lines"]}  # not objected to: pinned
    assert props["to"] == {"const": {"stock": ["x"]}}
    assert json.dumps(schema) == before  # the schema passed in is not changed


def test_a_repair_schema_pins_nothing_when_a_problem_names_no_field() -> None:
    from keelgraph.contracts.repair import repair_schema

    problems = [
        Problem(field="answer.gift (c)", reason="gift is true but nobody asked", fix="-"),
        Problem(field="answer (c)", reason="the e-mail orders a teapot but lines do not include it", fix="-"),
    ]
    out = repair_schema(_parcel_schema(), _PREVIOUS, problems)
    assert out["properties"]["gift"]["enum"] == [False]
    assert "const" not in json.dumps(out)


def test_a_repair_schema_changes_one_list_item_by_index_and_pins_the_others() -> None:
    from keelgraph.contracts.repair import repair_plan, repair_schema

    previous = {**_PREVIOUS, "lines": [{"product": "mug", "quantity": 3}, {"product": "pot", "quantity": 1}]}
    problems = [Problem(field="answer.lines.0.quantity", reason="too many", fix="-")]
    out = repair_schema(_parcel_schema(), previous, problems)
    lines = out["properties"]["lines"]
    # a tuple of the list's length: item 0 keeps its schema with the product pinned, item 1 is pinned
    assert "items" not in lines and len(lines["prefixItems"]) == 2
    first = lines["prefixItems"][0]["properties"]
    assert first["product"] == {"const": "mug"} and "const" not in first["quantity"]
    assert lines["prefixItems"][1] == {"const": {"product": "pot", "quantity": 1}}
    assert out["properties"]["owner"] == {"const": "Ann"} and out["properties"]["gift"] == {"const": True}
    # a problem with the list as a whole (a product left out) leaves the whole list free
    whole = [*problems, Problem(field="answer.lines (c)", reason="lines do not include a teapot", fix="-")]
    plan = repair_plan(_parcel_schema(), previous, whole)
    assert plan.schema["properties"]["lines"] == _parcel_schema()["properties"]["lines"] and not plan.decisive
    # a path through the list without an index is about the list
    loose = repair_schema(
        _parcel_schema(), previous, [Problem(field="answer.lines.quantity", reason="x", fix="-")]
    )
    assert loose["properties"]["lines"] == _parcel_schema()["properties"]["lines"]
    # an answer that is not an object (or no previous answer) changes nothing
    assert repair_schema(_parcel_schema(), ["x"], problems) == _parcel_schema()


def test_items_objected_to_as_a_whole_may_be_dropped_and_the_others_stay_pinned() -> None:
    """ "items.1 lists 'mug' a second time": a tuple of the old length would make the model write
    a second item again (the 0.5B model wrote the same duplicate and the turn stopped early), so
    the objected items become optional after the kept ones."""
    from keelgraph.contracts.repair import repair_plan

    mug, pot = {"product": "mug", "quantity": 3}, {"product": "pot", "quantity": 1}
    previous = {**_PREVIOUS, "lines": [mug, mug, pot, mug]}
    problems = [
        Problem(field=f"answer.lines.{i} (c)", reason=f"lines.{i} lists 'mug' a second time", fix="-")
        for i in (1, 3)
    ]
    plan = repair_plan(_parcel_schema(), previous, problems)
    options = plan.schema["properties"]["lines"]["anyOf"]
    kept = [{"const": mug}, {"const": pot}]  # items 0 and 2, pinned, in their order
    free = _parcel_schema()["properties"]["lines"]["items"]
    assert [o["prefixItems"] for o in options] == [kept, [*kept, free], [*kept, free, free]]
    assert all(o["type"] == "array" and "items" not in o for o in options)
    assert plan.schema["properties"]["owner"] == {"const": "Ann"}  # the rest stays pinned
    assert not plan.decisive  # the grammar does not rule the rejected list out: resample if needed
    # with every item objected to, the list may not be shorter than its own minItems (1)
    whole = [Problem(field="answer.lines.0 (c)", reason="lines.0 is wrong", fix="-")]
    alone = repair_plan(_parcel_schema(), {**_PREVIOUS, "lines": [mug]}, whole)
    assert alone.schema["properties"]["lines"]["prefixItems"] == [free]


@pytest.mark.parametrize("value", ["Lisboa", "sofia.weber14@mail.org", "a-b (x)?{1}", "7", "x y|z*+{2}"])
def test_not_equal_pattern_matches_everything_but_the_value(value: str) -> None:
    import re

    from keelgraph.contracts.decision import grammar_pattern

    pattern = not_equal_pattern(value)
    assert pattern is not None and grammar_pattern(pattern) == pattern  # survives grammar_safe as is
    rx = re.compile(pattern)
    # neither the value nor anything that begins with it: a correction must leave it before its end
    assert rx.fullmatch(value) is None and rx.fullmatch(value + " 1") is None
    others = {"", value[:-1], "Q" + value[1:], value[:-1] + "Q", value[:-1] + "Q" + value}
    assert all(rx.fullmatch(o) for o in others - {value})


def test_not_equal_pattern_refuses_what_it_cannot_write_safely() -> None:
    assert not_equal_pattern("") is None
    assert not_equal_pattern('say "hi"') is None
    assert not_equal_pattern("a\\b") is None
    assert not_equal_pattern("[1]") is None
    assert not_equal_pattern("x" * 97) is None and not_equal_pattern("x" * 50, "y" * 50) is None
    assert not_equal_pattern() is None


def test_pinned_values_are_values_not_schemas() -> None:
    """A pinned answer holding keys that look like keywords ("title", "format", "$ref") reaches the
    grammar unchanged."""
    from keelgraph.contracts.decision import decision_schema, grammar_safe, inline_refs

    value = {"title": "Dune", "format": "paperback", "$ref": "#/$defs/x", "maxLength": 3}
    schema = {"type": "object", "properties": {"book": {"const": value}, "kind": {"enum": [value, "x"]}}}
    sent = decision_schema(schema, {})["properties"]["answer"]
    assert sent["properties"]["book"] == {"const": value}
    assert sent["properties"]["kind"] == {"enum": [value, "x"]}
    assert grammar_safe({"type": "string", "default": "a", "format": "email"}) == {"type": "string"}
    assert inline_refs({"title": "T", "default": {"title": "kept"}}) == {"default": {"title": "kept"}}


def test_a_repair_schema_rules_out_what_earlier_repairs_were_refused_for_the_same_field() -> None:
    from keelgraph.contracts.repair import repair_schema

    said = [Problem(field="answer.owner (c)", reason="owner is wrong", fix="-")]
    other = [Problem(field="answer.speed (c)", reason="speed is wrong", fix="-")]
    earlier = [({**_PREVIOUS, "owner": "Bob"}, said), ({**_PREVIOUS, "owner": "Cy"}, other)]
    out = repair_schema(_parcel_schema(), _PREVIOUS, said, earlier)
    # "Bob" was refused as the owner before; "Cy" was refused for its speed, not its owner
    assert out["properties"]["owner"]["pattern"] == not_equal_pattern("Ann", "Bob")
    flipped = [({**_PREVIOUS, "gift": False}, [Problem(field="answer.gift", reason="no", fix="-")])]
    both = repair_schema(
        _parcel_schema(), _PREVIOUS, [Problem(field="answer.gift", reason="-", fix="-")], flipped
    )
    assert both["properties"]["gift"] == {"type": "boolean"}  # both values refused: nothing to rule out


def test_a_string_keeps_its_own_pattern_in_a_repair() -> None:
    """Five digits stay five digits in a repair, less the rejected value (a fixed-length pattern
    takes the exclusion in); a pattern that only bans characters combines with the exclusion."""
    import re

    from keelgraph.contracts.repair import fixed_pattern_excluding, repair_schema

    class Address(BaseModel):
        postcode: str = Field(pattern=r"^\d{5}$")
        city: str = Field(pattern=r"^[^0-9]+$")

    schema = Address.model_json_schema()
    problems = [
        Problem(field="answer.postcode", reason="postcode is wrong", fix="-"),
        Problem(field="answer.city", reason="city is wrong", fix="-"),
    ]
    out = repair_schema(schema, {"postcode": "12345", "city": "Lisboa"}, problems)["properties"]
    assert out["postcode"]["pattern"] == fixed_pattern_excluding(r"^\d{5}$", ["12345"])
    assert re.match(out["postcode"]["pattern"], "12346") and not re.match(out["postcode"]["pattern"], "12345")
    assert out["city"]["pattern"] == not_equal_pattern("Lisboa", banned="0-9")
    import re

    rx = re.compile(out["city"]["pattern"])
    assert rx.fullmatch("Lisbon") and not rx.fullmatch("Lisboa") and not rx.fullmatch("Lisbo 1")


def test_contract_doctests() -> None:
    import doctest

    from keelgraph.contracts import decision, evidence, repair

    for module in (decision, repair, evidence):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_not_copied_names_the_field_and_what_the_source_says() -> None:
    from keelgraph.contracts import closest_span, not_copied

    text = "Order request\nCustomer: Sofia Silva\nAddress: 70 Linden Allee, 10963 Leeds\n"
    assert not_copied("ship_to.street", "70 Linden Allee", text) is None
    complaint = not_copied("ship_to.street", "Linden Allee 70", text, source="the e-mail")
    assert complaint == (
        "ship_to.street 'Linden Allee 70' is not written in the e-mail; "
        "copy it exactly as written: '70 Linden Allee'"
    )
    assert closest_span("Sofia Silvia", text) == "Sofia Silva"
    assert closest_span("Reykjavik", text) is None
    assert (
        not_copied("city", "Reykjavik", text)
        == "city 'Reykjavik' is not written in the text; copy it exactly as written"
    )
    assert closest_span("anything", "") is None
