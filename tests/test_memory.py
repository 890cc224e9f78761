"""Long-term memory: the offline embedding model, vector-indexed stores on every backend, the API,
and the main job remembering a customer's preference in one thread and using it in another."""

from __future__ import annotations

import asyncio
import doctest
import importlib.util
import re
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.store.base import BaseStore
from langgraph.store.memory import InMemoryStore

from keelgraph import UserError, sqlite_checkpointer
from keelgraph.apps.support.desk import make_graph, stated_preferences
from keelgraph.graphs import memory
from keelgraph.graphs.memory import (
    MemoryUnavailable,
    embedder,
    forget,
    index_config,
    memories,
    memory_available,
    memory_namespace,
    recall,
    remember,
    vector_connect,
)
from keelgraph.graphs.persistence import async_store, store
from keelgraph.settings import install_hint
from keelgraph.testing import ScriptedChatModel, answer

pytestmark = pytest.mark.skipif(
    not memory_available(), reason="the memory extra or its model is missing: run `bash .ci/setup`"
)

FACTS = [
    "Please always contact me by email, never call",
    "I prefer DHL for deliveries",
    "My shirt size is M",
    "I am vegetarian",
    "I live in Berlin",
]


@pytest.fixture(scope="module", autouse=True)
def _model() -> None:
    embedder()  # loaded once for the module (about 0.1 s), shared by every test


@pytest.fixture(params=["sqlite", "unindexed", pytest.param("postgres", marks=pytest.mark.e2e)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BaseStore]:
    """A SQLite store with its sqlite-vec index, a store without an index (vectors kept in the items),
    and PostgreSQL (the server has no pgvector here: ranked in Python)."""
    if request.param == "unindexed":
        yield InMemoryStore()
        return
    target = (
        str(tmp_path / "store.db") if request.param == "sqlite" else request.getfixturevalue("postgres_db")
    )
    with store(target, index="auto") as opened:
        yield opened


def test_embeddings_match_sentence_transformers() -> None:
    # Reference: sentence-transformers 6.2 on torch 2.13 (CPU), model.encode(..., normalize_embeddings=True).
    vectors = embedder().embed(
        [
            "Please always contact me by email, not phone",
            "how does the customer want to be reached?",
            "I prefer DHL for deliveries",
            "Ünïcödé café naïve — 日本語",
            "A" * 3000,  # past 256 tokens: cut as sentence-transformers cuts
            "",
        ]
    )
    assert vectors.shape == (6, 384)
    assert vectors[0][:4].tolist() == pytest.approx([-0.089328, -0.03495, 0.082542, 0.020147], abs=1e-5)
    assert vectors[3][:3].tolist() == pytest.approx([-0.01266, -0.017322, 0.046663], abs=1e-5)
    assert float(vectors[0] @ vectors[1]) == pytest.approx(0.206445, abs=1e-5)
    assert float(vectors[0] @ vectors[2]) == pytest.approx(0.097777, abs=1e-5)
    assert (abs((vectors**2).sum(1) - 1) < 1e-5).all()
    assert embedder().embed([]).shape == (0, 384)
    assert embedder() is embedder()  # one model per process


def test_paraphrased_questions_find_the_right_memory_first(backend: BaseStore) -> None:
    for fact in FACTS:
        remember(backend, "ada", fact)
    questions = {
        "How should we get in touch with this customer?": FACTS[0],
        "What is the preferred way to contact you?": FACTS[0],
        "Which shipping carrier does the customer like?": FACTS[1],
        "send a parcel": FACTS[1],
        "What clothing size should we send?": FACTS[2],
        "Does the customer eat meat?": FACTS[3],
        "What is the customer's home town?": FACTS[4],
    }
    for question, expected in questions.items():
        found = recall(backend, "ada", question, limit=3)
        assert found[0].text == expected, (question, [(m.text, m.score) for m in found])
        assert found[0].score is not None and found[0].score > (found[1].score or 0.0)
    assert recall(backend, "ada", "anything", limit=0) == []


def test_namespaces_keep_users_apart(backend: BaseStore) -> None:
    remember(backend, 1, "Please always contact me by email, never call")
    remember(backend, 2, "Call me any time on my phone")
    assert [m.text for m in recall(backend, 2, "how to contact?")] == ["Call me any time on my phone"]
    assert [m.text for m in memories(backend, 1)] == ["Please always contact me by email, never call"]
    assert memory_namespace(1) == ("keelgraph", "memory", "1")
    assert recall(backend, 3, "how to contact?") == []
    with pytest.raises(UserError, match="needs a user"):
        remember(backend, " ", "x")


def test_the_same_fact_is_kept_once(backend: BaseStore) -> None:
    first = remember(backend, 1, "Please always contact me by email, never call")
    remember(backend, 1, "Please always contact me by email, never call me.")  # reworded: 0.94
    remember(backend, 1, "please always contact me by e-mail, never by phone")  # reworded: 0.89
    [kept] = memories(backend, 1)  # each replaced the one before: the newest words stay
    assert kept.text == "please always contact me by e-mail, never by phone"
    again = remember(backend, 1, "Please always contact me by E-mail; never by phone!")  # same words
    assert again.key == kept.key and len(memories(backend, 1)) == 1
    remember(backend, 1, "I prefer DHL")
    remember(backend, 1, "I prefer UPS for returns")  # another fact (0.35 from DHL): both kept
    remember(backend, 1, "I prefer DHL", kind="note")  # another kind: kept apart
    assert len(memories(backend, 1)) == 4
    assert [m.kind for m in memories(backend, 1, kind="note")] == ["note"]
    assert forget(backend, 1, first.key) == 1  # gone already: deleting it again is harmless
    assert forget(backend, 1) == 4
    assert memories(backend, 1) == []


def test_a_user_keeps_at_most_max_items(tmp_path: Path) -> None:
    with store(tmp_path / "store.db", index="auto") as opened:
        topics = ["email", "DHL", "size M", "vegetarian", "Berlin", "gift wrap"]
        for topic in topics:
            remember(opened, 1, f"Note about {topic}", kind="note", max_items=4)
        kept = [m.text for m in memories(opened, 1)]
        assert kept == [f"Note about {t}" for t in reversed(topics[2:])]  # the oldest two went
    with pytest.raises(UserError, match="max_items"):
        remember(InMemoryStore(), 1, "x", max_items=0)
    with pytest.raises(UserError, match="some text"):
        remember(InMemoryStore(), 1, "   ")


def test_memories_survive_a_process_restart(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with store(path, index="auto") as opened:
        for fact in FACTS:
            remember(opened, 7, fact)
    with store(path, index="auto") as reopened:  # a new store object on the same file
        assert recall(reopened, 7, "What is the preferred way to contact you?")[0].text == FACTS[0]
    script = textwrap.dedent(
        f"""
        from keelgraph.graphs.memory import recall
        from keelgraph.graphs.persistence import store
        with store({str(path)!r}, index="auto") as s:
            print(recall(s, 7, "Which shipping carrier does the customer like?")[0].text)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == FACTS[1]


def test_sqlite_vector_index_works_without_enable_load_extension(tmp_path: Path) -> None:
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        pytest.skip("this Python's sqlite3 can load extensions; the point here is one that cannot")
    with store(tmp_path / "store.db", index="auto") as opened:
        assert type(opened).__name__ == "SqliteStore" and getattr(opened, "index_config", None)
        remember(opened, 1, FACTS[1])
        rows = opened.conn.execute("SELECT count(*) FROM store_vectors").fetchone()  # type: ignore[attr-defined]
        assert rows[0] == 1  # the store embedded the memory's text itself
        [hit] = opened.search(memory_namespace(1), query="courier for my parcels")
        assert hit.score is not None and hit.score > 0.2
    conn = vector_connect(tmp_path / "other.db")  # sqlite-vec is loaded on keelgraph's connection
    assert conn.execute("SELECT vec_length(vec_f32('[1, 2, 3]'))").fetchone()[0] == 3
    conn.close()


async def test_the_async_store_has_the_index_too(tmp_path: Path) -> None:
    async with async_store(tmp_path / "store.db", index="auto") as opened:
        assert type(opened).__name__ == "AsyncSqliteStore" and getattr(opened, "index_config", None)
        await asyncio.to_thread(remember, opened, 1, FACTS[0])  # a sync node's thread, as served
        await asyncio.to_thread(remember, opened, 1, FACTS[1])
        hits = await opened.asearch(memory_namespace(1), query="How should we get in touch?", limit=1)
        assert hits[0].value["text"] == FACTS[0]


def test_missing_packages_are_a_typed_error_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pysqlite3" else real(name, *a)
    )
    with pytest.raises(MemoryUnavailable, match=r"pysqlite3-binary .*" + re.escape(install_hint("memory"))):
        vector_connect(tmp_path / "x.db")
    with pytest.raises(MemoryUnavailable), store(tmp_path / "x.db", index=index_config()):
        pass
    with store(tmp_path / "x.db", index="auto") as plain:  # "auto": no index, and recall still works
        assert not getattr(plain, "index_config", None)
        remember(plain, 1, FACTS[0])
        assert recall(plain, 1, "What is the preferred way to contact you?")[0].text == FACTS[0]


def test_without_the_model_recall_ranks_by_shared_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_model_or_none", lambda: None)
    kept = InMemoryStore()
    for fact in FACTS:
        remember(kept, 1, fact)
    assert recall(kept, 1, "which delivery company? DHL?")[0].text == FACTS[1]


@pytest.mark.e2e
def test_postgres_without_pgvector_ranks_in_python(postgres_db: str) -> None:
    with store(postgres_db, index="auto") as opened:
        assert type(opened).__name__ == "PostgresStore"
        has_pgvector = bool(getattr(opened, "index_config", None))
    if has_pgvector:
        pytest.skip("this server has pgvector: the store's own index is used")
    with (
        pytest.raises(MemoryUnavailable, match="no pgvector extension"),
        store(postgres_db, index=index_config()),
    ):
        pass


def test_stated_preferences_are_found() -> None:
    assert stated_preferences("Please always contact me by email, not phone") == [
        "Please always contact me by email, not phone"
    ]
    assert stated_preferences("Where is order 1002? I'd rather you ship with DHL in future.") == [
        "I'd rather you ship with DHL in future."
    ]
    assert stated_preferences("Don't call me, write instead.") == ["Don't call me, write instead."]
    for plain in ("Where is order 1002?", "My keyboard arrived damaged", "Thanks!"):
        assert stated_preferences(plain) == []


def test_doctests() -> None:
    assert doctest.testmod(memory).failed == 0


def _prompt(model: ScriptedChatModel, call: int) -> str:
    return "\n".join(str(m.content) for m in model.calls[call]["messages"])


def test_the_desk_remembers_a_preference_in_one_thread_and_uses_it_in_another(tmp_path: Path) -> None:
    model = ScriptedChatModel(
        [
            answer(reply="Noted: we will contact you by email."),
            answer(reply="Order 1002 has shipped; we will email you when it arrives.", order_ids=[1002]),
        ]
    )
    with store(tmp_path / "store.db", index="auto") as kept:
        graph = make_graph(
            tmp_path / "shop.db",
            model=model,
            checkpointer=sqlite_checkpointer(tmp_path / "threads.db"),
            memory=kept,
        )
        stated = {"message": "Please always contact me by email, not phone."}
        first = graph.invoke(
            {"request": stated}, {"configurable": {"thread_id": "thread-a", "keelgraph_user": "ada"}}
        )
        assert first["status"] == "ok"
        # What was persisted: the preference, under the customer, in the store.
        assert [m.text for m in memories(kept, 1)] == ["Please always contact me by email, not phone."]
        asked = {"message": "How will you let me know when order 1002 arrives?"}
        second = graph.invoke(
            {"request": asked}, {"configurable": {"thread_id": "thread-b", "keelgraph_user": "ada"}}
        )
        assert second["status"] == "ok"
        prompt = _prompt(model, 1)
        assert "The customer asked us earlier to remember" in prompt
        assert "- Please always contact me by email, not phone." in prompt
        thread_b = graph.get_state({"configurable": {"thread_id": "thread-b"}}).values["messages"]
        assert stated["message"] not in str(thread_b[0].content)  # thread B never saw thread A's turn
        assert "open_ticket" not in str(model.calls[1]["kwargs"])
        assert "customer_memory" not in str(model.calls[1]["kwargs"])  # never offered to the model
        # Another customer's thread is not shown it (alan is customer 2).
        other: Any = {"message": "How will you contact me?"}
        model.script.append(answer(reply="We will reach you through your account."))
        graph.invoke(
            {"request": other}, {"configurable": {"thread_id": "thread-c", "keelgraph_user": "alan"}}
        )
        assert "contact me by email" not in _prompt(model, 2)
        assert "Nothing remembered about this customer" in _prompt(model, 2)


def test_the_readme_example_runs_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    [block] = [
        b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "keelgraph-memory-example.db" in b
    ]
    block = block.replace("/tmp/keelgraph-memory-example.db", str(tmp_path / "example.db"))
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.splitlines() == [
        "Please always contact me by email, never call me. 0.44",
        "2 []",
    ]


def test_the_benchmark_in_the_readme_runs_small() -> None:
    """`bench/long_term_memory.py --postgres` (quoted in the README), with 60 memories a backend."""
    root = Path(__file__).parents[1]
    pg = ["--postgres"] if list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) else []
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "long_term_memory.py"), "--memories", "60", *pg],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for line in ("embed one text: median", "sqlite (sqlite-vec index): remember", "recall over 60"):
        assert line in done.stdout, done.stdout
