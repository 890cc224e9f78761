"""State and memory: the graph, its state schemas, and persistence."""

from keelgraph.graphs.builder import TRANSIENT_ERRORS, build_graph, graph_builder, infer_strategy
from keelgraph.graphs.nodes import AgentSpec
from keelgraph.graphs.persistence import sqlite_checkpointer
from keelgraph.graphs.state import Context, InputState, OutputState, State, Stats

__all__ = [
    "TRANSIENT_ERRORS",
    "AgentSpec",
    "Context",
    "InputState",
    "OutputState",
    "State",
    "Stats",
    "build_graph",
    "graph_builder",
    "infer_strategy",
    "sqlite_checkpointer",
]
