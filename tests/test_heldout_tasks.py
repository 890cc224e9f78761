"""The reliability benchmark's held-out set: fixed, answerable, checked without seeing the answer,
and run by the harness turn by turn (no model server: a scripted model stands in)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import pytest

from keelgraph import CheckContext, Contract
from keelgraph.testing import ScriptedChatModel, answer, call

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import heldout_tasks as ht
import reliability

TASKS = ht.tasks()
FAMILIES = ht.families()
TURNS = [(t, i) for t in TASKS for i in range(len(t.turns))]


def _tool_results(task: ht.Task, turn: int) -> list[dict[str, Any]]:
    """What the real tools return for the calls the expected answer rests on."""
    tools = {t.name: t for t in FAMILIES[task.family].tools}
    calls = task.calls[turn] if task.calls else []
    return [
        {"name": c["name"], "args": c["args"], "output": tools[c["name"]].invoke(c["args"])} for c in calls
    ]


def _context(task: ht.Task, turn: int, tool_results: list[dict[str, Any]] | None = None) -> CheckContext[Any]:
    contract = FAMILIES[task.family].contract
    results = _tool_results(task, turn) if tool_results is None else tool_results
    return CheckContext(input=contract.parse_input(task.turns[turn]), tool_results=results)


def _problems(task: ht.Task, turn: int, output: dict[str, Any], **kw: Any) -> list[str]:
    contract = FAMILIES[task.family].contract
    return [p.line() for p in contract.run_checks(contract.parse_output(output), _context(task, turn, **kw))]


def test_the_set_is_fixed_large_enough_and_apart_from_the_dev_set() -> None:
    again = ht.tasks()
    assert [(t.id, t.turns, t.expected, t.calls) for t in again] == [
        (t.id, t.turns, t.expected, t.calls) for t in TASKS
    ]
    assert len(TASKS) >= 40 and len({t.id for t in TASKS}) == len(TASKS)
    counts = {f: sum(t.family == f for t in TASKS) for f in ht.FAMILY_NAMES}
    assert set(FAMILIES) == set(ht.FAMILY_NAMES) and min(counts.values()) >= 8, counts
    assert all(len(t.turns) == len(t.expected) >= 1 for t in TASKS)
    assert all(len(t.turns) == 2 for t in TASKS if t.family == "threads")
    import reliability_tasks as rt

    assert ht.SEED != rt.SEED
    assert not set(FAMILIES) & set(rt.families())
    assert not {t.id for t in TASKS} & {t.id for t in rt.tasks()}


@pytest.mark.parametrize(("task", "turn"), TURNS, ids=[f"{t.id}/{i}" for t, i in TURNS])
def test_every_expected_answer_passes_its_contract_and_is_correct(task: ht.Task, turn: int) -> None:
    contract = FAMILIES[task.family].contract
    expected = task.expected[turn]
    output = contract.parse_output(expected)
    ctx = _context(task, turn)
    assert contract.run_checks(output, ctx) == []
    assert contract.choice_problems(output, ctx) == []  # the choices never rule the answer out
    assert ht.correct(task, turn, output.model_dump(mode="json"))
    if task.family in ("two_tools", "sql"):
        # the answer is in what the real tools returned for the expected calls
        assert _problems(task, turn, expected, tool_results=[])  # and a check asks for the calls


def _perturbed(task: ht.Task, turn: int) -> dict[str, Any]:
    exp = dict(task.expected[turn])
    if task.family == "documents":
        return {**exp, "total": exp["total"] + 1}
    if task.family == "tickets":
        order = ("low", "normal", "high", "urgent")
        return {**exp, "priority": order[(order.index(exp["priority"]) + 1) % 4]}
    if task.family == "two_tools":
        value = exp["value"]
        try:
            return {**exp, "value": str(round(float(value) + 1, 2))}
        except ValueError:
            return {**exp, "value": "Atlantis"}
    if task.family == "sql":
        try:
            return {**exp, "answer": str(round(float(exp["answer"]) + 1, 2))}
        except ValueError:
            return {**exp, "answer": "Nobody"}
    return {**exp, "quantity": exp["quantity"] + 1}


@pytest.mark.parametrize(("task", "turn"), TURNS, ids=[f"{t.id}/{i}" for t, i in TURNS])
def test_a_perturbed_answer_is_not_correct_and_checks_catch_what_they_can(task: ht.Task, turn: int) -> None:
    contract = FAMILIES[task.family].contract
    wrong = contract.parse_output(_perturbed(task, turn)).model_dump(mode="json")
    assert not ht.correct(task, turn, wrong)
    if task.family != "tickets":  # a priority is a judgement: no check can see it (see `judgement`)
        assert _problems(task, turn, wrong)


def test_documents_hold_the_pack_convention_and_catch_the_usual_slips() -> None:
    doc = next(
        t for t in TASKS if t.family == "documents" and "Business cards, 500 pcs" in t.turns[0]["text"]
    )
    exp = doc.expected[0]
    i = next(n for n, item in enumerate(exp["items"]) if item["description"].startswith("Business cards"))
    assert exp["items"][i]["quantity"] == 1 and exp["items"][i]["unit_price"] == 45.0
    assert "1 when the line shows no count" in ht.DOCUMENT_INSTRUCTIONS  # the convention is stated
    pieces = [dict(item) for item in exp["items"]]
    pieces[i] = {**pieces[i], "quantity": 500, "unit_price": 0.09}
    problems = _problems(doc, 0, {**exp, "items": pieces})
    assert any("items.1.unit_price 0.09 is not written" in p for p in problems), problems
    assert not ht.correct(doc, 0, {**exp, "items": pieces})
    # a line left out: the items no longer add up to the printed total
    problems = _problems(doc, 0, {**exp, "items": exp["items"][1:]})
    assert any(p.startswith("answer.items (invoice_adds_up)") for p in problems), problems
    # the due date for the issue date
    due = next(t for t in TASKS if t.family == "documents" and "Due date: 13.04.2026" in t.turns[0]["text"])
    problems = _problems(due, 0, {**due.expected[0], "issue_date": "2026-04-13"})
    assert any("is the due date" in p for p in problems), problems
    # the same item by its shorter name is still the item; a tax left out is caught
    short = [{**item, "description": item["description"].split(",")[0]} for item in exp["items"]]
    assert ht.correct(doc, 0, {**exp, "items": short})
    problems = _problems(doc, 0, {**exp, "tax": 0.0, "total": round(exp["total"] - exp["tax"], 2)})
    assert any("tax is 0 but the document has a tax line" in p for p in problems), problems


def test_ticket_summaries_are_judged_by_the_written_rule() -> None:
    task = next(t for t in TASKS if t.family == "tickets")
    exp = task.expected[0]
    body = task.turns[0]["body"]
    assert ht.correct(task, 0, {**exp, "summary": "ShopFront payments fail with an error for all customers."})
    copied = body[: body.index(".")]  # the ticket's own first sentence
    for summary in (
        copied[:120],  # a copy
        "Payments fail with Error 502 for all customers.",  # no product
        "ShopFront: please look at this one.",  # nothing of the ticket besides the product
    ):
        assert not ht.correct(task, 0, {**exp, "summary": summary}), summary
    assert any("copies the ticket" in p for p in _problems(task, 0, {**exp, "summary": copied[:120]}))
    assert any("does not name the product" in p for p in _problems(task, 0, {**exp, "summary": "x" * 20}))
    judged = FAMILIES["tickets"].contract
    if "judgement" in Contract.__dataclass_fields__:
        assert tuple(judged.judgement) == ("category", "priority")


def test_two_tool_answers_need_the_second_call() -> None:
    task = next(
        t for t in TASKS if t.family == "two_tools" and t.expected[0]["tools_used"][-1] == "convert_currency"
    )
    results = _tool_results(task, 0)
    first_only = results[:1]
    amount = str(first_only[0]["output"]["amount"])  # the unconverted amount
    problems = _problems(task, 0, {"value": amount, "tools_used": ["order_lookup"]}, tool_results=first_only)
    assert any("no call used another's result" in p for p in problems), problems
    # a second call that does not use the first's result does not count
    independent = [results[0], {**results[1], "args": {"amount": 10.0, "source": "GBP", "target": "EUR"}}]
    assert _problems(task, 0, task.expected[0], tool_results=independent)
    # the bare rule: the same output model, judged the same; tools named in another order are fine
    exp = task.expected[0]
    assert ht.correct(task, 0, {"value": f"{exp['value']} EUR", "tools_used": exp["tools_used"][::-1]})
    assert not ht.correct(task, 0, {"value": exp["value"], "tools_used": ["order_lookup"]})


def test_the_sql_questions_need_a_join_an_aggregate_or_a_filter() -> None:
    for task in (t for t in TASKS if t.family == "sql"):
        sql = task.calls[0][0]["args"]["sql"].upper()
        assert any(word in sql for word in ("WHERE", "JOIN", "COUNT(", "SUM(", "AVG(", "GROUP BY")), sql
        assert "sql_schema" in {t.name for t in FAMILIES["sql"].tools}
    assert FAMILIES["sql"].options == {"allow_repeat_tools": True}


def test_thread_checks_see_only_this_turn() -> None:
    task = next(t for t in TASKS if t.family == "threads" and "Change it to 5" in t.turns[1]["text"])
    before, after = task.expected
    assert after["quantity"] == 5 and after["customer_name"] == before["customer_name"]
    # turn 2 keeps the quantity of turn 1: the check sees "Change it to 5"
    assert any(
        "it says 5" in p for p in _problems(task, 1, {**after, "quantity": 3, "total": before["total"]})
    )
    # a forgotten name cannot be seen by a check of turn 2, but it is not correct
    forgot = {**after, "customer_name": "Unknown Customer"}
    assert _problems(task, 1, forgot) == [] and not ht.correct(task, 1, forgot)


# -- the harness --------------------------------------------------------------------------------


def test_harness_picks_the_held_out_set_quickly() -> None:
    args = reliability.parse_args(["--set", "heldout", "--quick"])
    assert args.sets == ["heldout"] and args.limit == 1 and args.repeats == 2
    chosen = reliability.choose(args)
    assert [ts.name for ts, _ in chosen] == ["heldout"]
    ((_, picked),) = chosen
    assert [t.family for t in picked] == list(ht.FAMILY_NAMES)
    both = reliability.choose(reliability.parse_args(["--quick"]))
    assert [(ts.name, len(p)) for ts, p in both] == [("dev", 3), ("heldout", 5)]
    dev = reliability.parse_args(["--set", "dev"])
    assert dev.sets == ["dev"] and [len(p) for _, p in reliability.choose(dev)] == [50]
    only = reliability.choose(
        reliability.parse_args(["--families", "sql,threads", "--tasks", "sql-03,thread-01"])
    )
    assert [(ts.name, [t.id for t in p]) for ts, p in only] == [("heldout", ["sql-03", "thread-01"])]
    with pytest.raises(SystemExit):
        reliability.parse_args(["--set", "dev", "--families", "documents"])
    path = Path(reliability.HELDOUT_FILE)
    assert reliability.heldout_sha256() == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _script(task: ht.Task) -> list[Any]:
    """The right steps of every turn: the expected tool calls, then the expected answer."""
    steps: list[Any] = []
    for turn, expected in enumerate(task.expected):
        steps += [call(c["name"], **c["args"]) for c in (task.calls[turn] if task.calls else [])]
        steps.append(answer(**expected))
    return steps


@pytest.mark.parametrize("task", TASKS, ids=[t.id for t in TASKS])
def test_keelgraph_runs_every_task_turn_by_turn_on_one_thread(task: ht.Task) -> None:
    ts = reliability.task_set("heldout")
    model = ScriptedChatModel(_script(task), repeat_last=True)  # repeats: a judgement's samples
    run = reliability.run_one("keelgraph", ts, task, model)
    assert run["valid"] and run["correct"] and not run["refused"], run["error"]
    assert run["turns"] == [{"valid": True, "correct": True, "refused": False}] * len(task.turns)
    assert run["output"] == task.expected
    if task.family == "threads":  # turn 2 was shown turn 1 from the thread
        shown = " ".join(str(m.content) for m in model.calls[-1]["messages"])
        assert task.turns[0]["text"] in shown


def test_a_refused_turn_fails_the_task_and_is_counted() -> None:
    task = next(t for t in TASKS if t.family == "threads")
    # A quantity the message does not state (a wrong total alone is `Computed`: written in, not refused).
    want = task.expected[1]
    wrong = {
        **want,
        "quantity": want["quantity"] + 1,
        "total": round((want["quantity"] + 1) * want["unit_price"], 2),
    }
    model = ScriptedChatModel([answer(**task.expected[0]), answer(**wrong)], repeat_last=True)
    run = reliability.run_one("keelgraph", reliability.task_set("heldout"), task, model)
    assert run["turns"][0]["correct"] and run["turns"][1]["refused"]
    assert not run["valid"] and not run["correct"] and run["refused"]
    assert run["error"].startswith("turn 2:")
    summary = reliability.summarize([{**run, "seconds": 1.0, "tokens": 0}], repeats=1)
    assert summary["refused"] == 1.0 and summary["valid_but_wrong"] == 0.0


def test_bare_keeps_the_conversation_and_tool_families_answer_directly() -> None:
    import json

    ts = reliability.task_set("heldout")
    thread = next(t for t in TASKS if t.family == "threads")
    model = ScriptedChatModel([json.dumps(e) for e in thread.expected])
    run = reliability.run_one("bare", ts, thread, model)
    assert run["correct"] and run["calls"] == 2
    second = model.calls[1]["messages"]
    assert [type(m).__name__ for m in second] == [
        "SystemMessage",
        "HumanMessage",
        "AIMessage",
        "HumanMessage",
    ]
    chain = next(t for t in TASKS if t.family == "two_tools")
    model = ScriptedChatModel([json.dumps({"value": "12.00", "tools_used": chain.expected[0]["tools_used"]})])
    run = reliability.run_one("bare", ts, chain, model)
    assert run["valid"] and not run["correct"] and run["calls"] == 1
    system = str(model.calls[0]["messages"][0].content)
    assert "you cannot call them" in system and "customer_lookup" in system


def test_langchain_keeps_the_message_history() -> None:
    from langchain_core.messages import AIMessage

    ts = reliability.task_set("heldout")
    thread = next(t for t in TASKS if t.family == "threads")
    replies = [
        AIMessage("", tool_calls=[{"name": "OrderSoFar", "args": e, "id": f"call-{i}"}])
        for i, e in enumerate(thread.expected)
    ]
    model = ScriptedChatModel(replies)
    run = reliability.run_one("langchain", ts, thread, model)
    assert run["valid"] and run["correct"], run["error"]
    second = model.calls[1]["messages"]
    assert [type(m).__name__ for m in second] == [
        "SystemMessage",
        "HumanMessage",
        "AIMessage",
        "HumanMessage",
    ]


def test_the_table_names_the_set_only_when_both_ran() -> None:
    summary = reliability.summarize(
        [
            {
                "task": "a",
                "family": "x",
                "valid": True,
                "correct": False,
                "calls": 1,
                "tokens": 1,
                "seconds": 1.0,
            }
        ],
        repeats=1,
    )
    assert summary["valid_but_wrong"] == 1.0 and summary["refused"] == 0.0
    block = {"method": "bare", "temperature": 0.0, "summary": summary, "runs": []}
    plain = reliability.table({"config": {"repeats": 5}, "blocks": [block]})
    assert plain.startswith("| method | temp | valid | pass^1 | pass^5 |")
    labelled = reliability.table(
        {"config": {"repeats": 5}, "blocks": [{**block, "set": "heldout"}, {**block, "set": "dev"}]}
    )
    lines = labelled.splitlines()
    assert lines[0].startswith("| set | method |") and lines[2].startswith("| dev |")
    assert lines[3].startswith("| heldout | bare | 0.0 | 100.0% | 0.0% | - | 100.0% | 0.0% |")
