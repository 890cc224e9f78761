"""Served test graphs: one whose model always breaks the contract (RepairExhausted over HTTP, as
data), one whose write tool needs a person's approval (interrupt and resume over HTTP), one that
says which requests its model was shown (memory across runs), the main graph with its scripted
model (deterministic and instant: auth, restarts, load), and one whose turn has a tool call, an
approval and a repair (its phases streamed as custom events)."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.tools import StructuredTool
from pydantic import BaseModel, Field

from keelgraph import Contract, build_graph, with_policy
from keelgraph.apps.support.desk import make_graph
from keelgraph.apps.support.scripted import scripted_desk
from keelgraph.testing import ScriptedChatModel, answer, call


class Sum(BaseModel):
    a: int
    b: int


class Total(BaseModel):
    total: int = Field(ge=0)


failing = build_graph(
    Contract(input=Sum, output=Total, instructions="Add a and b.", repair_budget=3),
    model=ScriptedChatModel([answer(total=-1)], repeat_last=True),
    checkpointer=None,
    name="failing",
)


class Ask(BaseModel):
    order_id: int


class Done(BaseModel):
    reply: str


def refund(order_id: int, amount: float) -> str:
    """Refund an amount on an order."""
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


def _recount(messages: list[BaseMessage]) -> dict[str, Any]:
    asked = [str(m.content) for m in messages if isinstance(m, HumanMessage) and "order_id" in str(m.content)]
    return answer(reply=f"shown {len(asked)} requests: {' | '.join(asked)}")


memory = build_graph(
    Contract(input=Ask, output=Done, instructions="Say what you were asked."),
    model=ScriptedChatModel([_recount], repeat_last=True),
    strategy="json_object",
    checkpointer=None,
    name="memory",
)
"""Answers with the requests its model was shown: earlier turns come back from the server's store."""


support_scripted = make_graph(model=scripted_desk(), checkpointer=None)
"""The main graph (order support) with the scripted desk model instead of the embedded model."""


def lookup(order_id: int) -> str:
    """Look up an order."""
    return f"order {order_id}: 2 mugs, 30.00 EUR"


def _says_what_was_refunded(out: Done, ctx: Any) -> str | None:
    return None if "refunded" in out.reply else "reply must say what was refunded"


def _stream_script(messages: list[BaseMessage]) -> dict[str, Any]:
    last = str(messages[-1].content)
    if "was rejected" in last:
        return answer(reply="refunded 30.00 on the order")
    if "Data from refund" in last:
        return answer(reply="all done")  # fails the check once: a repair
    if "Data from lookup" in last:
        return call("refund", amount=30)
    return call("lookup")


streaming = build_graph(
    Contract(input=Ask, output=Done, instructions="Handle refunds.", checks=[_says_what_was_refunded]),
    [
        with_policy(StructuredTool.from_function(lookup, name="lookup"), from_input=("order_id",)),
        with_policy(
            StructuredTool.from_function(refund, name="refund"),
            side_effect="write",
            approval="always",
            from_input=("order_id",),
        ),
    ],
    model=ScriptedChatModel([_stream_script], repeat_last=True),
    strategy="json_object",
    checkpointer=None,
    name="streaming",
)
"""A turn with a tool call, an approval and a repair: its phases streamed as custom events."""
