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
from keelgraph.tools.http import http_tool
from keelgraph.tools.ledger import EffectLedger, MemoryLedger, SqliteLedger, effect_key
from keelgraph.tools.sql import sql_tools
from keelgraph.tools.workflow import WorkflowRunner, workflow_tools

__all__ = [
    "CallOutcome",
    "EffectLedger",
    "GuardContext",
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
