"""The keelgraph flow with a scripted model: routing, repairs, tools, typed ends, persistence."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import StructuredTool
from pydantic import BaseModel, Field

from keelgraph import (
    Contract,
    InputRejected,
    RepairExhausted,
    UserError,
    build_graph,
    sqlite_checkpointer,
    unwrap,
    with_policy,
)
from keelgraph.contracts.repair import not_equal_pattern
from keelgraph.graphs.model_call import DECISIVE_REPAIR_TEMPERATURE, REPAIR_TEMPERATURE
from keelgraph.testing import ScriptedChatModel, answer, call

SNAPSHOT = Path(__file__).parent / "snapshots" / "graph.mmd"


class Question(BaseModel):
    city: str = Field(min_length=1, max_length=40)


class Forecast(BaseModel):
    city: str
    celsius: int = Field(ge=-60, le=60)


class WeatherArgs(BaseModel):
    city: str = Field(min_length=1)


CALLS: list[str] = []


def weather(city: str) -> dict[str, Any]:
    CALLS.append(city)
    return {"city": city, "celsius": 21}


def slow(city: str) -> str:
    time.sleep(3)
    return "late"


def boom(city: str) -> str:
    raise RuntimeError("upstream is down")


def make_tool(fn: Any, name: str, **policy: Any) -> StructuredTool:
    tool = StructuredTool.from_function(
        fn, name=name, description=f"{name} for a city", args_schema=WeatherArgs
    )
    return with_policy(tool, **policy) if policy else tool  # type: ignore[return-value]


def matches_tool(forecast: Forecast, ctx: Any) -> str | None:
    seen = [r["output"]["celsius"] for r in ctx.tool_results if r["name"] == "weather"]
    if seen and forecast.celsius != seen[-1]:
        return f"celsius must be {seen[-1]}, the tool's value"
    return None


CONTRACT = Contract(
    input=Question,
    output=Forecast,
    instructions="Report the weather.",
    checks=(matches_tool,),
    repair_budget=2,
)


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


def run(
    script: list[Any],
    request: Any = None,
    *,
    tools: Any = None,
    tmp: Path,
    thread: str = "t",
    **kw: Any,
) -> tuple[dict[str, Any], Any, ScriptedChatModel]:
    model = ScriptedChatModel(script)
    kw.setdefault("strategy", "json_object")
    graph = build_graph(
        kw.pop("contract", CONTRACT),
        [make_tool(weather, "weather")] if tools is None else tools,
        model=model,
        checkpointer=sqlite_checkpointer(tmp / "threads.db"),
        **kw,
    )
    config: Any = {"configurable": {"thread_id": thread}}
    result = graph.invoke({"request": request if request is not None else {"city": "Oslo"}}, config)
    return result, graph.get_state(config), model


def test_happy_path_with_a_tool(tmp_path: Path) -> None:
    result, state, model = run([call("weather", city="Oslo"), answer(city="Oslo", celsius=21)], tmp=tmp_path)
    assert unwrap(result, Forecast) == Forecast(city="Oslo", celsius=21)
    assert result["stats"]["model_calls"] == 2 and result["stats"]["tool_calls"] == 1
    kinds = [m.additional_kwargs.get("keelgraph") for m in state.values["messages"]]
    assert kinds == ["request", "step", None, "answer"]
    # the second call offered no tools any more: its schema is the answer alone
    fmt = model.calls[1]["kwargs"]["extra_body"]["response_format"]["schema"]
    assert fmt["properties"]["action"]["const"] == "final_answer"


def test_invalid_answer_then_valid_answer(tmp_path: Path) -> None:
    result, state, model = run(
        [answer(city="Oslo", celsius=99), answer(city="Oslo", celsius=20)], tmp=tmp_path, tools=[]
    )
    assert result["status"] == "ok" and result["stats"]["repairs"] == 1
    correction = model.calls[1]["messages"][-1]
    assert isinstance(correction, HumanMessage)
    assert "answer.celsius: Input should be less than or equal to 60" in correction.content
    assert state.values["attempts"][0]["kind"] == "output"


def test_semantic_check_failure_is_repaired(tmp_path: Path) -> None:
    script = [
        call("weather", city="Oslo"),
        answer(city="Oslo", celsius=5),
        answer(city="Oslo", celsius=21),
    ]
    result, state, model = run(script, tmp=tmp_path)
    assert result["status"] == "ok"
    assert "celsius must be 21, the tool's value" in model.calls[2]["messages"][-1].content
    assert state.values["attempts"][0]["kind"] == "check"


def test_tool_call_with_bad_arguments_goes_back_to_the_model(tmp_path: Path) -> None:
    script = [
        call("weather", city=""),
        call("weather", city="Oslo"),
        answer(city="Oslo", celsius=21),
    ]
    result, state, _ = run(script, tmp=tmp_path)
    assert result["status"] == "ok" and CALLS == ["Oslo"]
    error = next(m for m in state.values["messages"] if isinstance(m, ToolMessage))
    assert error.status == "error" and "args.city" in error.content and "nothing was run" in error.content
    assert state.values["attempts"][0]["kind"] == "tool_args"


def test_invented_tool_is_an_error_message_not_a_crash(tmp_path: Path) -> None:
    script = ['{"action": "launch_rockets", "args": {}}', answer(city="Oslo", celsius=21)]
    result, state, model = run(script, tmp=tmp_path, tools=[])
    assert result["status"] == "ok"
    assert "there is no tool named 'launch_rockets'" in model.calls[1]["messages"][-1].content
    assert state.values["attempts"][0]["kind"] == "unknown_tool"


def test_native_call_to_unknown_tool(tmp_path: Path) -> None:
    bad = AIMessage("", tool_calls=[{"name": "nope", "args": {}, "id": "c1", "type": "tool_call"}])
    result, state, _ = run([bad, answer(city="Oslo", celsius=21)], tmp=tmp_path)
    assert result["status"] == "ok"
    assert state.values["attempts"][0]["kind"] == "unknown_tool"


def test_repeated_identical_call_is_not_run_twice(tmp_path: Path) -> None:
    script = [
        call("weather", city="Oslo"),
        call("weather", city="Oslo"),
        answer(city="Oslo", celsius=21),
    ]
    result, state, _model = run(script, tmp=tmp_path, strategy="prompted")
    assert result["status"] == "ok" and CALLS == ["Oslo"]
    refused = [m for m in state.values["messages"] if isinstance(m, ToolMessage)][-1]
    assert "NOT RUN: you already called weather with these arguments" in refused.content
    assert state.values["attempts"][0]["kind"] == "repeated_call"


def test_tool_call_written_as_text_is_validated_and_run(tmp_path: Path) -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    result, _, _ = run([text, answer(city="Oslo", celsius=21)], tmp=tmp_path, strategy="tool_calling")
    assert result["status"] == "ok" and CALLS == ["Oslo"]
    assert result["stats"]["recoveries"] >= 2


def test_native_tool_calling_strategy(tmp_path: Path) -> None:
    step = AIMessage(
        "",
        tool_calls=[{"name": "weather", "args": {"city": "Oslo"}, "id": "c1", "type": "tool_call"}],
    )
    final = AIMessage(
        "",
        tool_calls=[
            {
                "name": "final_answer",
                "args": {"city": "Oslo", "celsius": 21},
                "id": "c2",
                "type": "tool_call",
            }
        ],
    )
    result, _, model = run([step, final], tmp=tmp_path, strategy="tool_calling")
    assert unwrap(result, Forecast).celsius == 21
    assert model.calls[0]["kwargs"]["tool_choice"] == "required"
    assert model.calls[1]["kwargs"]["tool_choice"] == "final_answer"  # retry forces the answer tool


def test_budget_exhausted_is_typed_and_persisted(tmp_path: Path) -> None:
    script = [answer(city="Oslo", celsius=99), "no json here", answer(city="Oslo", celsius=-99)]
    result, state, model = run(script, tmp=tmp_path, tools=[])
    assert result["status"] == "failed" and len(model.calls) == 3  # budget 2: three tries, no more
    with pytest.raises(RepairExhausted) as caught:
        unwrap(result, Forecast)
    assert [a.kind for a in caught.value.attempts] == ["output", "parse", "output"]
    assert caught.value.last_raw == json.dumps(answer(city="Oslo", celsius=-99))
    assert caught.value.usage["model_calls"] == 3
    assert state.values["status"] == "failed" and state.values["error"]["type"] == "RepairExhausted"


def test_same_invalid_output_twice_stops_early(tmp_path: Path) -> None:
    contract = Contract(input=Question, output=Forecast, instructions="x", repair_budget=5)
    script = [answer(city="Oslo", celsius=99)] * 6
    result, _, model = run(script, tmp=tmp_path, tools=[], contract=contract)
    assert result["status"] == "failed" and len(model.calls) == 2
    assert "repeated the same invalid output" in result["error"]["message"]


def test_a_model_that_only_calls_tools_cannot_loop(tmp_path: Path) -> None:
    model_script = [call("weather", city=f"City{i}") for i in range(50)]
    result, _, model = run(
        model_script, tmp=tmp_path, strategy="prompted", allow_repeat_tools=True, max_tool_rounds=3
    )
    assert result["status"] == "failed"
    assert len(model.calls) <= 2 + 3 + CONTRACT.repair_budget


def test_hung_and_failing_tools_are_reported_to_the_model(tmp_path: Path) -> None:
    tools = [make_tool(slow, "weather", timeout_s=0.2)]
    started = time.perf_counter()
    result, state, _ = run(
        [call("weather", city="Oslo"), answer(city="Oslo", celsius=3)], tmp=tmp_path, tools=tools
    )
    assert time.perf_counter() - started < 2.5
    assert result["status"] == "ok"
    assert (
        "did not finish within 0.2 s"
        in next(m for m in state.values["messages"] if isinstance(m, ToolMessage)).content
    )
    result, state, _ = run(
        [call("weather", city="Oslo"), answer(city="Oslo", celsius=3)],
        tmp=tmp_path,
        tools=[make_tool(boom, "weather")],
        thread="u",
    )
    assert (
        "RuntimeError: upstream is down"
        in next(m for m in state.values["messages"] if isinstance(m, ToolMessage)).content
    )


def test_transient_model_errors_are_retried(tmp_path: Path) -> None:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    script = [openai.APITimeoutError(request=request), answer(city="Oslo", celsius=21)]
    result, _, model = run(script, tmp=tmp_path, tools=[])
    assert result["status"] == "ok" and len(model.calls) == 2


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"city": 5}, "city"),
        ({}, "city"),
        ({"city": ""}, "city"),
        ({"city": "x" * 41}, "city"),
        ("{not json", "request"),
        ("x" * 30_000, "request"),
        ({"city": 2**70}, "city"),  # past 64 bits: msgpack cannot store it; still a typed rejection
    ],
)
def test_bad_request_ends_typed_without_a_model_call_and_is_kept(
    tmp_path: Path, request_: Any, field: str
) -> None:
    result, state, model = run([], request_, tmp=tmp_path)
    assert result["status"] == "rejected" and model.calls == []
    with pytest.raises(InputRejected) as caught:
        unwrap(result, Forecast)
    assert caught.value.problems[0].field == field
    kept = state.values["messages"][-1]
    assert kept.additional_kwargs["keelgraph"] == "rejected"
    assert kept.content == (request_ if isinstance(request_, str) else json.dumps(request_))


def test_missing_request_key(tmp_path: Path) -> None:
    model = ScriptedChatModel([])
    graph = build_graph(CONTRACT, model=model, checkpointer=None)
    result = graph.invoke({"question": "hi"})  # type: ignore[arg-type]
    assert result["status"] == "rejected" and result["error"]["problems"][0]["field"] == "request"


def test_threads_remember_and_reset_per_turn(tmp_path: Path) -> None:
    script = [answer(city="Oslo", celsius=21), answer(city="Bergen", celsius=12)]
    model = ScriptedChatModel(script)
    graph = build_graph(CONTRACT, model=model, checkpointer=sqlite_checkpointer(tmp_path / "t.db"))
    config: Any = {"configurable": {"thread_id": "m"}}
    graph.invoke({"request": {"city": "Oslo"}}, config)
    second = graph.invoke({"request": {"city": "Bergen"}}, config)
    assert second["stats"]["model_calls"] == 1  # per-turn stats start from zero
    seen = [m.content for m in model.calls[1]["messages"]]
    assert '{"city":"Oslo"}' in seen and '{"city":"Oslo","celsius":21}' in seen  # turn 1 is remembered
    assert graph.get_state(config).values["usage"]["output_tokens"] > 0


def test_build_time_mistakes_are_user_errors() -> None:
    tool = make_tool(weather, "weather")
    with pytest.raises(UserError, match="unique"):
        build_graph(CONTRACT, [tool, tool], model=ScriptedChatModel([]), checkpointer=None)
    with pytest.raises(UserError, match="reserved"):
        build_graph(
            CONTRACT,
            [make_tool(weather, "final_answer")],
            model=ScriptedChatModel([]),
            checkpointer=None,
        )
    with pytest.raises(UserError, match="preloaded tool 'weather'"):
        build_graph(
            CONTRACT,
            [make_tool(weather, "weather", preload=True)],
            model=ScriptedChatModel([]),
            checkpointer=None,
        )


def test_graph_shape_snapshot() -> None:
    graph = build_graph(
        CONTRACT, [make_tool(weather, "weather")], model=ScriptedChatModel([]), checkpointer=None
    )
    mermaid = graph.get_graph().draw_mermaid()
    if not SNAPSHOT.exists():
        SNAPSHOT.write_text(mermaid)
    assert mermaid == SNAPSHOT.read_text()


def test_answers_that_paste_tool_fences_or_echo_the_correction_are_rejected(tmp_path: Path) -> None:
    fenced = answer(city='<tool_result name="weather">Oslo</tool_result>', celsius=21)
    echo = answer(city="it pastes raw tool output -> state the facts in your own words", celsius=21)
    result, state, model = run([fenced, echo, answer(city="Oslo", celsius=21)], tmp=tmp_path, tools=[])
    assert result["status"] == "ok"
    reasons = [a["problems"][0]["reason"] for a in state.values["attempts"]]
    assert reasons == ["it pastes raw tool output", "it repeats the correction instead of answering"]
    repair = model.calls[1]["messages"][-1].content
    assert 'Reply again to the request, without that mistake: {"city":"Oslo"}' in repair
    # The rejected draft stays in the thread but is not shown again: small models copy it.
    shown = [str(m.content) for m in model.calls[1]["messages"]]
    assert not any("Oslo</tool_result>" in text for text in shown)


BUDGET_2 = Contract(
    input=Question,
    output=Forecast,
    instructions="Report the weather.",
    checks=(matches_tool,),
    repair_budget=2,
)


def _hot(forecast: Forecast, ctx: Any) -> str | None:
    return "it cannot be that hot" if forecast.celsius > 40 else None


@pytest.mark.parametrize(
    ("case", "script", "kinds", "message", "contract"),
    [
        (
            "output schema",
            # The third leaves out `city`, which nobody objected to: carried over, still refused (99).
            [answer(city="Oslo", celsius=99), answer(city="Oslo"), answer(celsius=99)],
            ["output", "output", "output"],
            "repair budget of 2 spent",
            BUDGET_2,
        ),
        (
            "semantic check",
            [
                answer(city="Oslo", celsius=45),
                answer(city="Oslo", celsius=50),
                answer(city="Oslo", celsius=55),
            ],
            ["check", "check", "check"],
            "repair budget of 2 spent",
            Contract(input=Question, output=Forecast, instructions="x", checks=(_hot,), repair_budget=2),
        ),
        (
            "tool arguments",
            [call("weather", city=""), call("weather", town="Oslo"), call("weather", city=5)],
            ["tool_args", "tool_args", "tool_args"],
            "repair budget of 2 spent",
            BUDGET_2,
        ),
        (
            "unknown tool",
            [call("radar", city="Oslo"), call("satellite", city="Oslo"), call("almanac", city="Oslo")],
            ["unknown_tool", "unknown_tool", "unknown_tool"],
            "repair budget of 2 spent",
            BUDGET_2,
        ),
        (
            "unparseable",
            [
                "NaN",
                "{'city': 'Oslo'",
                '{"action": "final_answer", "answer": {"city": "Oslo", "celsius": Infinity}}',
            ],
            ["parse", "parse", "parse"],
            "repair budget of 2 spent",
            BUDGET_2,
        ),
        (
            "same error twice",
            [answer(city="Oslo", celsius=99)] * 5,
            ["output", "output"],
            "the model repeated the same invalid output; stopped early",
            Contract(input=Question, output=Forecast, instructions="x", repair_budget=4),
        ),
    ],
)
def test_every_model_failure_ends_typed_and_recorded_in_the_thread(  # noqa: PLR0917
    tmp_path: Path, case: str, script: list[Any], kinds: list[str], message: str, contract: Contract[Any, Any]
) -> None:
    result, state, model = run(script, tmp=tmp_path, contract=contract)
    assert result["status"] == "failed", case
    with pytest.raises(RepairExhausted) as caught:
        unwrap(result, Forecast)
    error = caught.value
    assert [a.kind for a in error.attempts] == kinds
    assert [a.number for a in error.attempts] == list(range(1, len(kinds) + 1))
    assert all(a.problems and a.raw for a in error.attempts)  # every try: what came back and why not
    assert error.usage["model_calls"] == len(model.calls) == len(kinds)
    assert str(error) == f"no valid answer: {message}"
    # The thread records the same failure as data, and keeps the request and every try.
    saved = state.values
    assert saved["status"] == "failed" and saved["output"] is None
    assert saved["error"] == result["error"] and saved["error"]["type"] == "RepairExhausted"
    assert [a["kind"] for a in saved["attempts"]] == kinds
    tags = [m.additional_kwargs.get("keelgraph") for m in saved["messages"]]
    assert tags[0] == "request" and "answer" not in tags
    assert saved["stats"]["model_calls"] == len(kinds)


def test_a_tool_loop_ends_typed_and_recorded(tmp_path: Path) -> None:
    # Valid calls to a new city every time: 3 tool rounds, then each further call is a repair.
    script = [call("weather", city=f"City{i}") for i in range(50)]
    result, state, model = run(script, tmp=tmp_path, allow_repeat_tools=True, max_tool_rounds=3)
    assert (
        result["status"] == "failed"
        and result["error"]["message"] == "no valid answer: repair budget of 2 spent"
    )
    assert [a["kind"] for a in result["error"]["attempts"]] == ["repeated_call"] * 3
    assert len(model.calls) == 3 + 3 <= 2 + 3 + CONTRACT.repair_budget  # under the hard ceiling
    assert state.values["status"] == "failed" and state.values["error"] == result["error"]


def test_numbers_past_64_bits_are_refused_at_every_boundary(tmp_path: Path) -> None:
    class Count(BaseModel):
        n: int

    contract = Contract(input=Count, output=Count, instructions="Echo n.", repair_budget=1)
    with pytest.raises(InputRejected) as caught:
        contract.parse_input({"n": 2**64})
    assert caught.value.problems[0].field == "n" and "64-bit" in caught.value.problems[0].reason
    # From the model: written as text it is a parse problem, so a repair turn, and the run ends ok.
    script = ['{"action": "final_answer", "answer": {"n": 99999999999999999999999}}', answer(n=7)]
    result, state, _ = run(script, {"n": 7}, tmp=tmp_path, tools=[], contract=contract)
    assert result["status"] == "ok" and result["output"] == {"n": 7}
    assert state.values["attempts"][0]["kind"] == "parse" and "64-bit" in str(state.values["attempts"][0])


def _refusal(status: int, text: str) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    kind = {400: openai.BadRequestError, 500: openai.InternalServerError}[status]
    return kind(text, response=httpx.Response(status, request=request), body=None)


def test_the_first_strategy_the_endpoint_accepts_is_used(tmp_path: Path) -> None:
    refused = _refusal(400, "Error code: 400 - 'tools' are not supported by this model")
    model = ScriptedChatModel([refused, answer(city="Oslo", celsius=3), answer(city="Rome", celsius=20)])
    graph = build_graph(
        CONTRACT, [], model=model, checkpointer=None, strategy=("tool_calling", "json_object", "prompted")
    )
    assert graph.invoke({"request": {"city": "Oslo"}})["status"] == "ok"
    assert "tools" in model.calls[0]["kwargs"]  # asked with native tools: refused
    schema_call = model.calls[1]["kwargs"]["extra_body"]["response_format"]
    assert schema_call["type"] == "json_object" and "schema" in schema_call
    assert graph.invoke({"request": {"city": "Rome"}})["output"]["city"] == "Rome"
    assert "extra_body" in model.calls[2]["kwargs"]  # the move is remembered by the graph


def test_llama_cpp_refusing_json_schema_moves_on_but_other_errors_do_not(tmp_path: Path) -> None:
    refused = _refusal(500, "Input should be 'text' or 'json_object' ('body', 'response_format', 'type')")
    model = ScriptedChatModel([refused, answer(city="Oslo", celsius=3)])
    graph = build_graph(CONTRACT, [], model=model, checkpointer=None, strategy=("json_schema", "json_object"))
    assert graph.invoke({"request": {"city": "Oslo"}})["status"] == "ok"
    overflow = _refusal(400, "This model's maximum context length is 4096 tokens")
    graph = build_graph(
        CONTRACT,
        [],
        model=ScriptedChatModel([overflow]),
        checkpointer=None,
        strategy=("json_schema", "prompted"),
    )
    with pytest.raises(openai.BadRequestError):
        graph.invoke({"request": {"city": "Oslo"}})


def test_output_choices_reach_the_grammar_and_the_repair(tmp_path: Path) -> None:
    """A contract's choices become an `enum` in the schema the endpoint gets; a value outside them
    is a check failure the model repairs."""

    def cities_asked(ctx: Any) -> dict[str, list[str]]:
        return {"city": [ctx.input.city]}

    contract = Contract(
        input=Question, output=Forecast, instructions="Report the weather.", choices=cities_asked
    )
    script = [answer(city="Bergen", celsius=4), answer(city="Oslo", celsius=4)]
    result, state, model = run(script, tmp=tmp_path, tools=[], contract=contract)
    assert result["status"] == "ok" and result["output"]["city"] == "Oslo"
    fmt = model.calls[0]["kwargs"]["extra_body"]["response_format"]
    assert fmt["schema"]["properties"]["answer"]["properties"]["city"]["enum"] == ["Oslo"]
    [attempt] = state.values["attempts"]
    assert attempt["kind"] == "check"
    assert attempt["problems"][0]["field"] == "answer.city"
    assert "use one of ['Oslo']" in model.calls[1]["messages"][-1].content


class Order(BaseModel):
    city: str
    postcode: str
    gift: bool


def _gift_asked(order: Order, ctx: Any) -> str | None:
    return "gift is true but the request does not ask for it" if order.gift else None


def _grammar(model: ScriptedChatModel, call_index: int) -> dict[str, Any]:
    schema: dict[str, Any] = model.calls[call_index]["kwargs"]["extra_body"]["response_format"]["schema"]
    return schema["properties"]["answer"]


def test_a_repair_may_only_change_the_fields_a_problem_names(tmp_path: Path) -> None:
    """The repair's grammar flips the rejected boolean and pins what nobody objected to; the
    prompt still describes the plain schema."""
    contract = Contract(input=Question, output=Order, instructions="Take the order.", checks=(_gift_asked,))
    script = [
        answer(city="Oslo", postcode="0150", gift=True),
        answer(city="Oslo", postcode="0150", gift=False),
    ]
    result, state, model = run(script, tmp=tmp_path, tools=[], contract=contract)
    assert result["status"] == "ok" and result["output"]["gift"] is False
    assert state.values["attempts"][0]["problems"][0]["field"] == "answer.gift (_gift_asked)"
    first, repair = _grammar(model, 0), _grammar(model, 1)
    assert first["properties"]["gift"] == {"type": "boolean"}
    assert repair["properties"] == {
        "city": {"const": "Oslo"},
        "postcode": {"const": "0150"},
        "gift": {"type": "boolean", "enum": [False]},
    }
    system = str(model.calls[1]["messages"][0].content)
    assert "gift (boolean, required)" in system and "Oslo" not in system  # the draft stays out
    # the grammar rules the rejected answer out, so the repair is not resampled
    assert model.calls[1]["kwargs"]["temperature"] == DECISIVE_REPAIR_TEMPERATURE


def test_a_rejected_string_is_ruled_out_and_a_problem_naming_no_field_pins_nothing(tmp_path: Path) -> None:
    def checks(order: Order, ctx: Any) -> list[str]:
        wrong = ["city 'Olso' is not the city asked for"] if order.city != ctx.input.city else []
        return wrong + (["the order looks odd"] if order.postcode == "0000" else [])

    contract = Contract(input=Question, output=Order, instructions="x", checks=(checks,), repair_budget=3)
    script = [
        answer(city="Olso", postcode="0150", gift=False),
        answer(city="Olso", postcode="0000", gift=False),
        answer(city="Oslo", postcode="0150", gift=False),
    ]
    result, _, model = run(script, tmp=tmp_path, tools=[], contract=contract)
    assert result["status"] == "ok" and len(model.calls) == 3
    repair = _grammar(model, 1)["properties"]
    assert repair["city"]["pattern"].startswith('^([^O"') and repair["postcode"] == {"const": "0150"}
    # the second rejection has a problem that names no field: nothing is pinned, the city still ruled out
    second = _grammar(model, 2)["properties"]
    assert "const" not in json.dumps(second) and "pattern" in second["city"]
    temperatures = [model.calls[i]["kwargs"].get("temperature") for i in range(3)]
    assert temperatures == [None, DECISIVE_REPAIR_TEMPERATURE, REPAIR_TEMPERATURE]


def test_a_validation_error_pins_the_valid_fields(tmp_path: Path) -> None:
    script = [answer(city="Oslo", celsius=99), answer(city="Oslo", celsius=20)]
    result, _, model = run(script, tmp=tmp_path, tools=[])
    assert result["status"] == "ok"
    repair = _grammar(model, 1)["properties"]
    assert repair["city"] == {"const": "Oslo"} and "const" not in repair["celsius"]


def test_constrained_repairs_keep_to_the_repair_budget(tmp_path: Path) -> None:
    """Every repair is constrained differently, and still the budget bounds the calls."""
    contract = Contract(
        input=Question, output=Order, instructions="x", checks=(_gift_asked,), repair_budget=3
    )
    script = [answer(city=f"City{i}", postcode="1", gift=True) for i in range(20)]
    result, state, model = run(script, tmp=tmp_path, tools=[], contract=contract)
    assert result["status"] == "failed" and "repair budget of 3 spent" in result["error"]["message"]
    assert len(model.calls) == 4 == len(state.values["attempts"])
    assert all(_grammar(model, i)["properties"]["gift"]["enum"] == [False] for i in (1, 2, 3))


def test_a_repair_after_a_tool_call_or_an_unreadable_reply_is_not_constrained(tmp_path: Path) -> None:
    contract = Contract(
        input=Question, output=Forecast, instructions="x", checks=(matches_tool,), repair_budget=3
    )
    script = [
        "not json",
        answer(city="Oslo", celsius=99),
        call("weather", city="Oslo"),
        answer(city="Oslo", celsius=21),
    ]
    result, _, model = run(script, tmp=tmp_path, contract=contract)
    assert result["status"] == "ok" and len(model.calls) == 4
    schemas = [
        json.dumps(model.calls[i]["kwargs"]["extra_body"]["response_format"]["schema"]) for i in range(4)
    ]
    assert '"const": "Oslo"' not in schemas[1]  # after a parse error: nothing to keep
    assert '"const": "Oslo"' in schemas[2]  # right after the rejected answer: city pinned
    assert '"const": "Oslo"' not in schemas[3]  # after the tool ran: the answer is free again


def test_a_repair_cannot_go_back_to_a_value_refused_earlier_in_the_turn(tmp_path: Path) -> None:
    def right_city(order: Order, ctx: Any) -> str | None:
        return None if order.city == ctx.input.city else f"city {order.city!r} is not the city asked for"

    contract = Contract(input=Question, output=Order, instructions="x", checks=(right_city,), repair_budget=3)
    script = [answer(city=c, postcode="0150", gift=False) for c in ("Olso", "Oslp", "Oslo")]
    result, _, model = run(script, tmp=tmp_path, tools=[], contract=contract)
    assert result["status"] == "ok" and len(model.calls) == 3
    third = _grammar(model, 2)["properties"]["city"]["pattern"]
    assert third == not_equal_pattern("Oslp", "Olso")


def test_repair_temperature_is_greedy_after_a_draw_and_resamples_after_a_greedy_answer() -> None:
    from types import SimpleNamespace

    from keelgraph.contracts.repair import RepairPlan
    from keelgraph.graphs.model_call import repair_temperature

    sampled, greedy, unknown = (SimpleNamespace(temperature=t) for t in (0.7, 0.0, None))
    open_plan, decisive = RepairPlan({}), RepairPlan({}, decisive=True)
    assert repair_temperature(sampled, None, 0) is None  # the first attempt: the model's own
    # the rejected answer was a draw: the most likely answer, told what was wrong, comes next
    assert repair_temperature(sampled, open_plan, 1) == DECISIVE_REPAIR_TEMPERATURE
    assert repair_temperature(unknown, open_plan, 1) == DECISIVE_REPAIR_TEMPERATURE
    # greedy already failed: resample, unless the grammar rules the rejected answer out
    assert repair_temperature(greedy, open_plan, 1) == REPAIR_TEMPERATURE
    assert repair_temperature(sampled, open_plan, 2) == REPAIR_TEMPERATURE
    assert repair_temperature(greedy, decisive, 1) == DECISIVE_REPAIR_TEMPERATURE
    assert repair_temperature(sampled, decisive, 3) == DECISIVE_REPAIR_TEMPERATURE


def test_a_contract_that_needs_a_tool_offers_no_answer_until_one_returned(tmp_path: Path) -> None:
    import dataclasses

    contract = dataclasses.replace(CONTRACT, needs_tool=True)
    result, _, model = run(
        [call("weather", city="Oslo"), answer(city="Oslo", celsius=21)], tmp=tmp_path, contract=contract
    )
    assert result["status"] == "ok"
    first = model.calls[0]["kwargs"]["extra_body"]["response_format"]["schema"]
    assert first["properties"]["action"]["const"] == "weather"  # the tool call alone: no final_answer
    assert "final_answer" not in json.dumps(first)
    second = model.calls[1]["kwargs"]["extra_body"]["response_format"]["schema"]
    assert second["properties"]["action"]["const"] == "final_answer"  # the tool returned: now the answer
    # native tool calling: the answer tool is left out and a tool call is required
    _, _, native = run(
        [call("weather", city="Oslo"), answer(city="Oslo", celsius=21)],
        tmp=tmp_path, thread="native", contract=contract, strategy="tool_calling",
    )  # fmt: skip
    names = [t["function"]["name"] for t in native.calls[0]["kwargs"]["tools"]]
    assert names == ["weather"] and native.calls[0]["kwargs"]["tool_choice"] in ("required", "any")
    # with no tool offered, the answer is offered (and the checks judge it)
    result, _, model = run(
        [answer(city="Oslo", celsius=21)], tmp=tmp_path, thread="none", tools=[], contract=contract
    )
    assert result["status"] == "ok" and "final_answer" in json.dumps(model.calls[0]["kwargs"])
