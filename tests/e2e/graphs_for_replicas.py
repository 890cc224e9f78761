"""Served test graphs for several replicas: an approval whose write tool can be slow and records each
effect in a file (a replica killed mid-tool must not lose or repeat it), and a slow graph that says
which requests its model was shown (runs on one thread from several replicas must all be kept)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.tools import StructuredTool
from pydantic import BaseModel

from keelgraph import Contract, build_graph, with_policy
from keelgraph.testing import ScriptedChatModel, answer, call

TOOL_SLEEP = "KEELGRAPH_TEST_TOOL_SLEEP_S"
"""Seconds the refund tool sleeps before its effect (set on one replica, to kill it mid-run)."""
MODEL_SLEEP = "KEELGRAPH_TEST_MODEL_SLEEP_S"
"""Seconds each model step of `slow_memory` takes (so runs on one thread overlap)."""
EFFECTS = "KEELGRAPH_TEST_EFFECTS"
"""A file that gets one line per refund actually made."""


class Ask(BaseModel):
    order_id: int


class Done(BaseModel):
    reply: str


def refund(order_id: int, amount: float) -> str:
    """Refund an amount on an order."""
    time.sleep(float(os.environ.get(TOOL_SLEEP, "0")))
    with Path(os.environ[EFFECTS]).open("a") as effects:
        effects.write(f"refund {order_id} {amount:.2f} pid={os.getpid()}\n")
    return f"refunded {amount:.2f} on order {order_id}"


def _refund_then_answer(messages: list[BaseMessage]) -> dict[str, Any]:
    if isinstance(messages[-1], HumanMessage) and "Data from refund" in str(messages[-1].content):
        return answer(reply="refund done")
    return call("refund", amount=30)


approval = build_graph(
    Contract(input=Ask, output=Done, instructions="Handle refunds."),
    [
        with_policy(
            StructuredTool.from_function(refund, name="refund"),
            side_effect="write",
            approval="always",
            from_input=("order_id",),
        )
    ],
    model=ScriptedChatModel([_refund_then_answer], repeat_last=True),
    strategy="json_object",
    checkpointer=None,
    name="approval",
)


def _slow_recount(messages: list[BaseMessage]) -> dict[str, Any]:
    time.sleep(float(os.environ.get(MODEL_SLEEP, "0")))
    asked = [str(m.content) for m in messages if isinstance(m, HumanMessage) and "order_id" in str(m.content)]
    return answer(reply=f"shown {len(asked)} requests: {' | '.join(asked)}")


slow_memory = build_graph(
    Contract(input=Ask, output=Done, instructions="Say what you were asked."),
    model=ScriptedChatModel([_slow_recount], repeat_last=True),
    strategy="json_object",
    checkpointer=None,
    name="slow_memory",
)
"""Answers with the requests its model was shown, after `KEELGRAPH_TEST_MODEL_SLEEP_S`."""
