"""Every output strategy against a real server: the same four tasks (an extraction, a tool call, a
repair, an approval) on the embedded model through `json_object` (grammar), `tool_calling`
(llama-cpp-python's `chatml-function-calling`: native `tools`/`tool_choice`, served under
`tools_alias`), `prompted` (no format at all), and `json_schema`, which llama-cpp-python refuses (a
500 naming `response_format`): the graph moves down its strategy chain and still answers.

About 2-4 s per task here on a quiet machine; the whole matrix stays under two minutes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from langchain_core.tools import StructuredTool
from langgraph.types import Command
from pydantic import BaseModel, Field

from keelgraph import CheckContext, Contract, build_graph, sqlite_checkpointer
from keelgraph.local.embedded import tools_alias
from keelgraph.runtime.models import chat_model
from keelgraph.settings import Settings
from keelgraph.tools import MemoryLedger, with_policy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

STRATEGIES: dict[str, tuple[bool, tuple[str, ...]]] = {
    # name: (ask the tool-calling alias, the graph's strategy chain)
    "json_object": (False, ("json_object",)),
    "tool_calling": (True, ("tool_calling",)),
    "prompted": (False, ("prompted",)),
    "json_schema": (False, ("json_schema", "json_object")),
}


def model(url: str, strategy: str) -> Any:
    settings = dataclasses.replace(Settings.from_env(), timeout_s=180.0, max_tokens=96, temperature=0.0)
    native, _ = STRATEGIES[strategy]
    return chat_model(settings, base_url=url, model=tools_alias(settings.model) if native else None)


def graph(url: str, strategy: str, contract: Any, tools: list[Any], tmp: Any) -> Any:
    return build_graph(
        contract,
        tools,
        model=model(url, strategy),
        strategy=STRATEGIES[strategy][1],
        checkpointer=sqlite_checkpointer(tmp / "threads.db"),
        effects=MemoryLedger(),
    )


class Text(BaseModel):
    text: str = Field(min_length=1, max_length=400)


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=60)
    age: int = Field(ge=0, le=150)


class Order(BaseModel):
    order_id: int


class Status(BaseModel):
    order_id: int
    status: str = Field(max_length=40)


class Done(BaseModel):
    reply: str = Field(min_length=1, max_length=300)


EXTRACT = Contract(input=Text, output=Person, instructions="Extract the person's name and age from the text.")
TEXT = {"text": "Ada Lovelace was 36 years old when she died."}


def order_status(order_id: int) -> str:
    return f"order {order_id}: shipped"


def same_status(answer: Status, ctx: CheckContext[Order]) -> str | None:
    return None if answer.status.strip().lower() == "shipped" else "status must be the tool's: shipped"


STATUS_TOOLS = [
    with_policy(
        StructuredTool.from_function(
            order_status, name="order_status", description="Look up an order's status"
        ),
        side_effect="read",
        from_input=("order_id",),
    )
]
LOOKUP = Contract(
    input=Order,
    output=Status,
    instructions="Look up the order's status with the tool and report it in one word.",
    checks=(same_status,),
    needs_tool=True,
    repair_budget=2,
)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_extraction(
    model_server: str, strategy: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keelgraph")
    result = graph(model_server, strategy, EXTRACT, [], tmp_path).invoke(
        {"request": TEXT}, {"configurable": {"thread_id": "x"}}
    )
    assert result["status"] == "ok", result["error"]
    assert "Ada" in result["output"]["name"] and result["output"]["age"] == 36
    if strategy == "json_schema":  # refused by this server: the next strategy of the chain answered
        assert "refused the json_schema output strategy" in caplog.text


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tool_call(model_server: str, strategy: str, tmp_path: Any) -> None:
    built = graph(model_server, strategy, LOOKUP, STATUS_TOOLS, tmp_path)
    cfg: Any = {"configurable": {"thread_id": "t"}}
    result = built.invoke({"request": {"order_id": 7}}, cfg)
    calls = [c for m in built.get_state(cfg).values["messages"] for c in getattr(m, "tool_calls", [])]
    assert calls and calls[0]["name"] == "order_status" and calls[0]["args"] == {"order_id": 7}  # tool first
    if strategy == "prompted" and result["status"] == "failed":
        # No grammar holds the 0.5B model here: after the tool's result it has written "pending"
        # for "shipped". That is refused, typed, never shipped; grammar strategies answer.
        assert result["error"]["type"] == "RepairExhausted"
        return
    assert result["status"] == "ok", result["error"]
    assert (
        result["output"] == {"order_id": 7, "status": "shipped"}
        or result["output"]["status"].lower() == "shipped"
    )
    assert result["stats"]["tool_calls"] >= 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_repair(model_server: str, strategy: str, tmp_path: Any) -> None:
    """A check that refuses the first answer, whatever it is: the repair round trip (correction
    prompt, repair format, second call) on each strategy, not the model's skill."""
    seen: list[Person] = []

    def not_the_first(answer: Person, ctx: CheckContext[Text]) -> str | None:
        seen.append(answer)
        return "give the person's full name (first name and surname)" if len(seen) == 1 else None

    contract = dataclasses.replace(EXTRACT, checks=(not_the_first,), repair_budget=2)
    result = graph(model_server, strategy, contract, [], tmp_path).invoke(
        {"request": TEXT}, {"configurable": {"thread_id": "r"}}
    )
    assert result["status"] == "ok", result["error"]
    assert result["stats"]["repairs"] >= 1 and len(seen) >= 2
    assert result["attempts"]  # what was repaired is reported


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_approval(model_server: str, strategy: str, tmp_path: Any) -> None:
    done: list[int] = []

    def cancel(order_id: int) -> str:
        done.append(order_id)
        return f"order {order_id} cancelled"

    tools = [
        with_policy(
            StructuredTool.from_function(cancel, name="cancel_order", description="Cancel an order"),
            side_effect="write",
            approval="always",
            from_input=("order_id",),
        )
    ]
    contract = Contract(
        input=Order,
        output=Done,
        instructions="Cancel the order with the tool, then confirm.",
        needs_tool=True,
    )
    built = graph(model_server, strategy, contract, tools, tmp_path)
    cfg: Any = {"configurable": {"thread_id": "a"}}
    paused = built.invoke({"request": {"order_id": 7}}, cfg)
    if strategy == "prompted" and paused.get("status") == "failed":
        # No grammar: the 0.5B has named a tool that does not exist (`confirm_work`) until the
        # repairs ran out. Refused typed, and nothing ran without a person's approval.
        assert paused["error"]["type"] == "RepairExhausted" and done == []
        return
    [pause] = paused["__interrupt__"]
    assert [c["name"] for c in pause.value["calls"]] == ["cancel_order"] and done == []
    result = built.invoke(Command(resume={"action": "approve"}), cfg)
    assert done == [7]  # the approved call ran, exactly once
    if strategy == "prompted" and result["status"] == "failed":
        # No grammar: after the result the 0.5B has named a tool that does not exist
        # (`confirm_work`) until the repairs ran out: refused typed, never shipped.
        assert result["error"]["type"] == "RepairExhausted"
        return
    assert result["status"] == "ok", result["error"]
