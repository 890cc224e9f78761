"""`keelgraph eval`: datasets, scoring, baselines and drift, replay of recorded threads, progress."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.tools import StructuredTool
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import BaseModel, Field

from keelgraph import Contract, UserError, build_graph, with_policy
from keelgraph.commands.cli import EXIT_ERROR, EXIT_GRAPH, EXIT_REGRESSION, main
from keelgraph.commands.eval import (
    Case,
    Turn,
    compare,
    evaluate,
    format_table,
    load_dataset,
    match,
    parse_case,
    recorded_cases,
    same_cases,
    score_turn,
)
from keelgraph.progress import Progress
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools.ledger import MemoryLedger


class Ask(BaseModel):
    city: str = Field(min_length=1, max_length=40)


class Forecast(BaseModel):
    city: str
    celsius: int = Field(ge=-60, le=60)
    booked: bool = False


class BookArgs(BaseModel):
    city: str = Field(min_length=1)


TEMPERATURES = {"Oslo": 3, "Lisbon": 19, "Cairo": 31}
BOOKED: list[str] = []


def book(city: str) -> dict[str, Any]:
    BOOKED.append(city)
    return {"booked": city}


def _city(messages: list[BaseMessage]) -> str:
    asked = [str(m.content) for m in messages if isinstance(m, HumanMessage) and '"city"' in str(m.content)]
    found = re.search(r'"city":\s*"([^"]+)"', asked[-1]) if asked else None
    return found.group(1) if found else "Oslo"


def good_step(messages: list[BaseMessage]) -> dict[str, Any]:
    last = messages[-1]
    city = _city(messages)
    if city.startswith("book ") and isinstance(last, HumanMessage) and '"city"' in str(last.content):
        return call("book", city=city)
    booked = '"booked"' in str(last.content)
    return answer(city=city, celsius=TEMPERATURES.get(city.removeprefix("book "), 10), booked=booked)


def bad_step(messages: list[BaseMessage]) -> dict[str, Any]:
    return answer(city="Nowhere", celsius=99)  # out of range: the contract rejects it every time


def make(
    *,
    checkpointer: Any = None,
    effects: Any = None,
    instructions: str | None = None,
) -> Any:
    """A small graph factory in the shape `keelgraph eval --graph` expects."""
    degraded = instructions is not None and "careless" in instructions
    model = ScriptedChatModel([bad_step if degraded else good_step], repeat_last=True)
    contract = Contract(
        input=Ask, output=Forecast, instructions=instructions or "Report the weather.", repair_budget=1
    )
    tool = with_policy(
        StructuredTool.from_function(book, name="book", description="Book a trip", args_schema=BookArgs),
        side_effect="write",
        approval="always",
    )
    return build_graph(
        contract,
        [tool],
        model=model,
        checkpointer=checkpointer or InMemorySaver(),
        effects=effects or MemoryLedger(),
    )


CASES = [
    {"id": "oslo", "input": {"city": "Oslo"}, "expect": {"output": {"celsius": {"max": 5}, "city": "Oslo"}}},
    {"id": "cairo", "input": {"city": "Cairo"}, "expect": {"output": {"celsius": 31}}},
    {"id": "bad", "input": {"city": ""}, "expect": {"status": "rejected", "fields": ["city"]}},
    {
        "id": "two-turns",
        "turns": [
            {"input": {"city": "Lisbon"}, "expect": {"output": {"celsius": {"min": 15, "max": 25}}}},
            {"input": {"city": "Oslo"}, "expect": {"output": {"city": {"one_of": ["Oslo"]}}}},
        ],
    },
]


def _dataset(tmp_path: Path, cases: list[dict[str, Any]] = CASES) -> Path:
    path = tmp_path / "cases.jsonl"
    path.write_text("// weather cases\n\n" + "\n".join(json.dumps(c) for c in cases) + "\n")
    return path


@pytest.fixture(autouse=True)
def _clear() -> None:
    BOOKED.clear()


# --- datasets ------------------------------------------------------------------------------


def test_dataset_loads_single_and_multi_turn_cases(tmp_path: Path) -> None:
    cases = load_dataset(_dataset(tmp_path))
    assert [c.id for c in cases] == ["oslo", "cairo", "bad", "two-turns"]
    assert len(cases[3].turns) == 2
    assert cases[2].turns[0].expect == {"status": "rejected", "fields": ["city"]}
    assert cases[0].turns[0].approve is True


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{not json", "cases.jsonl:1: not JSON"),
        ('{"input": {}}', 'needs an "id"'),
        ('{"id": "x"}', 'give "input"'),
        ('{"id": "x", "input": {}, "expect": {"statsu": "ok"}}', "unknown expect key(s) ['statsu']"),
        ('{"id": "x", "input": {}, "expect": {"status": "great"}}', "status must be one of"),
        ('{"id": "x", "input": {}, "expect": {"output": {"a": {"regex": "("}}}}', "regex does not compile"),
        ('{"id": "x", "input": {}, "expect": {"output": {"a": {"includes": 3}}}}', "includes takes a list"),
        ('{"id": "x", "turns": []}', '"turns" must be a non-empty list'),
        ('{"id": "x", "input": {}}\n{"id": "x", "input": {}}', "repeated: ['x']"),
        ("// only a comment", "no cases"),
    ],
)
def test_a_bad_dataset_is_a_clear_error(tmp_path: Path, line: str, says: str) -> None:
    path = tmp_path / "cases.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=re.escape(says)):
        load_dataset(path)


def test_a_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read the dataset"):
        load_dataset(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("matcher", "value", "ok"),
    [
        (3, 3, True),
        (3, 4, False),
        ({"equals": [1, 2]}, [1, 2], True),
        ({"contains": "SHIPPED"}, "Your order has shipped.", True),
        ({"contains": 2}, [1, 2], True),
        ({"contains": "lost"}, "shipped", False),
        ({"contains_any": ["sent", "shipped"]}, "it shipped", True),
        ({"not_contains": "headphones"}, "Noise-cancelling headphones", False),
        ({"not_contains": 4}, [1, 2], True),
        ({"includes": [1, 2]}, [2, 1, 3], True),
        ({"includes": [1, 2]}, [1], False),
        ({"includes": [1]}, "1", False),
        ({"excludes": [4]}, [1, 2], True),
        ({"excludes": [4]}, [4], False),
        ({"one_of": ["a", "b"]}, "b", True),
        ({"regex": r"\b\d+\.\d{2}\b"}, "costs 12.50 EUR", True),
        ({"min": 1, "max": 3}, 2, True),
        ({"min": 1, "max": 3}, 4, False),
        ({"min": 1}, True, False),
        ({"max": 3}, "2", False),
        ({"status": "ok"}, {"status": "ok"}, True),  # not an operator object: plain equality
    ],
)
def test_matchers(matcher: Any, value: Any, ok: bool) -> None:
    assert (match(matcher, value) == []) is ok


def test_score_turn_names_every_failure() -> None:
    expect = {"output": {"celsius": 3, "extra": 1}, "tools": ["book"], "no_tools": ["cancel"]}
    result = {"status": "ok", "output": {"celsius": 4}}
    assert score_turn(expect, result, ["cancel"]) == [
        "output.celsius: expected 3, got 4",
        "output.extra is missing",
        "tool book did not run",
        "tool cancel ran",
    ]
    failed = {"status": "failed", "error": {"type": "RepairExhausted", "message": "budget spent"}}
    assert score_turn({}, failed, []) == ["status failed, expected ok (RepairExhausted: budget spent)"]
    rejected = {"status": "rejected", "error": {"problems": [{"field": "city"}]}}
    assert score_turn({"status": "rejected", "fields": ["city", "date"]}, rejected, []) == [
        "the rejection does not name 'date'"
    ]


# --- running, scoring, comparing ------------------------------------------------------------


def test_evaluate_scores_every_turn(tmp_path: Path) -> None:
    out = io.StringIO()
    report = evaluate(make(), load_dataset(_dataset(tmp_path)), progress=Progress(4, "eval", stream=out))
    summary = report["summary"]
    assert summary["cases"] == 4
    assert summary["turns"] == 5
    assert summary["contract"] == summary["correct"] == summary["cases_correct"] == 1.0
    assert summary["crashed"] == 0
    assert summary["model_calls"] == 0.8  # the rejected turn makes no model call
    assert summary["tokens"] > 0
    assert [c["id"] for c in report["cases"]] == ["oslo", "cairo", "bad", "two-turns"]
    assert report["cases"][3]["turns"][1]["output"]["city"] == "Oslo"
    assert "eval 4/4 (100%) two-turns: ok ok" in out.getvalue()
    assert compare(report, report) == []


def test_a_degraded_graph_is_a_regression(tmp_path: Path) -> None:
    cases = load_dataset(_dataset(tmp_path))
    quiet = io.StringIO()
    baseline = evaluate(make(), cases, progress=Progress(None, "e", stream=quiet))
    worse = evaluate(make(instructions="be careless"), cases, progress=Progress(None, "e", stream=quiet))
    assert worse["summary"]["contract"] == 0.2  # only the rejection still ends as expected
    assert worse["summary"]["repairs"] > baseline["summary"]["repairs"]
    found = {r.metric for r in compare(worse, baseline)}
    assert {"contract", "correct", "repairs"} <= found
    failures = worse["cases"][0]["turns"][0]["failures"]
    assert failures[0].startswith("status failed, expected ok (RepairExhausted")
    table = format_table(worse, baseline)
    assert "| oslo | 1 | failed | NO |" in table
    assert "| contract pass rate (turns) | 20.0% | 100.0% |" in table


def test_a_run_of_some_cases_is_compared_with_the_baseline_on_those_cases(tmp_path: Path) -> None:
    """`--case` runs are judged against the baseline's results for the same cases: a subset that
    holds its own is no regression even when the baseline as a whole scored lower or higher."""
    cases = load_dataset(_dataset(tmp_path))
    quiet = io.StringIO()
    baseline = evaluate(make(), cases, progress=Progress(None, "e", stream=quiet))
    baseline["cases"][0]["correct"] = False  # the baseline missed "oslo"
    baseline["cases"][0]["turns"][0]["correct"] = False
    baseline["summary"]["correct"] = 0.8
    some = [c for c in cases if c.id in {"cairo", "bad"}]
    subset = evaluate(make(), some, progress=Progress(None, "e", stream=quiet))
    assert same_cases(subset, baseline)["correct"] == 1.0 and same_cases(subset, baseline)["cases"] == 2
    assert compare(subset, baseline) == []
    worse = evaluate(make(instructions="be careless"), some, progress=Progress(None, "e", stream=quiet))
    assert "correct" in {r.metric for r in compare(worse, baseline)}
    assert same_cases(baseline, baseline) == baseline["summary"]


def test_thresholds_decide_what_is_a_regression() -> None:
    def report(correct: float, tokens: float, latency: float) -> dict[str, Any]:
        summary = {
            "contract": 1.0,
            "correct": correct,
            "repairs": 0.0,
            "tokens": tokens,
            "latency_p50": latency,
        }
        return {"summary": summary, "cases": []}

    base = report(0.9, 500, 2.0)
    assert compare(report(0.8, 500, 2.0), base) == []  # a ten-point drop is allowed by default
    assert [r.metric for r in compare(report(0.79, 500, 2.0), base)] == ["correct"]
    assert [r.metric for r in compare(report(0.9, 700, 2.0), base)] == ["tokens"]
    assert compare(report(0.9, 500, 60.0), base) == []  # latency only when asked: load moves it
    assert [r.metric for r in compare(report(0.9, 500, 6.5), base, {"latency": 2.0})] == ["latency_p50"]
    assert compare(report(0.9, 500, 6.5), base, {"latency": 3.0}) == []
    fast = report(0.9, 500, 0.02)
    assert compare(report(0.9, 500, 0.4), fast, {"latency": 1.0}) == []  # 20x, but 0.38 s: noise
    assert [r.metric for r in compare(report(0.85, 500, 2.0), base, {"correct": 0.01})] == ["correct"]
    with pytest.raises(UserError, match="unknown threshold"):
        compare(base, base, {"speed": 1.0})


def test_approvals_are_decided_as_the_case_says() -> None:
    graph = make()
    approve = Case("book", (Turn({"city": "book Oslo"}, {"output": {"booked": True}, "tools": ["book"]}),))
    decline = Case(
        "no", (Turn({"city": "book Cairo"}, {"output": {"booked": False}, "no_tools": ["book"]}, False),)
    )
    report = evaluate(graph, [approve, decline], progress=Progress(None, "e", stream=io.StringIO()))
    assert [c["correct"] for c in report["cases"]] == [True, True]
    assert BOOKED == ["book Oslo"]


def test_a_crashing_graph_is_scored_not_fatal() -> None:
    class Broken:
        def invoke(self, *_: Any, **__: Any) -> Any:
            raise RuntimeError("the endpoint is gone")

        def get_state(self, *_: Any) -> Any:
            raise RuntimeError("no state either")

    cases = [
        parse_case({"id": "a", "input": {"city": "Oslo"}}),
        parse_case({"id": "b", "input": {"city": "x"}}),
    ]
    report = evaluate(Broken(), cases, progress=Progress(None, "e", stream=io.StringIO()))
    assert report["summary"]["crashed"] == 2
    turn = report["cases"][0]["turns"][0]
    assert turn["status"] == "crashed"
    assert turn["output"] == {"type": "RuntimeError", "message": "the endpoint is gone"}


def test_recorded_threads_replay_as_cases() -> None:
    saver = InMemorySaver()
    graph = make(checkpointer=saver)
    config: Any = {"configurable": {"thread_id": "t1"}}
    graph.invoke({"request": {"city": "Cairo"}}, config)
    graph.invoke({"request": {"city": ""}}, config)
    graph.invoke({"request": {"city": "Lisbon"}}, config)
    [case] = recorded_cases(graph, ["t1"])
    assert case.id == "replay-t1"
    assert [t.input for t in case.turns] == [{"city": "Cairo"}, {"city": ""}, {"city": "Lisbon"}]
    assert case.turns[0].expect == {
        "status": "ok",
        "output": {"city": "Cairo", "celsius": 31, "booked": False},
    }
    assert case.turns[1].expect == {"status": "rejected"}
    quiet = Progress(None, "e", stream=io.StringIO())
    assert evaluate(make(), [case], progress=quiet)["summary"]["correct"] == 1.0
    worse = evaluate(make(instructions="careless"), [case], progress=quiet)["summary"]
    assert worse["correct"] == pytest.approx(1 / 3, abs=0.01)
    [only] = recorded_cases(graph, ["t1"], fields=["celsius"])
    assert only.turns[2].expect == {"status": "ok", "output": {"celsius": 19}}
    with pytest.raises(UserError, match="no finished turns"):
        recorded_cases(graph, ["never-ran"])


# --- the command ---------------------------------------------------------------------------


def _eval(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--graph",
        "tests.test_eval:make",
        "--dataset",
        str(_dataset(tmp_path)),
        "--out",
        str(tmp_path / "report.json"),
        *extra,
    ]


def test_cli_saves_a_baseline_then_fails_on_a_degraded_prompt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    baseline = tmp_path / "baseline.json"
    assert main(_eval(tmp_path, "--save-baseline", str(baseline))) == 0
    shown = capsys.readouterr()
    assert "| contract pass rate (turns) | 100.0% |" in shown.out
    assert f"baseline saved: {baseline}" in shown.out
    assert "eval done: 4" in shown.err
    assert json.loads(baseline.read_text())["summary"]["correct"] == 1.0

    assert main(_eval(tmp_path, "--baseline", str(baseline))) == 0
    assert "no regression against the baseline" in capsys.readouterr().out

    code = main(_eval(tmp_path, "--baseline", str(baseline), "--instructions", "be careless"))
    shown = capsys.readouterr()
    assert code == EXIT_REGRESSION
    assert "REGRESSION against the baseline:" in shown.out
    assert "contract: 1.0 -> 0.2" in shown.out
    assert "cases correct in the baseline, not now: oslo, cairo, two-turns" in shown.out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["instructions"] == "custom"
    assert report["graph"] == "tests.test_eval:make"


def test_cli_instructions_from_a_file_and_selected_cases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("be careless with the facts")
    assert main(_eval(tmp_path, "--instructions", f"@{prompt}", "--case", "bad")) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [c["id"] for c in report["cases"]] == ["bad"]
    capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--threshold", "speed=1"], "unknown threshold(s) ['speed']"),
        (["--threshold", "correct"], "write NAME=NUMBER"),
        (["--case", "nope"], "no case(s) ['nope']"),
        (["--instructions", "@/nonexistent/prompt.txt"], "--instructions @/nonexistent/prompt.txt"),
    ],
)
def test_cli_usage_errors_are_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], says: str
) -> None:
    baseline = tmp_path / "b.json"
    baseline.write_text(json.dumps({"summary": {}, "cases": []}))
    args = _eval(tmp_path, *extra)
    if extra[0] == "--threshold":
        args += ["--baseline", str(baseline)]
    assert main(args) == EXIT_ERROR
    assert says in capsys.readouterr().err


def test_cli_refuses_a_graph_it_cannot_load_or_instruct(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--graph", "no.such.module:make"]) == EXIT_GRAPH
    assert "cannot import no.such.module" in capsys.readouterr().err
    assert main(["eval", "--graph", "tests.test_eval:nothing"]) == EXIT_GRAPH
    assert "has no 'nothing'" in capsys.readouterr().err
    assert main(["eval", "--graph", "tests.test_eval:_dataset", "--instructions", "x"]) == EXIT_ERROR
    assert "takes no `instructions` argument" in capsys.readouterr().err
    not_a_report = tmp_path / "x.json"
    not_a_report.write_text("[1, 2]")
    assert main(_eval(tmp_path, "--baseline", str(not_a_report))) == EXIT_ERROR
    assert "is not an eval report" in capsys.readouterr().err


def persistent(*, checkpointer: Any = None, effects: Any = None, instructions: str | None = None) -> Any:
    """`make` whose threads live in a SQLite file when no checkpointer is given (as deployed)."""
    import os

    from keelgraph import sqlite_checkpointer

    saver = checkpointer or sqlite_checkpointer(Path(os.environ["EVAL_TEST_THREADS"]))
    return make(checkpointer=saver, effects=effects, instructions=instructions)


def test_cli_replays_recorded_threads_against_a_new_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EVAL_TEST_THREADS", str(tmp_path / "threads.db"))
    deployed = persistent()
    for city in ("Oslo", "Cairo"):
        deployed.invoke({"request": {"city": city}}, {"configurable": {"thread_id": "real-1"}})
    replay = [
        "eval",
        "--graph",
        "tests.test_eval:persistent",
        "--replay",
        "real-1",
        "--out",
        str(tmp_path / "r.json"),
    ]
    assert main([*replay, "--min-correct", "1"]) == 0
    assert "| replay-real-1 | 2 | ok,ok | yes |" in capsys.readouterr().out
    assert main([*replay, "--min-correct", "1", "--instructions", "careless"]) == EXIT_REGRESSION
    shown = capsys.readouterr().out
    assert "BELOW --min-correct: 0.0% of turns correct, 100.0% required" in shown
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["dataset"] == "replay:real-1"
    assert report["cases"][0]["turns"][0]["failures"][0].startswith("status failed, expected ok")
    assert main([*replay[:-2], "--replay", "nobody"]) == EXIT_ERROR
    assert "thread 'nobody' has no finished turns" in capsys.readouterr().err


def test_the_main_jobs_dataset_is_valid() -> None:
    from keelgraph.commands.cli import default_eval_dataset

    cases = load_dataset(default_eval_dataset())
    assert len(cases) >= 12
    turns = [t for c in cases for t in c.turns]
    assert any(t.expect.get("status") == "rejected" for t in turns)
    assert any("open_ticket" in t.expect.get("tools", []) for t in turns)
    assert any(not t.approve for t in turns)
    assert any(len(c.turns) > 1 for c in cases)


# --- progress ------------------------------------------------------------------------------


def test_progress_redraws_one_line_on_a_terminal() -> None:
    out = io.StringIO()
    with Progress(4, "bench", stream=out, interactive=True, width=8) as bar:
        bar.advance(note="a")
        bar.say("a line that stays")
        bar.advance(3)
    text = out.getvalue()
    assert "\rbench [##......] 1/4 (25%) a" in text
    assert "a line that stays\n" in text
    assert "[########] 4/4 (100%)" in text
    assert text.rstrip().splitlines()[-1].startswith("bench done: 4 in")


def test_progress_prints_plain_lines_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("CI", "true")
    assert Progress(2, "x", stream=Tty()).interactive is False
    monkeypatch.delenv("CI")
    monkeypatch.setenv("TERM", "xterm")
    assert Progress(2, "x", stream=Tty()).interactive is True
    assert Progress(2, "x", stream=io.StringIO()).interactive is False
    out = io.StringIO()
    bar = Progress(None, "download", stream=out, interactive=False, unit="MB")
    bar.advance(5)
    bar.close()
    bar.close()
    assert out.getvalue().splitlines()[0].startswith("download 5 MB ")
    assert out.getvalue().count("done") == 1
