"""A served graph whose model always breaks the contract: RepairExhausted over HTTP, as data."""

from __future__ import annotations

from pydantic import BaseModel, Field

from keelgraph import Contract, build_graph
from keelgraph.testing import ScriptedChatModel, answer


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
