"""A long-lived process running keelgraph's main graph on PostgreSQL, driven line by line on stdin.

Each input line is JSON: {"op": "ask", "thread": T, "request": {...}}, {"op": "resume", "thread": T,
"decision": {...}} or {"op": "state", "thread": T}. Each answer is one JSON line on stdout. Used by
tests/e2e/test_postgres_two_process.py to run one thread across two separate processes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from langgraph.types import Command

from keelgraph.apps.support.desk import make_graph
from keelgraph.apps.support.scripted import scripted_desk
from keelgraph.graphs.persistence import checkpointer
from keelgraph.tools.identity import IDENTITY_KEY


def _answer(result: dict[str, Any]) -> dict[str, Any]:
    pending = result.get("__interrupt__") or []
    return {
        "pid": os.getpid(),
        "status": result.get("status"),
        "output": result.get("output"),
        "waiting_for": [c["name"] for p in pending for c in p.value["calls"]],
    }


def main() -> None:
    url = sys.argv[1]
    with checkpointer(url) as saver:
        graph = make_graph(model=scripted_desk(), checkpointer=saver)
        print(json.dumps({"ready": os.getpid()}), flush=True)
        for line in sys.stdin:
            order = json.loads(line)
            # Signed in as the demo's customer 1 (`keelgraph.apps.support.desk.DEMO_USERS`).
            config = {"configurable": {"thread_id": order["thread"], IDENTITY_KEY: "ada"}}
            if order["op"] == "ask":
                reply = _answer(graph.invoke({"request": order["request"]}, config))
            elif order["op"] == "resume":
                reply = _answer(graph.invoke(Command(resume=order["decision"]), config))
            else:
                snapshot = graph.get_state(config)
                reply = {
                    "pid": os.getpid(),
                    "next": list(snapshot.next),
                    "status": snapshot.values.get("status"),
                    "output": snapshot.values.get("output"),
                    "requests": [
                        str(m.content) for m in snapshot.values.get("messages", []) if m.type == "human"
                    ],
                }
            print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
