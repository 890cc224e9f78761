"""Tool integration: validated arguments, deadlines, side-effect classes, fenced results."""

if __name__ != "keelgraph.tools":  # run from the repository root, the folder would import as a second package
    raise ImportError(
        f"import keelgraph.tools, not {__name__}: the tools/ folder is part of the keelgraph package "
        "(install it with `bash .ci/setup` or `pip install -e .`), and a second copy under another "
        "name would define its own classes that keelgraph's code does not catch"
    )

from keelgraph.tools.execution import (
    CallOutcome,
    GuardContext,
    SideEffect,
    ToolPolicy,
    fence,
    policy_of,
    run_tool_call,
    with_policy,
)
from keelgraph.tools.http import http_tool
from keelgraph.tools.identity import Identity, IdentityRequired
from keelgraph.tools.ledger import EffectLedger, MemoryLedger, SqliteLedger, effect_key
from keelgraph.tools.sql import sql_tools
from keelgraph.tools.workflow import WorkflowRunner, workflow_tools

__all__ = [
    "CallOutcome",
    "EffectLedger",
    "GuardContext",
    "Identity",
    "IdentityRequired",
    "MemoryLedger",
    "SideEffect",
    "SqliteLedger",
    "ToolPolicy",
    "WorkflowRunner",
    "effect_key",
    "fence",
    "http_tool",
    "policy_of",
    "run_tool_call",
    "sql_tools",
    "with_policy",
    "workflow_tools",
]
