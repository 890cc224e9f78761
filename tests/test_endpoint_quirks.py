"""What real tool-calling endpoints refuse, and how a graph goes on: `tool_choice="required"`
refused (probe "auto", remember per endpoint), a tool call written as text, assistant tool-call
messages without text, grammar-hostile schemas, and a feature refused with the same 500 twice.

The e2e suite proves the same against a real llama-cpp-python server (tests/e2e/test_strategies.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import StructuredTool
from pydantic import BaseModel, Field

from keelgraph import Contract, build_graph
from keelgraph.contracts.errors import ModelUnavailable
from keelgraph.graphs.prompt import render
from keelgraph.runtime import models
from keelgraph.testing import ScriptedChatModel, answer
from keelgraph.tools import MemoryLedger, with_policy

REQUEST = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")


def server_error(message: str = "") -> openai.InternalServerError:
    """What llama-cpp-python answers `tool_choice="required"` with: a 500, an empty message."""
    response = httpx.Response(500, request=REQUEST, json={"error": {"message": message}})
    return openai.InternalServerError(message, response=response, body=None)


class Ask(BaseModel):
    order_id: int


class Status(BaseModel):
    order_id: int
    status: str = Field(max_length=1000)


def order_status(order_id: int) -> str:
    return "shipped"


TOOLS = [
    with_policy(
        StructuredTool.from_function(order_status, name="order_status", description="Status of an order"),
        side_effect="read",
    )
]
CONTRACT = Contract(input=Ask, output=Status, instructions="Report the order's status.", needs_tool=True)
CFG: Any = {"configurable": {"thread_id": "t"}}


def tool_call(name: str, **args: Any) -> AIMessage:
    return AIMessage("", tool_calls=[{"name": name, "args": args, "id": f"c_{name}", "type": "tool_call"}])


@pytest.fixture(autouse=True)
def _forget() -> Iterator[None]:
    """What an endpoint refused is remembered for the process: each test starts and ends clean."""
    models._REQUIRED_REFUSED.clear()
    yield
    models._REQUIRED_REFUSED.clear()


def graph(script: list[Any], **options: Any) -> tuple[Any, ScriptedChatModel]:
    model = ScriptedChatModel(script)
    built = build_graph(
        CONTRACT,
        TOOLS,
        model=model,
        checkpointer=None,
        effects=MemoryLedger(),
        strategy="tool_calling",
        **options,
    )
    return built, model


def test_required_refused_is_probed_once_with_auto_and_remembered() -> None:
    built, model = graph(
        [
            server_error(),  # tool_choice="required": refused
            tool_call("order_status", order_id=7),  # the same step with "auto"
            tool_call("final_answer", order_id=7, status="shipped"),
        ]
    )
    result = built.invoke({"request": {"order_id": 7}}, CFG)
    assert result["status"] == "ok" and result["output"] == {"order_id": 7, "status": "shipped"}
    choices = [c["kwargs"].get("tool_choice") for c in model.calls]
    assert choices[:2] == ["required", "auto"]
    assert result["stats"]["model_attempts"][0]["outcome"] == "ok"  # the probe is not a failure
    assert models.tool_choice_for(model) == "auto"
    # The next turn (another graph, the same endpoint) asks with "auto" at once.
    again, second = graph(
        [tool_call("order_status", order_id=8), tool_call("final_answer", order_id=8, status="x")]
    )
    assert again.invoke({"request": {"order_id": 8}}, {"configurable": {"thread_id": "u"}})["status"] == "ok"
    assert second.calls[0]["kwargs"]["tool_choice"] == "auto"


def test_a_500_that_auto_also_gets_is_a_fault_not_a_refusal() -> None:
    built, model = graph([server_error("boom"), server_error("boom"), *[server_error("boom")] * 3])
    with pytest.raises(ModelUnavailable):  # the request stays in the thread, to resume later
        built.invoke({"request": {"order_id": 7}}, CFG)
    assert models.tool_choice_for(model) == "required"  # nothing learnt from a fault


def test_a_call_written_as_text_becomes_the_call() -> None:
    built, _ = graph(
        [
            AIMessage('functions.order_status:\n{ "order_id": 7 }'),
            tool_call("final_answer", order_id=7, status="shipped"),
        ]
    )
    result = built.invoke({"request": {"order_id": 7}}, CFG)
    assert result["status"] == "ok" and result["stats"]["tool_calls"] == 1


def test_a_tool_named_as_text_is_asked_again_pinned_to_it() -> None:
    built, model = graph(
        [
            AIMessage("functions.order_status:"),  # what llama-cpp-python returns with "auto"
            tool_call("order_status", order_id=7),
            tool_call("final_answer", order_id=7, status="shipped"),
        ]
    )
    result = built.invoke({"request": {"order_id": 7}}, CFG)
    assert result["status"] == "ok"
    # The scripted model keeps the name as given; ChatOpenAI sends {"type": "function", ...}.
    assert model.calls[1]["kwargs"]["tool_choice"] == "order_status"


def test_text_naming_no_offered_tool_is_left_alone() -> None:
    built, model = graph(["functions.delete_everything:", *[answer(order_id=7, status="x")] * 4])
    built.invoke({"request": {"order_id": 7}}, CFG)
    assert all(c["kwargs"].get("tool_choice") != {"type": "function", "function": {"name": "delete_everything"}}
               for c in model.calls)  # fmt: skip


def test_tool_call_messages_always_carry_text() -> None:
    messages = [AIMessage("", tool_calls=[{"name": "order_status", "args": {"order_id": 7}, "id": "c1"}]),
                ToolMessage("shipped", tool_call_id="c1", name="order_status")]  # fmt: skip
    out = render(messages, "system", "tool_calling")
    sent = [m for m in out if isinstance(m, AIMessage)]
    assert sent[0].content == "Calling order_status." and sent[0].tool_calls


def test_tool_schemas_go_out_grammar_safe() -> None:
    """A `maxLength` of 1,000 in a tool's parameters crashed llama-cpp-python's server (its grammar
    compiler); the contract still checks the original limit."""
    built, model = graph(
        [tool_call("order_status", order_id=7), tool_call("final_answer", order_id=7, status="s")]
    )
    built.invoke({"request": {"order_id": 7}}, CFG)
    answer_tool = next(
        t for t in model.calls[-1]["kwargs"]["tools"] if t["function"]["name"] == "final_answer"
    )
    assert "maxLength" not in answer_tool["function"]["parameters"]["properties"]["status"]


def test_the_same_500_twice_moves_down_the_strategy_chain(caplog: pytest.LogCaptureFixture) -> None:
    refusal = server_error(
        "1 validation error: response_format.type: Input should be 'text' or 'json_object'"
    )
    plain = Contract(input=Ask, output=Status, instructions="Report the order's status.")
    model = ScriptedChatModel(
        [server_error("unsupported"), server_error("unsupported"), answer(order_id=7, status="ok")]
    )
    built = build_graph(plain, [], model=model, checkpointer=None, strategy=("json_schema", "prompted"))
    result = built.invoke({"request": {"order_id": 7}}, CFG)
    assert result["status"] == "ok"
    assert "response_format" not in model.calls[-1]["kwargs"]  # prompted: no format sent
    assert "using prompted from now on" in caplog.text
    assert models.refuses_required_choice(refusal)


@pytest.mark.parametrize("strategy", ["prompted", "tool_calling"])
def test_an_answer_where_a_tool_call_was_required_is_repaired_not_checked(strategy: str) -> None:
    """Prompted JSON (no grammar) and `tool_choice="auto"` can answer where a tool call is required
    (`needs_tool`): the answer is refused as `no_tool`, never judged as if it rested on a result."""
    first: Any = answer(order_id=7, status="pending")
    if strategy == "tool_calling":
        first = tool_call("final_answer", order_id=7, status="pending")
        models._REQUIRED_REFUSED.add(("", "keelgraph-scripted"))
    model = ScriptedChatModel(
        [
            first,
            tool_call("order_status", order_id=7),
            tool_call("final_answer", order_id=7, status="shipped")
            if strategy == "tool_calling"
            else answer(order_id=7, status="shipped"),
        ]
    )
    built = build_graph(CONTRACT, TOOLS, model=model, checkpointer=None, strategy=strategy)
    result = built.invoke({"request": {"order_id": 7}}, CFG)
    assert result["status"] == "ok" and result["output"]["status"] == "shipped"
    [attempt] = result["attempts"]
    assert attempt["kind"] == "no_tool" and "order_status" in attempt["problems"][0]["fix"]


class Person(BaseModel):
    name: str
    age: int


def age_is_36(answer: Person, ctx: Any) -> str | None:
    return None if answer.age == 36 else "age must be 36, as the text says"


def test_a_repair_that_leaves_out_a_field_nobody_objected_to_keeps_it() -> None:
    """Prompted JSON has no grammar: told to fix `age`, a small model writes only `age`. The name it
    wrote before, which no problem named, is carried over instead of refused again."""
    contract = Contract(
        input=Ask, output=Person, instructions="Extract.", checks=(age_is_36,), repair_budget=2
    )
    model = ScriptedChatModel([answer(name="Ada Lovelace", age=30), answer(age=36)])
    built = build_graph(contract, [], model=model, checkpointer=None, strategy="prompted")
    result = built.invoke({"request": {"order_id": 1}}, CFG)
    assert result["status"] == "ok" and result["output"] == {"name": "Ada Lovelace", "age": 36}


def test_a_field_a_problem_named_is_never_carried_over() -> None:
    contract = Contract(
        input=Ask, output=Person, instructions="Extract.", checks=(age_is_36,), repair_budget=1
    )
    model = ScriptedChatModel([answer(name="Ada", age=30), answer(name="Ada")])
    built = build_graph(contract, [], model=model, checkpointer=None, strategy="prompted")
    result = built.invoke({"request": {"order_id": 1}}, CFG)
    assert result["status"] == "failed"  # age was the problem: the old 30 is not carried
