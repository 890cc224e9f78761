"""Property tests of the two boundaries: whatever a caller sends and whatever a model writes, a
turn ends in a defined, typed state, within the call ceiling, and the thread keeps what was sent."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import BaseModel, Field

from keelgraph import Contract, InputRejected, RepairExhausted, build_graph, unwrap
from keelgraph.graphs.persistence import StorableSerializer
from keelgraph.testing import ScriptedChatModel, answer, call


class Order(BaseModel):
    customer_id: int = Field(ge=1)
    note: str = Field(min_length=1, max_length=200)
    tags: list[str] = Field(default_factory=list, max_length=3)


class Reply(BaseModel):
    text: str = Field(min_length=1)
    amount: float = Field(ge=0)


CONTRACT = Contract(
    input=Order, output=Reply, instructions="Reply.", repair_budget=2, max_request_chars=2_000
)
CEILING = 2 + 0 + CONTRACT.repair_budget

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
requests = (
    json_values
    | st.fixed_dictionaries(
        {"customer_id": json_values | st.integers(), "note": json_values | st.text(max_size=300)},
        optional={"tags": json_values, "extra": json_values},
    )
    | st.text(max_size=2_500)
    | st.binary(max_size=64)
)
model_replies = st.one_of(
    st.text(max_size=120),
    json_values,
    st.builds(lambda t, a: answer(text=t, amount=a), st.text(max_size=20), json_values),
    st.builds(lambda n: call(n, x=1), st.text(min_size=1, max_size=10)),
)


def _graph(script: list[Any]) -> tuple[Any, ScriptedChatModel]:
    model = ScriptedChatModel(script, repeat_last=True)
    saver = InMemorySaver(serde=StorableSerializer())  # the serializer keelgraph's SQLite default uses
    return build_graph(CONTRACT, model=model, checkpointer=saver, strategy="json_object"), model


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests)
def test_any_request_ends_typed_and_is_kept(request: Any) -> None:
    graph, model = _graph([answer(text="ok", amount=1)])
    config: Any = {"configurable": {"thread_id": "fuzz"}}
    result = graph.invoke({"request": request}, config)
    assert result["status"] in {"ok", "rejected"}
    state = graph.get_state(config).values
    assert state["status"] == result["status"]
    if result["status"] == "rejected":
        assert model.calls == []  # a bad request never reaches the model
        try:
            unwrap(result, Reply)
        except InputRejected as error:
            assert error.problems and all(p.field and p.reason and p.fix for p in error.problems)
        kept = state["messages"][-1]
        assert kept.additional_kwargs["keelgraph"] == "rejected" and isinstance(kept.content, str)
    else:
        assert unwrap(result, Reply).text == "ok"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(model_replies, min_size=1, max_size=6))
def test_any_model_output_ends_typed_within_the_ceiling(script: list[Any]) -> None:
    graph, model = _graph(script)
    config: Any = {"configurable": {"thread_id": "fuzz"}}
    result = graph.invoke({"request": {"customer_id": 1, "note": "hi"}}, config)
    assert len(model.calls) <= CEILING
    assert result["status"] in {"ok", "failed"}
    assert graph.get_state(config).values["status"] == result["status"]
    if result["status"] == "ok":
        Reply.model_validate(result["output"])
    else:
        try:
            unwrap(result, Reply)
        except RepairExhausted as error:
            assert error.attempts and error.usage["model_calls"] == len(model.calls)
            assert all(a.raw is not None and a.problems for a in error.attempts)
            json.dumps(result["error"])  # plain data all the way down
