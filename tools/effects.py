"""Exactly-once effects: a `write`/`external` call runs at most once per idempotency key."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from langchain_core.tools import BaseTool

from keelgraph.contracts.suspend import Steps, drive
from keelgraph.tools.execution import CallOutcome, calling, fence, policy_of
from keelgraph.tools.gate import TurnFacts
from keelgraph.tools.ledger import EffectLedger, default_key

__all__ = ["ALREADY_DONE", "CUT_OFF", "calling_once", "done_before", "effect_key", "run_once"]

_log = logging.getLogger("keelgraph")

ALREADY_DONE = "(This was done earlier; it was not done again.)"
"""Appended to a replayed result, so the model does not tell the user it happened twice."""
CUT_OFF = (
    "an earlier {tool} call like this one was cut off before it reported back, so whether it took "
    "effect is unknown; it was not repeated"
)
CUT_OFF_FIX = "tell the user the outcome must be checked"


def effect_key(tool: BaseTool, args: Mapping[str, Any], facts: TurnFacts) -> str:
    """The call's idempotency key: the policy's own, or one per (thread, turn, tool, arguments)."""
    policy = policy_of(tool)
    if policy.idempotency_key is not None:
        return policy.idempotency_key(args, facts.guard())
    return default_key(facts.thread_id, facts.turn_id, tool.name, args)


def done_before(
    tool: BaseTool, args: Mapping[str, Any], facts: TurnFacts, ledger: EffectLedger | None
) -> bool:
    """Whether the ledger already holds this call as done (it will be replayed, not run)."""
    if policy_of(tool).side_effect == "read" or ledger is None:
        return False
    found = ledger.lookup(effect_key(tool, args, facts))
    return found is not None and found.status == "done"


def run_once(
    tool: BaseTool, call_id: str, args: dict[str, Any], facts: TurnFacts, ledger: EffectLedger
) -> CallOutcome:
    """Run a side-effecting call at most once per idempotency key (see `keelgraph.tools.ledger`).

    A call done before is replayed from the ledger; one that was started but never reported back
    is not repeated unless the tool is `idempotent`; a call refused or raising forgets its record
    (nothing happened); a timeout keeps it `started` (the abandoned call may still take effect).
    `calling_once` is the same as steps, for async runs.
    """
    return drive(calling_once(tool, call_id, args, facts, ledger))


def calling_once(
    tool: BaseTool, call_id: str, args: dict[str, Any], facts: TurnFacts, ledger: EffectLedger
) -> Steps[CallOutcome]:
    """`run_once` as steps (`keelgraph.contracts.suspend`)."""
    policy = policy_of(tool)
    key = effect_key(tool, args, facts)
    found = ledger.lookup(key)
    if found is not None and found.status == "done":
        _log.info("keelgraph: %s already done under key %s; replaying its result", tool.name, key)
        shown = policy.present(found.output) if policy.present else found.output
        content = fence(tool.name, shown, policy.max_output_chars)
        return CallOutcome(
            call_id, tool.name, args, ok=True, content=f"{content}\n{ALREADY_DONE}", output=found.output
        )
    if found is not None and not policy.idempotent:
        reason = CUT_OFF.format(tool=tool.name)
        return CallOutcome.failed(call_id, tool.name, args, kind="tool_error", reason=reason, fix=CUT_OFF_FIX)
    ledger.begin(key, tool.name, args, facts.thread_id)
    outcome = yield from calling(tool, call_id, args, effect_key=key)
    if outcome.ok:
        ledger.finish(key, outcome.output)
    elif outcome.kind in {"tool_args", "tool_error"}:
        ledger.forget(key)
    return outcome
