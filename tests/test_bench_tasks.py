"""The reliability benchmark's task set: fixed, answerable, and checked without seeing the answer."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from keelgraph import CheckContext
from keelgraph.tools import GuardContext
from keelgraph.tools.execution import allowed_values

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import reliability
import reliability_tasks as rt

TASKS = rt.tasks()
FAMILIES = rt.families()
TOOLS = {t.name: t for t in FAMILIES["tools"].tools}


def _context(task: rt.Task, tool_results: list[dict[str, Any]] | None = None) -> CheckContext[Any]:
    contract = FAMILIES[task.family].contract
    return CheckContext(input=contract.parse_input(task.request), tool_results=tool_results or [])


def _right_answer(task: rt.Task) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if task.family != "tools":
        return task.expected, []
    exp = task.expected
    output = TOOLS[exp["tool"]].invoke(exp["args"])
    answer = {"tool": exp["tool"], "result": output, "reply": f"It is {output}."}
    return answer, [{"name": exp["tool"], "args": exp["args"], "output": output}]


def test_the_task_set_is_fixed_and_large_enough() -> None:
    again = rt.tasks()
    assert [(t.id, t.request, t.expected) for t in again] == [(t.id, t.request, t.expected) for t in TASKS]
    assert len(TASKS) >= 50 and len({t.id for t in TASKS}) == len(TASKS)
    counts = {f: sum(t.family == f for t in TASKS) for f in FAMILIES}
    assert min(counts.values()) >= 15, counts
    assert rt.tasks(seed=1) != TASKS  # the seed is what fixes it


@pytest.mark.parametrize("task", TASKS, ids=[t.id for t in TASKS])
def test_every_right_answer_passes_its_contract_and_checks(task: rt.Task) -> None:
    contract = FAMILIES[task.family].contract
    answer, tool_results = _right_answer(task)
    output = contract.parse_output(answer)
    ctx = _context(task, tool_results)
    assert contract.run_checks(output, ctx) == []
    assert contract.choice_problems(output, ctx) == []  # the choices never exclude the answer
    assert rt.correct(task, output.model_dump(mode="json"))


@pytest.mark.parametrize("task", [t for t in TASKS if t.family == "tools"], ids=lambda t: t.id)
def test_the_right_tool_call_is_within_its_choices(task: rt.Task) -> None:
    tool = {t.name: t for t in FAMILIES["tools"].tools}[task.expected["tool"]]
    allowed = allowed_values(tool, GuardContext(task.request, [], []))
    assert allowed, "every tool of the family narrows an argument"
    for arg, values in allowed.items():
        assert task.expected["args"][arg] in values
    # the currencies and the country are the ones written, each in its role: "120 CHF ... in GBP"
    for arg in ("source", "target", "country"):
        if arg in allowed:
            assert allowed[arg] == [task.expected["args"][arg]], (arg, allowed[arg])


@pytest.mark.parametrize("task", [t for t in TASKS if t.family == "tools"], ids=lambda t: t.id)
def test_the_right_tool_is_offered_and_a_tool_lacking_its_inputs_is_not(task: rt.Task) -> None:
    from keelgraph.tools import policy_of

    offered = {t.name for t in FAMILIES["tools"].tools if policy_of(t).offer_when(task.request)}  # type: ignore[misc]
    assert task.expected["tool"] in offered
    if task.expected["tool"] == "order_status":  # "Has ORD-3897 shipped yet?" holds no weight or country
        assert offered == {"order_status"}


def test_swapped_quantities_a_streets_lost_number_and_another_row_are_caught() -> None:
    order = next(t for t in TASKS if t.family == "extraction" and len(t.expected["items"]) == 2)
    a, b = order.expected["items"]
    if a["quantity"] != b["quantity"]:
        swapped = {
            **order.expected,
            "items": [{**a, "quantity": b["quantity"]}, {**b, "quantity": a["quantity"]}],
        }
        contract = FAMILIES["extraction"].contract
        problems = contract.run_checks(contract.parse_output(swapped), _context(order))
        assert problems and all(p.field.startswith("answer.items") for p in problems), problems
    contract = FAMILIES["extraction"].contract
    street = order.expected["ship_to"]["street"]
    for wrong, hint in (
        (street.split(" ", 1)[1], "leaves out the house number"),
        (street + "x", repr(street)),
    ):
        answer = {**order.expected, "ship_to": {**order.expected["ship_to"], "street": wrong}}
        problems = contract.run_checks(contract.parse_output(answer), _context(order))
        assert [p.field for p in problems] == ["answer.ship_to.street (order_matches_email)"]
        assert hint in problems[0].line()  # the complaint says what the e-mail does say
    fact = next(t for t in TASKS if t.family == "facts")
    lookup = FAMILIES["facts"].contract.parse_input(fact.request)
    other = next(r for r in lookup.table if r.sku != fact.expected["sku"])
    wrong_row = {
        "sku": other.sku,
        "field": fact.expected["field"],
        "value": getattr(other, fact.expected["field"]),
    }
    contract = FAMILIES["facts"].contract
    ctx = _context(fact)
    assert contract.choice_problems(contract.parse_output(wrong_row), ctx)  # the grammar rules it out
    assert contract.run_checks(contract.parse_output(wrong_row), ctx)  # and the check catches it


def _wrong(task: rt.Task) -> dict[str, Any]:
    answer, _ = _right_answer(task)
    if task.family == "extraction":
        return {
            **answer,
            "items": answer["items"][:1]
            if len(answer["items"]) > 1
            else [
                {
                    "product": "teapot" if answer["items"][0]["product"] != "teapot" else "milk jug",
                    "quantity": 1,
                }
            ],
        }
    if task.family == "tools":
        return {**answer, "result": "12.34 EUR"}
    return {**answer, "value": answer["value"] + 1}


@pytest.mark.parametrize("task", TASKS, ids=[t.id for t in TASKS])
def test_checks_catch_a_wrong_answer_and_scoring_rejects_it(task: rt.Task) -> None:
    contract = FAMILIES[task.family].contract
    _, tool_results = _right_answer(task)
    output = contract.parse_output(_wrong(task))
    assert contract.run_checks(output, _context(task, tool_results)) != []
    assert not rt.correct(task, output.model_dump(mode="json"))


def test_bare_tool_calls_are_scored_on_tool_and_arguments() -> None:
    task = next(t for t in TASKS if t.family == "tools")
    exp = task.expected
    assert rt.correct(task, {"tool": exp["tool"], "args": exp["args"]}, bare=True)
    as_text = {k: str(v) for k, v in exp["args"].items()}  # "120" for 120: same value
    assert rt.correct(task, {"tool": exp["tool"], "args": as_text}, bare=True)
    assert not rt.correct(task, {"tool": exp["tool"], "args": {}}, bare=True)


def test_summary_counts_pass_k_per_task() -> None:
    runs = [
        {
            "task": "a",
            "family": "x",
            "valid": True,
            "correct": True,
            "calls": 1,
            "tokens": 10,
            "seconds": 1.0,
        },
        {
            "task": "a",
            "family": "x",
            "valid": True,
            "correct": True,
            "calls": 1,
            "tokens": 10,
            "seconds": 1.0,
        },
        {
            "task": "b",
            "family": "x",
            "valid": True,
            "correct": False,
            "calls": 2,
            "tokens": 30,
            "seconds": 3.0,
        },
        {
            "task": "b",
            "family": "x",
            "valid": False,
            "correct": False,
            "calls": 2,
            "tokens": 30,
            "seconds": 3.0,
        },
    ]
    summary = reliability.summarize(runs, repeats=2)
    assert summary["valid"] == 0.75 and summary["pass1"] == 0.5 and summary["pass^2"] == 0.5
    assert summary["calls_per_task"] == 1.5 and summary["tokens_per_task"] == 20.0
