"""Graphs that are not the demo, for the CLI tests: `keelgraph ask --graph tests.cli_graphs:notes`.

Each factory builds a keelgraph graph on the scripted model. The scripts read the conversation
rather than count calls, so `ask` and a later `approve` (each loading the graph anew, as separate
processes do) continue one thread.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from langchain_core.messages import AnyMessage
from langchain_core.tools import StructuredTool
from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from keelgraph import Contract, build_graph, graph_builder
from keelgraph.testing import ScriptedChatModel, answer, call
from keelgraph.tools import with_policy


class Note(BaseModel):
    text: str = Field(min_length=1, max_length=200)


class Saved(BaseModel):
    reply: str
    note_id: int | None = None


class Trip(BaseModel):
    city: str = Field(min_length=1)
    days: int = Field(ge=1, le=30)


class Plan(BaseModel):
    city: str
    days: int


SAVED: list[str] = []
"""What `save_note` wrote (the tool's side effect), in this process."""


def save_note(text: str) -> dict[str, Any]:
    SAVED.append(text)
    return {"note_id": len(SAVED)}


def _notes_step(messages: list[AnyMessage]) -> dict[str, Any]:
    """Save the note when asked to ("save ..."), then say so; answer anything else directly."""
    last = str(messages[-1].content)
    data = last.partition("\n")[2]
    if last.startswith("Data from save_note") and data.startswith("{"):
        note_id = json.loads(data)["note_id"]
        return answer(reply=f"saved as note {note_id}", note_id=note_id)
    if not last.startswith("{"):  # a rejected call, or data from another tool
        return answer(reply="not saved")
    text = json.loads(last)["text"]
    if text.lower().startswith("save "):
        return call("save_note", text=text[5:])
    return answer(reply=f"you wrote: {text}")


def _notes_tools() -> list[Any]:
    tool = StructuredTool.from_function(save_note, name="save_note", description="Save a note")
    return [with_policy(tool, side_effect="write", approval="always")]


NOTES = Contract(input=Note, output=Saved, instructions="Keep notes.", repair_budget=0)


def notes() -> Any:
    """A note keeper whose one write tool waits for a person; threads in the default checkpointer."""
    return build_graph(
        NOTES,
        _notes_tools(),
        model=ScriptedChatModel([_notes_step], repeat_last=True),
        strategy="json_object",
    )


def notes_builder() -> Any:
    """The same flow, uncompiled (`graph_builder`): the CLI compiles it with the default checkpointer."""
    return graph_builder(
        NOTES,
        _notes_tools(),
        model=ScriptedChatModel([_notes_step], repeat_last=True),
        strategy="json_object",
    )


def notes_served() -> Any:
    """Compiled without a checkpointer, as langgraph.json's graphs are: the CLI gives it the default one."""
    return build_graph(
        NOTES,
        _notes_tools(),
        model=ScriptedChatModel([_notes_step], repeat_last=True),
        checkpointer=None,
        strategy="json_object",
    )


def _plan_step(messages: list[AnyMessage]) -> dict[str, Any]:
    request = json.loads(str(messages[-1].content))
    return answer(city=request["city"], days=request["days"])


def trips(instructions: str | None = None) -> Any:
    """A structured input contract (two fields): requests go in with `--input JSON`."""
    contract = Contract(input=Trip, output=Plan, instructions=instructions or "Plan a trip.", repair_budget=0)
    return build_graph(
        contract, model=ScriptedChatModel([_plan_step], repeat_last=True), strategy="json_object"
    )


def broken() -> Any:
    """Its model never writes JSON and it has no repairs: every turn ends in a typed failure."""
    return build_graph(NOTES, model=ScriptedChatModel(["not json"], repeat_last=True), strategy="json_object")


BUSY_CODES: list[int] = []
"""Exit codes of the `ask` that `busy` sends on its own thread while its turn holds it."""


def _busy_step(messages: list[AnyMessage]) -> dict[str, Any]:
    from keelgraph.commands.cli import main

    # Another "process" asks on the same thread while this turn holds it (a thread of its own, so
    # that LangGraph does not take the second run for a subgraph of this one).
    other = threading.Thread(
        target=lambda: BUSY_CODES.append(
            main(["ask", "--graph", "tests.cli_graphs:notes", "--thread", "b", "x"])
        )
    )
    other.start()
    other.join()
    return answer(reply="done")


def busy() -> Any:
    """A turn that, while it runs, sends a second turn to its thread (which is refused: busy)."""
    return build_graph(NOTES, model=ScriptedChatModel([_busy_step]), strategy="json_object")


def not_a_graph() -> Any:
    return {"nodes": []}


class _Plain(TypedDict):
    text: str


def plain_langgraph() -> Any:
    """A LangGraph graph, but not a keelgraph one (no `request` in its input)."""
    builder = StateGraph(_Plain)
    builder.add_node("echo", lambda state: state)
    builder.add_edge(START, "echo")
    builder.add_edge("echo", END)
    return builder.compile()


def needs_arguments(model: Any) -> Any:
    return build_graph(NOTES, model=model)
