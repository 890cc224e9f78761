"""The signed-in user of the running graph, as every node and the tool gate read it.

Not part of the run's `Context`: a served run's context comes from the request body, which any
client writes, while its identity is what the server authenticated (see `keelgraph.tools.identity`).
"""

from __future__ import annotations

import dataclasses

from langgraph.config import get_config

from keelgraph.tools.gate import TurnFacts
from keelgraph.tools.identity import Identity, identity_from_config

__all__ = ["current_identity", "with_identity"]


def current_identity() -> Identity | None:
    """The running graph's signed-in user: the server's authenticated user in a served run, the
    `keelgraph_user` of the run's config in process, else None (also outside a graph run).

    >>> current_identity() is None  # outside a run
    True
    """
    try:
        config = get_config()
    except RuntimeError:  # called outside a runnable context
        return None
    return identity_from_config(config)


def with_identity(facts: TurnFacts) -> TurnFacts:
    """`facts` with the run's identity, for the tool gate's `from_identity` arguments."""
    if facts.identity is not None:
        return facts
    return dataclasses.replace(facts, identity=current_identity())
