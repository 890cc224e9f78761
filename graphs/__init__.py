"""State and memory: the graph, its state schemas, and persistence."""

if (
    __name__ != "keelgraph.graphs"
):  # run from the repository root, the folder would import as a second package
    raise ImportError(
        f"import keelgraph.graphs, not {__name__}: the graphs/ folder is part of the keelgraph package "
        "(install it with `bash .ci/setup` or `pip install -e .`), and a second copy under another "
        "name would define its own classes that keelgraph's code does not catch"
    )

from keelgraph.graphs.builder import (
    DEFAULTS,
    TRANSIENT_ERRORS,
    GraphOptions,
    build_graph,
    graph_builder,
    infer_strategy,
)
from keelgraph.graphs.persistence import sqlite_checkpointer
from keelgraph.graphs.spec import AgentSpec
from keelgraph.graphs.state import Context, InputState, OutputState, State, Stats

__all__ = [
    "DEFAULTS",
    "TRANSIENT_ERRORS",
    "AgentSpec",
    "Context",
    "GraphOptions",
    "InputState",
    "OutputState",
    "State",
    "Stats",
    "build_graph",
    "graph_builder",
    "infer_strategy",
    "sqlite_checkpointer",
]
