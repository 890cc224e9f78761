"""Graphs as LangGraph server loads them (see langgraph.json): compiled without a checkpointer."""

from keelgraph.apps.support.desk import make_graph

support = make_graph(checkpointer=None)
"""The order-support assistant; the server supplies persistence."""
