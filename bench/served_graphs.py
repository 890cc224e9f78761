"""Graphs for the serving load check (`bench/serve_load.py`), as `langgraph dev` loads them.

- `support`: keelgraph's main graph (order support: contract, preloaded tool, checks) with the
  scripted desk model, so the server and keelgraph's graph are measured, not a model.
- `plain`: what a user would serve with plain LangGraph: one node calling the same scripted model
  on a message list, no validation, no tools. The floor of the server itself.
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import START, MessagesState, StateGraph

from keelgraph.apps.support.desk import make_graph
from keelgraph.apps.support.scripted import scripted_desk

support = make_graph(model=scripted_desk(), checkpointer=None)

_MODEL = scripted_desk()


def _chat(state: MessagesState) -> dict[str, Any]:
    return {"messages": [_MODEL.invoke(state["messages"])]}


_builder = StateGraph(MessagesState)
_builder.add_node("chat", _chat)
_builder.add_edge(START, "chat")
plain = _builder.compile(name="plain")
