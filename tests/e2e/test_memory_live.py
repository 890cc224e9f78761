"""The main job with the real model: a preference stated in one thread shapes the answer in another."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from keelgraph import sqlite_checkpointer
from keelgraph.apps.support.desk import make_graph
from keelgraph.graphs.memory import memories, memory_available
from keelgraph.graphs.persistence import store

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not memory_available(), reason="the memory extra is missing: run `bash .ci/setup`"),
]


def test_a_preference_from_one_thread_is_used_in_another(
    tmp_path: Path, model_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEELGRAPH_BASE_URL", model_server)
    monkeypatch.setenv("KEELGRAPH_MODEL", "qwen2.5-coder-0.5b-instruct")
    monkeypatch.setenv("KEELGRAPH_OUTPUT_STRATEGY", "json_object")
    with store(tmp_path / "store.db", index="auto") as kept:
        graph = make_graph(
            tmp_path / "shop.db", checkpointer=sqlite_checkpointer(tmp_path / "threads.db"), memory=kept
        )
        stated: Any = {"message": "Please always contact me by email, not phone."}
        first = graph.invoke(
            {"request": stated}, {"configurable": {"thread_id": "live-a", "keelgraph_user": "ada"}}
        )
        assert first["status"] == "ok", first.get("error")
        assert [m.text for m in memories(kept, 1)] == [stated["message"]]
        asked: Any = {"message": "How will you let me know when order 1002 arrives?"}
        second = graph.invoke(
            {"request": asked}, {"configurable": {"thread_id": "live-b", "keelgraph_user": "ada"}}
        )
        assert second["status"] == "ok", second.get("error")
        reply = second["output"]["reply"]
        assert re.search(r"e-?mail", reply, re.IGNORECASE), reply  # the other thread's preference, used
        assert second["stats"]["model_calls"] <= 4
