"""Tool integration: validated arguments, deadlines, side-effect classes, fenced results."""

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

__all__ = [
    "CallOutcome",
    "GuardContext",
    "SideEffect",
    "ToolPolicy",
    "fence",
    "policy_of",
    "run_tool_call",
    "with_policy",
]
