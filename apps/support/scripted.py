"""A scripted stand-in for the desk's model, for load tests and served tests of the main graph."""

from __future__ import annotations

import json
import re
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage

from keelgraph.apps.support.desk import reports_problem
from keelgraph.testing import ScriptedChatModel

__all__ = ["scripted_desk"]


def _last_request(messages: list[BaseMessage]) -> dict[str, Any]:
    """The latest customer request the model was shown (`{"message": ...}`), or {}."""
    for message in reversed(messages):
        text = str(message.content)
        if not isinstance(message, HumanMessage) or "{" not in text:
            continue
        try:
            found = json.loads(text[text.index("{") :])
        except ValueError:
            continue
        if isinstance(found, dict) and isinstance(found.get("message"), str):
            return found
    return {}


def _desk_step(messages: list[BaseMessage]) -> dict[str, Any]:
    last = str(messages[-1].content)
    if "open_ticket" in last:  # its result, or the reason it did not run
        found = re.search(r'"order_id":\s*(\d+)', last)
        order = found.group(1) if found else "your order"
        return {"action": "final_answer", "answer": {"reply": f"I have passed order {order} to our team."}}
    request = _last_request(messages)
    order = re.search(r"\b(\d{4,})\b", str(request.get("message", "")))
    if order and reports_problem(request):
        args = {  # no customer_id: the desk binds it to the signed-in user, the model is not asked
            "order_id": int(order.group(1)),
            "kind": "damaged",
            "note": str(request["message"])[:500],
        }
        return {"action": "open_ticket", "args": args}
    return {
        "action": "final_answer",
        "answer": {"reply": "Thank you for your message. Your orders are listed in your account."},
    }


def scripted_desk() -> ScriptedChatModel:
    """A scripted stand-in for the desk's model: deterministic, instant, and valid for its contract.

    A message that reports a problem with a named order gets `open_ticket` (which waits for
    approval), then a reply; any other message gets a plain reply. For load tests and served tests
    of the main graph that must not depend on a real model's speed or whims.
    """
    return ScriptedChatModel([_desk_step], repeat_last=True)
