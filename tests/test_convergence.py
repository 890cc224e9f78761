"""Repairs that converge: computed values written in, a check's wish for a tool turned into a tool
step, tools that never return, rejected numbers and long strings ruled out in the grammar, and
judgements shipped only when the model agrees with itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from langchain_core.tools import StructuredTool
from pydantic import BaseModel, Field

from keelgraph import CheckContext, Computed, Contract, Uncertain, build_graph, sqlite_checkpointer
from keelgraph.contracts.contract import PLAIN_FIX
from keelgraph.contracts.decision import grammar_safe
from keelgraph.contracts.errors import Problem
from keelgraph.contracts.repair import pin_values, repair_plan
from keelgraph.graphs.confirm import JUDGEMENT_TEMPERATURE
from keelgraph.graphs.reason import NO_TOOL_RESULT
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools import with_policy


class Doc(BaseModel):
    text: str = Field(min_length=1, max_length=2000)


class Line(BaseModel):
    description: str
    quantity: int = Field(ge=1, le=1000)
    unit_price: float


class Invoice(BaseModel):
    lines: list[Line] = Field(min_length=1, max_length=5)
    total: float


def total_is_the_sum(inv: Invoice, ctx: CheckContext[Doc]) -> Any:
    due = round(sum(line.quantity * line.unit_price for line in inv.lines), 2)
    if abs(inv.total - due) > 0.005:
        return Computed("total", due, f"the lines add up to {due}, not {inv.total}")
    return None


def quantities_written(inv: Invoice, ctx: CheckContext[Doc]) -> list[str]:
    return [
        f"lines.{i}.quantity {line.quantity} is not written in the document"
        for i, line in enumerate(inv.lines)
        if str(line.quantity) not in ctx.input.text
    ]


INVOICE = Contract(
    input=Doc,
    output=Invoice,
    instructions="Extract the invoice.",
    checks=(total_is_the_sum, quantities_written),
    render=lambda d: d.text,
)
DOC = {"text": "2 x pens at 1.50, 3 x pads at 2.25"}


def graph(contract: Contract[Any, Any], script: list[Any], tmp: Path, tools: Any = (), **kw: Any) -> Any:
    model = ScriptedChatModel(script)
    kw.setdefault("strategy", "json_object")
    g = build_graph(contract, list(tools), model=model, checkpointer=sqlite_checkpointer(tmp / "t.db"), **kw)
    return g, model


def invoke(g: Any, request: Any, thread: str = "t") -> dict[str, Any]:
    return g.invoke({"request": request}, {"configurable": {"thread_id": thread}})


def schema_of(model: ScriptedChatModel, i: int) -> dict[str, Any]:
    return model.calls[i]["kwargs"]["extra_body"]["response_format"]["schema"]


LINES = [
    {"description": "pens", "quantity": 2, "unit_price": 1.5},
    {"description": "pads", "quantity": 3, "unit_price": 2.25},
]


def test_a_computed_value_is_written_in_without_asking_the_model_again(tmp_path: Path) -> None:
    g, model = graph(INVOICE, [answer(lines=LINES, total=975)], tmp_path)
    result = invoke(g, DOC)
    assert result["status"] == "ok", result["error"]
    assert result["output"]["total"] == 9.75
    assert len(model.calls) == 1  # the model was never asked for a number the check computed
    assert result["stats"]["recoveries"] >= 1


def test_a_computed_value_is_pinned_while_the_model_repairs_the_rest(tmp_path: Path) -> None:
    wrong = [{**LINES[0], "quantity": 7}, LINES[1]]
    g, model = graph(INVOICE, [answer(lines=wrong, total=1), answer(lines=LINES, total=9.75)], tmp_path)
    result = invoke(g, DOC)
    assert result["status"] == "ok", result["error"]
    repair = schema_of(model, 1)
    assert '"total": {"const": 17.25}' in json.dumps(repair)  # 7 x 1.5 + 3 x 2.25, as computed then
    assert "write 17.25" in str(model.calls[1]["messages"][-1].content)
    # a run that ended ok still says what was repaired
    (attempt,) = result["attempts"]
    assert attempt["kind"] == "check" and "lines.0.quantity 7" in json.dumps(attempt["problems"])


def test_computed_values_that_do_not_satisfy_the_checks_are_not_shipped(tmp_path: Path) -> None:
    def total_is_ten(inv: Invoice, ctx: CheckContext[Doc]) -> Any:
        return [Computed("total", 9.75, "sum"), Computed("lines.0.quantity", 9, "nine")]

    contract = Contract(input=Doc, output=Invoice, instructions="x", checks=(total_is_ten,), repair_budget=1)
    g, _ = graph(contract, [answer(lines=LINES, total=1), answer(lines=LINES, total=2)], tmp_path)
    assert invoke(g, DOC)["status"] == "failed"  # the patched answer fails the check again


class Sum(BaseModel):
    a: int
    b: int


class Result(BaseModel):
    value: int


def calculator(a: int, b: int) -> int:
    return a + b


def add_tool() -> StructuredTool:
    return StructuredTool.from_function(calculator, name="calculator", description="add two numbers")


def from_the_tool(res: Result, ctx: CheckContext[Sum]) -> str | None:
    seen = [r["output"] for r in ctx.tool_results]
    if not seen:
        return "no tool was called; call calculator and answer with its result"
    return None if res.value in seen else f"value must be one of {seen}"


def test_a_check_that_wants_a_tool_result_makes_the_next_step_call_a_tool(tmp_path: Path) -> None:
    contract = Contract(input=Sum, output=Result, instructions="Add.", checks=(from_the_tool,))
    script = [answer(value=5), call("calculator", a=2, b=3), answer(value=5)]
    g, model = graph(contract, script, tmp_path, tools=[add_tool()])
    result = invoke(g, {"a": 2, "b": 3})
    assert result["status"] == "ok", result["error"]
    assert "final_answer" in json.dumps(schema_of(model, 0))  # no needs_tool: an answer was allowed
    second = schema_of(model, 1)
    assert "final_answer" not in json.dumps(second)  # the check asked for a tool: a tool call only
    assert second["properties"]["action"]["const"] == "calculator"


def test_a_check_that_does_not_read_tool_results_does_not_force_a_tool(tmp_path: Path) -> None:
    def small(res: Result, ctx: CheckContext[Sum]) -> str | None:
        return "value must be below 100" if res.value >= 100 else None

    contract = Contract(input=Sum, output=Result, instructions="Add.", checks=(small,))
    g, model = graph(contract, [answer(value=500), answer(value=5)], tmp_path, tools=[add_tool()])
    assert invoke(g, {"a": 2, "b": 3})["status"] == "ok"
    assert "final_answer" in json.dumps(schema_of(model, 1))


def doubler(a: int) -> int:
    return 2 * a


def test_a_check_that_wants_other_tool_evidence_gets_a_reading_step_never_a_write(tmp_path: Path) -> None:
    """Two dependent tools: the model answered after the first one, the check (which reads the
    tool results) says the answer is not the second tool's: the repair is a tool step, offering
    only tools that read (the unused `double`), not the write tool `order` nor the answer."""

    def from_double(res: Result, ctx: CheckContext[Sum]) -> str | None:
        doubled = [r["output"] for r in ctx.tool_results if r["name"] == "double"]
        return None if res.value in doubled else "value must come from double, called on calculator's result"

    ordered: list[int] = []

    def order(a: int) -> str:
        ordered.append(a)
        return "ordered"

    tools = [
        add_tool(),
        StructuredTool.from_function(doubler, name="double", description="double a number"),
        with_policy(
            StructuredTool.from_function(order, name="order", description="order"), side_effect="write"
        ),
    ]
    contract = Contract(input=Sum, output=Result, instructions="Add, then double.", checks=(from_double,))
    script = [call("calculator", a=2, b=3), answer(value=5), call("double", a=5), answer(value=10)]
    g, model = graph(contract, script, tmp_path, tools=tools)
    result = invoke(g, {"a": 2, "b": 3})
    assert result["status"] == "ok" and result["output"] == {"value": 10}, result["error"]
    repair_step = json.dumps(schema_of(model, 2))
    assert '"double"' in repair_step
    assert (
        "final_answer" not in repair_step
        and '"order"' not in repair_step
        and '"calculator"' not in repair_step
    )
    assert "final_answer" in json.dumps(schema_of(model, 3)) and not ordered


def test_needs_tool_with_tools_that_never_return_fails_typed_instead_of_answering(tmp_path: Path) -> None:
    def broken(a: int, b: int) -> int:
        raise RuntimeError("calculator service is down")

    tool = StructuredTool.from_function(broken, name="calculator", description="add two numbers")
    contract = Contract(input=Sum, output=Result, instructions="Add.", needs_tool=True)
    script = [call("calculator", a=2, b=3)] * 3 + [answer(value=5)]
    g, model = graph(contract, script, tmp_path, tools=[tool], max_tool_rounds=3, allow_repeat_tools=True)
    result = invoke(g, {"a": 2, "b": 3})
    assert result["status"] == "failed"
    assert result["error"]["message"].endswith(NO_TOOL_RESULT.format(n=3))
    assert all("final_answer" not in json.dumps(schema_of(model, i)) for i in range(len(model.calls)))


def test_a_rejected_integer_is_ruled_out_in_the_repair_grammar() -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 10}, "s": {"type": "string"}},
    }
    problems = [Problem(field="answer.n (c)", reason="wrong", fix="fix it")]
    plan = repair_plan(schema, {"n": 4, "s": "x"}, problems, earlier=[({"n": 9, "s": "y"}, problems)])
    assert plan.schema["properties"]["n"] == {
        "anyOf": [
            {"type": "integer", "minimum": 1, "maximum": 3},
            {"type": "integer", "minimum": 5, "maximum": 8},
            {"type": "integer", "minimum": 10, "maximum": 10},
        ]
    }
    assert plan.decisive and plan.schema["properties"]["s"] == {"const": "x"}


def test_a_rejected_value_of_a_fixed_shape_field_is_ruled_out_and_the_shape_kept() -> None:
    """An ISO date with its own pattern: the repair keeps the shape and loses every date rejected
    this turn (the held-out invoices kept writing the invoice number's "2026-04-12")."""
    import re

    schema = {
        "type": "object",
        "properties": {"day": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}, "s": {"type": "string"}},
    }
    problems = [Problem(field="answer.day (c)", reason="not written in the document", fix="fix it")]
    earlier = [({"day": "2026-04-13", "s": "y"}, problems)]
    plan = repair_plan(schema, {"day": "2026-04-12", "s": "x"}, problems, earlier=earlier)
    pattern = plan.schema["properties"]["day"]["pattern"]
    assert plan.decisive
    allowed = [
        d
        for d in ("2026-04-12", "2026-04-13", "2026-03-14", "2026-4-12", "12.04.2026")
        if re.match(pattern, d)
    ]
    assert allowed == ["2026-03-14"]
    # Other patterns (open length) still do not combine: the field keeps its own.
    loose = {"type": "object", "properties": {"w": {"type": "string", "pattern": "^[a-z]+$"}}}
    wrong = [Problem(field="answer.w (c)", reason="wrong", fix="fix it")]
    assert repair_plan(loose, {"w": "ab"}, wrong).schema["properties"]["w"]["pattern"] == "^[a-z]+$"


def test_pinned_values_reach_list_items_made_tuples() -> None:
    schema = {
        "type": "object",
        "properties": {"xs": {"prefixItems": [{"type": "number"}, {"type": "number"}]}},
    }
    assert pin_values(schema, {"xs.1": 3.5})["properties"]["xs"]["prefixItems"][1] == {"const": 3.5}
    assert pin_values(schema, {"nope.1": 3}) == schema


def test_short_max_lengths_stay_in_the_grammar_long_ones_do_not() -> None:
    assert grammar_safe({"type": "string", "maxLength": 120}) == {"type": "string", "maxLength": 120}
    assert grammar_safe({"type": "string", "maxLength": 1200}) == {"type": "string"}


def test_a_plain_complaint_keeps_its_own_fix() -> None:
    def own(res: Result, ctx: Any) -> str:
        return "value is odd; write an even number"

    def bare(res: Result, ctx: Any) -> str:
        return "the value looks made up"

    contract = Contract(input=Sum, output=Result, instructions="x", checks=(own, bare))
    ctx = CheckContext(input=Sum(a=1, b=2))
    first, second = contract.run_checks(Result(value=3), ctx)
    assert (first.field, first.reason, first.fix) == (
        "answer.value (own)",
        "value is odd",
        "write an even number",
    )
    assert (second.field, second.fix) == ("answer (bare)", PLAIN_FIX)


class Ticket(BaseModel):
    text: str = Field(min_length=1, max_length=500)


class Triage(BaseModel):
    category: Literal["billing", "bug", "account"]
    summary: str = Field(max_length=120)


TRIAGE = Contract(input=Ticket, output=Triage, instructions="Triage the ticket.", judgement=("category",))


def test_a_judgement_ships_when_the_samples_agree(tmp_path: Path) -> None:
    script = [
        answer(category="billing", summary="double charge"),
        answer(category="billing", summary="charged twice"),
        answer(category="billing", summary="refund"),
    ]
    g, model = graph(TRIAGE, script, tmp_path)
    result = invoke(g, {"text": "I was charged twice"})
    assert result["status"] == "ok", result["error"]
    assert result["output"] == {"category": "billing", "summary": "double charge"}  # the checked one
    assert len(model.calls) == 3 and result["stats"]["model_calls"] == 3
    assert [c["kwargs"].get("temperature") for c in model.calls[1:]] == [JUDGEMENT_TEMPERATURE] * 2
    state = g.get_state({"configurable": {"thread_id": "t"}}).values
    assert len(state["samples"]) == 2 and state["messages"][-1].content == json.dumps(
        result["output"], separators=(",", ":")
    )


def test_a_judgement_the_model_does_not_repeat_fails_uncertain_with_the_votes(tmp_path: Path) -> None:
    script = [
        answer(category="billing", summary="s"),
        answer(category="account", summary="s"),
        answer(category="billing", summary="s"),
    ]
    g, _ = graph(TRIAGE, script, tmp_path)
    result = invoke(g, {"text": "I cannot log in to pay"})
    assert result["status"] == "failed" and result["output"] is None
    error = result["error"]
    assert error["type"] == "Uncertain" and error["code"] == Uncertain.code
    assert error["problems"][0]["field"] == "answer.category"
    assert "'billing', 'account', 'billing'" in error["problems"][0]["reason"]
    assert [a["kind"] for a in error["attempts"]] == ["sample", "sample"]
    assert isinstance(Uncertain.__mro__[1], type)


def test_judged_values_compare_text_without_case_or_spacing() -> None:
    from keelgraph.graphs.confirm import judged_values

    loose = Contract(input=Ticket, output=Triage, instructions="x", judgement=("summary",))
    assert judged_values(loose, {"summary": " Double  Charge"}) == judged_values(
        loose, {"summary": "double charge"}
    )


def test_judgement_must_name_a_field() -> None:
    import pytest

    from keelgraph import ContractError

    with pytest.raises(ContractError, match="not a field"):
        Contract(input=Ticket, output=Triage, instructions="x", judgement=("priority",))
    with pytest.raises(ContractError, match="list of field paths"):
        Contract(input=Ticket, output=Triage, instructions="x", judgement="category")  # type: ignore[arg-type]


def test_a_model_that_repeats_its_rejected_answer_hands_the_turn_to_the_next_model(tmp_path: Path) -> None:
    from keelgraph.runtime.models import ModelChain

    small = ScriptedChatModel([answer(value=500), answer(value=500)])
    larger = ScriptedChatModel([answer(value=5)])

    def small_sum(res: Result, ctx: CheckContext[Sum]) -> str | None:
        return "value must be a + b" if res.value != ctx.input.a + ctx.input.b else None

    contract = Contract(input=Sum, output=Result, instructions="Add.", checks=(small_sum,))
    g = build_graph(
        contract, [], model=ModelChain((small, larger)), checkpointer=None, strategy="json_object"
    )
    result = g.invoke({"request": {"a": 2, "b": 3}})
    assert result["status"] == "ok" and result["output"] == {"value": 5}
    assert len(small.calls) == 2 and len(larger.calls) == 1  # stuck after two: the larger model answers
    # with no model left to take over, the same repetition stops the loop early
    alone = ScriptedChatModel([answer(value=500)] * 4)
    g = build_graph(contract, [], model=alone, checkpointer=None, strategy="json_object")
    stopped = g.invoke({"request": {"a": 2, "b": 3}})
    assert stopped["status"] == "failed" and "repeated the same invalid output" in stopped["error"]["message"]
    assert len(alone.calls) == 2


def test_the_cascade_serves_both_local_models_from_one_process(tmp_path: Path) -> None:
    from keelgraph.local.embedded import EMBEDDED_MODEL, LARGER_MODEL, LocalModelServer, tools_alias
    from keelgraph.runtime.models import default_chain
    from keelgraph.settings import LARGER_MODEL_NAME, Settings

    env = {"KEELGRAPH_CACHE_DIR": str(tmp_path), "KEELGRAPH_CASCADE": "1", "KEELGRAPH_HANDOVER_AFTER": "3"}
    settings = Settings.from_env(env)
    assert settings.cascade and settings.handover_after == 3
    server = LocalModelServer(settings)
    # The embedded model, the larger one, and the embedded one again with native tool calling.
    assert server.names == [settings.model, LARGER_MODEL_NAME, tools_alias(settings.model)]
    args = server._model_args([tmp_path / "small.gguf", tmp_path / "large.gguf", tmp_path / "small.gguf"])
    assert args[0] == "--config_file"
    config = json.loads(Path(args[1]).read_text())
    assert [m["model_alias"] for m in config["models"]] == server.names  # one process, swapped on request
    assert [m.get("chat_format") for m in config["models"]] == [None, None, "chatml-function-calling"]
    assert config["host"] == "127.0.0.1" and config["port"] == server.port
    chain = default_chain(settings)
    assert len(chain.models) == 2 and chain.handover_after == 3
    assert len(default_chain(Settings.from_env({"KEELGRAPH_CACHE_DIR": str(tmp_path)})).models) == 1
    assert LARGER_MODEL.size > EMBEDDED_MODEL.size and len(LARGER_MODEL.parts) == 22


def test_cascade_flag_must_be_yes_or_no() -> None:
    import pytest

    from keelgraph import UserError
    from keelgraph.settings import Settings

    with pytest.raises(UserError, match="KEELGRAPH_CASCADE"):
        Settings.from_env({"KEELGRAPH_CASCADE": "maybe"})


def test_checks_see_the_threads_earlier_answers(tmp_path: Path) -> None:
    seen: list[list[Any]] = []

    def keeps_the_first_sum(res: Result, ctx: CheckContext[Sum]) -> str | None:
        seen.append(list(ctx.earlier_answers))
        return None

    contract = Contract(input=Sum, output=Result, instructions="Add.", checks=(keeps_the_first_sum,))
    g, _ = graph(contract, [answer(value=5), answer(value=7)], tmp_path)
    invoke(g, {"a": 2, "b": 3})
    invoke(g, {"a": 3, "b": 4})
    assert seen == [[], [{"value": 5}]]
