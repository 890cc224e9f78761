"""The `approve` node: a person's decision on every tool call whose policy asks for one."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage
from langgraph.errors import GraphInterrupt
from langgraph.types import interrupt

from keelgraph.graphs.events import ApprovalCall, Decided, DecisionData, WaitingForApproval, emit
from keelgraph.graphs.identity import current_identity, with_identity
from keelgraph.graphs.spec import AgentSpec
from keelgraph.graphs.state import State
from keelgraph.graphs.turn import turn_facts, with_history
from keelgraph.tools.effects import done_before
from keelgraph.tools.execution import policy_of
from keelgraph.tools.gate import (
    APPROVAL_HOW,
    bind_identity,
    call_key,
    doubt,
    final_args,
    needs_person,
    read_decisions,
)

__all__ = ["approve", "awaiting_approval"]


def awaiting_approval(state: State, spec: AgentSpec, step: AIMessage) -> list[dict[str, Any]]:
    """The calls of `step` that a person must approve, with their final arguments (see
    `keelgraph.tools.gate.needs_person`). A call put to a person because the gate doubts it (a
    `from_user` value read from tool data, a tool outside the turn's scope) carries the reason as
    `doubt`, so the person knows what to check. `state` is the turn with its history."""
    facts = with_identity(turn_facts(state))
    waiting = []
    for call in step.tool_calls:
        tool = spec.tools.get(call["name"])
        if tool is None or policy_of(tool).approval == "never":
            continue
        call_id = str(call["id"])
        args = final_args(tool, call["args"], facts.request, facts.identity)
        done = done_before(tool, args, facts, spec.ledger_for(tool))
        enforce = spec.refuse_tainted_writes
        if needs_person(tool, call_id, args, facts, done_before=done, enforce_from_user=enforce):
            asked = {"id": call["id"], "name": call["name"], "args": args}
            why = doubt(tool, call_id, args, facts) if enforce else None
            waiting.append({**asked, "doubt": why} if why else asked)
    return waiting


def _waiting(asked: list[dict[str, Any]], problem: str | None) -> WaitingForApproval:
    calls: list[ApprovalCall] = []
    for c in asked:
        call = ApprovalCall(id=str(c["id"]), name=str(c["name"]), args=dict(c["args"]))
        if c.get("doubt"):
            call["doubt"] = str(c["doubt"])
        calls.append(call)
    return WaitingForApproval(keelgraph="phase", phase="waiting_for_approval", calls=calls, problem=problem)


def _decided(decisions: dict[str, dict[str, Any]]) -> Decided:
    found = [
        DecisionData(id=str(cid), name=str(d.get("name", "")), action=str(d["action"]))
        for cid, d in decisions.items()
    ]
    return Decided(keelgraph="phase", phase="decided", decisions=found)


def approve(state: State, *, spec: AgentSpec) -> dict[str, Any]:
    """Pause for a person's decision on every call that needs approval (LangGraph `interrupt`).

    A call identical to one a person rejected earlier in the thread is rejected again without
    asking. Edited arguments replace the model's in the thread, and `act` checks them again
    (schema, choices, guard) before anything runs.
    """
    state = with_history(state, spec)
    step = state["messages"][-1]
    assert isinstance(step, AIMessage)
    refused = {call_key(r["name"], r["args"]): r for r in state.get("rejected_calls", [])}
    decisions: dict[str, dict[str, Any]] = {}
    asked = []
    for call in awaiting_approval(state, spec, step):
        earlier = refused.get(call_key(call["name"], call["args"]))
        if earlier is not None:
            decisions[call["id"]] = {**earlier, "action": "reject", "again": True}
        else:
            asked.append(call)
    problem = None
    decided: dict[str, dict[str, Any]] = {}
    while asked:  # each pass is one interrupt; a resume value that cannot be read is asked again
        try:
            value = interrupt({"type": "approval", "calls": asked, "problem": problem, "how": APPROVAL_HOW})
        except GraphInterrupt:  # the run pauses now (on resume `interrupt` returns the person's answer)
            emit(_waiting(asked, problem))
            raise
        try:
            decided = read_decisions(value, asked)
            for call in asked:  # what the gate doubted stays with the decision (see `act`)
                if call.get("doubt"):
                    decided[str(call["id"])]["doubt"] = call["doubt"]
            break
        except ValueError as exc:
            problem = str(exc)
    identity = current_identity()
    for decision in decided.values():  # an edit cannot move an argument bound to the signed-in user
        decision["args"] = {**decision["args"], **bind_identity(spec.tools[decision["name"]], identity)}
    decisions.update(decided)
    if decisions:
        emit(_decided(decisions))
    edited = {cid: d["args"] for cid, d in decisions.items() if d["action"] == "edit"}
    update: dict[str, Any] = {
        "approvals": {**state.get("approvals", {}), **decisions},
        "awaiting_approval": [],
    }
    if edited:
        calls = [{**c, "args": edited.get(str(c["id"]), c["args"])} for c in step.tool_calls]
        update["messages"] = [step.model_copy(update={"tool_calls": calls})]
    return update
