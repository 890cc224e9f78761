"""`keelgraph demo`: a short scripted session with the order-support assistant."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from keelgraph.settings import Settings
from keelgraph.tools.identity import IDENTITY_KEY

DEMO_USER = "ada"
"""Who the demo signs in as (customer 1, see `keelgraph.apps.support.desk.DEMO_USERS`)."""
SCRIPT: list[tuple[str, Any]] = [
    ("ask about an order", {"message": "Where is my order 1002?"}),
    (
        "follow-up that needs memory and a tool",
        {"message": "It arrived damaged, please open a ticket for it."},
    ),
    # Who the customer is comes from the sign-in, never from the request: naming one is refused.
    ("a bad request", {"customer_id": 2, "message": ""}),
]
_TOTALS = (
    "model_calls",
    "repairs",
    "recoveries",
    "tool_calls",
    "input_tokens",
    "output_tokens",
    "seconds",
)


def _show(title: str, request: Any, result: dict[str, Any]) -> None:
    print(f"\n--- {title}")
    print(f"request : {json.dumps(request)}")
    status = result.get("status")
    print(f"status  : {status}")
    if status == "ok":
        print("output  : " + json.dumps(result["output"], indent=2).replace("\n", "\n          "))
    else:
        error = result.get("error") or {}
        print(f"error   : {error.get('type')} ({error.get('code')})")
        for problem in error.get("problems", []):
            print(f"          - {problem['field']}: {problem['reason']}\n            fix: {problem['fix']}")
    stats = result.get("stats") or {}
    print("cost    : " + ", ".join(f"{k}={stats.get(k, 0)}" for k in _TOTALS))


def run_demo(thread_id: str | None = None) -> int:
    """Run the scripted session against the configured or embedded model; print outputs and totals."""
    from langgraph.types import Command

    from keelgraph.apps.support.desk import make_graph
    from keelgraph.runtime.models import default_model

    settings = Settings.from_env()
    started = time.perf_counter()
    where = "embedded llama.cpp server" if settings.embedded else settings.base_url
    print(f"keelgraph demo: order-support assistant, model {settings.model} ({where})")
    print(f"data directory: {settings.data_dir}")
    print(f"signed in as  : {DEMO_USER} (the desk acts for this user's customer)")
    default_model()  # start (or reuse) the model server before the clock of the first turn runs
    graph = make_graph()
    thread = thread_id or f"demo-{uuid.uuid4().hex[:8]}"
    config: Any = {"configurable": {"thread_id": thread, IDENTITY_KEY: DEMO_USER}}
    totals = dict.fromkeys(_TOTALS, 0.0)
    outcomes = []
    for title, request in SCRIPT:
        result = graph.invoke({"request": request}, config)
        for _ in range(3):  # each resume may reach another call that needs a person
            pauses = result.get("__interrupt__") or []
            if not pauses:
                break
            # The run waits for a person; the demo plays the operator (`keelgraph approve`).
            calls = pauses[0].value["calls"]
            for asked in calls:
                print(f"\n--- {title}: waiting for approval of {asked['name']} {json.dumps(asked['args'])}")
            print(f"approval: granted by the demo's operator (keelgraph approve --thread {thread})")
            resume = {asked["id"]: {"action": "approve"} for asked in calls}
            result = graph.invoke(Command(resume=resume), config)
        _show(title, request, result)
        outcomes.append(result.get("status"))
        for key in _TOTALS:
            totals[key] += float((result.get("stats") or {}).get(key, 0))
    from keelgraph.graphs.history import transcript

    # The whole conversation: earlier turns live in the thread's archive, the last one in its state.
    kept = len(transcript(graph.store, thread, graph.get_state(config).values.get("messages", [])))
    wall = time.perf_counter() - started
    print("\n=== summary")
    print(f"turns       : {len(SCRIPT)} ({', '.join(str(o) for o in outcomes)})")
    print(
        f"model calls : {int(totals['model_calls'])}    repairs: {int(totals['repairs'])}    "
        f"recoveries: {int(totals['recoveries'])}    tool calls: {int(totals['tool_calls'])}"
    )
    print(f"tokens      : {int(totals['input_tokens'])} in, {int(totals['output_tokens'])} out")
    print(f"seconds     : {totals['seconds']:.1f} in turns, {wall:.1f} wall (model start included)")
    print(f"thread      : {thread} ({kept} messages kept in {settings.data_dir / 'threads.db'})")
    print(f'continue it : keelgraph ask --user {DEMO_USER} --thread {thread} \'{{"message": "Thanks!"}}\'')
    defined = all(o in {"ok", "rejected", "failed"} for o in outcomes)
    return 0 if defined and outcomes[-1] == "rejected" else 1
