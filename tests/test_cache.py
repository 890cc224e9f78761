"""Response caching: identical calls are answered once, and only replies of turns that ended ok are kept."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import StructuredTool
from pydantic import BaseModel, Field

from keelgraph import Contract, Settings, build_graph, sqlite_checkpointer
from keelgraph.runtime.cache import MemoryModelCache, SqliteModelCache, cache_key
from keelgraph.testing import ScriptedChatModel, answer, call


class Question(BaseModel):
    city: str = Field(min_length=1, max_length=40)


class Forecast(BaseModel):
    city: str
    celsius: int = Field(ge=-60, le=60)


def weather(city: str) -> dict[str, Any]:
    """The weather for a city."""
    return {"city": city, "celsius": 21}


CONTRACT = Contract(input=Question, output=Forecast, instructions="Report the weather.", repair_budget=1)
GOOD = answer(city="Oslo", celsius=21)
BAD = answer(city="Oslo", celsius=99)  # out of range: rejected by the contract


class NamedModel(ScriptedChatModel):
    """A scripted model with the settings a real one declares."""

    model_name: str = "named"
    temperature: float | None = None


def ask(graph: Any, thread: str, city: str = "Oslo") -> tuple[dict[str, Any], dict[str, Any]]:
    config: Any = {"configurable": {"thread_id": thread}}
    result: dict[str, Any] = graph.invoke({"request": {"city": city}}, config)
    return result, graph.get_state(config).values


def graph_for(model: ScriptedChatModel, tmp: Path, cache: Any, tools: bool = False, **kw: Any) -> Any:
    return build_graph(
        CONTRACT,
        [StructuredTool.from_function(weather)] if tools else [],
        model=model,
        checkpointer=sqlite_checkpointer(tmp / "threads.db"),
        strategy="json_object",
        cache=cache,
        **kw,
    )


def test_the_same_request_on_two_threads_asks_the_model_once(tmp_path: Path) -> None:
    model = ScriptedChatModel([call("weather", city="Oslo"), GOOD])
    graph = graph_for(model, tmp_path, MemoryModelCache(), tools=True)
    first, _ = ask(graph, "a")
    second, persisted = ask(graph, "b")
    assert len(model.calls) == 2  # the tool step and the answer, once
    assert second["status"] == "ok" and second["output"] == first["output"]
    assert first["stats"]["cache_misses"] == 2 and first["stats"]["cache_hits"] == 0
    stats = persisted["stats"]
    assert stats["cache_hits"] == 2 and stats["cache_misses"] == 0 and stats["model_calls"] == 0
    assert stats["tool_calls"] == 1  # the cached tool step still ran its tool
    assert stats["input_tokens"] == 0 and [a["outcome"] for a in stats["model_attempts"]] == ["cached"] * 2


def test_a_reply_that_failed_validation_is_not_cached(tmp_path: Path) -> None:
    cache = MemoryModelCache()
    model = ScriptedChatModel([BAD, GOOD, GOOD])
    graph = graph_for(model, tmp_path, cache, cache_sampled=True)
    first, _ = ask(graph, "a")
    assert first["status"] == "ok" and first["stats"]["repairs"] == 1
    assert len(cache._items) == 1  # the repair's reply; the rejected one was dropped
    second, _ = ask(graph, "b")
    assert len(model.calls) == 3  # the first request was asked again: BAD was never kept
    assert second["status"] == "ok" and second["stats"]["cache_misses"] == 1
    assert second["stats"]["cache_hits"] == 0


def test_a_repair_is_not_cached_at_its_sampling_temperature(tmp_path: Path) -> None:
    cache = MemoryModelCache()
    # A greedy model's rejected answer is repaired by resampling (REPAIR_TEMPERATURE): not cached.
    # (99.5 is no integer, and the grammar cannot rule a float out of an integer field: the repair is
    # not decisive. A rejected integer is ruled out, and that repair decodes greedily.)
    model = NamedModel(script=[answer(city="Oslo", celsius=99.5), GOOD], temperature=0.0)
    first, _ = ask(graph_for(model, tmp_path, cache), "a")
    assert first["status"] == "ok" and len(model.calls) == 2
    assert model.calls[1]["kwargs"]["temperature"] > 0
    assert first["stats"]["cache_misses"] == 1  # the repair bypassed the cache
    assert cache._items == {}


def test_a_failed_turn_caches_nothing(tmp_path: Path) -> None:
    cache = MemoryModelCache()
    model = ScriptedChatModel([call("weather", city="Oslo"), BAD, BAD])
    result, _ = ask(graph_for(model, tmp_path, cache, tools=True, cache_sampled=True), "a")
    assert result["status"] == "failed" and result["error"]["type"] == "RepairExhausted"
    assert cache._items == {}  # not even the tool step, which ran fine


def test_a_different_prompt_or_model_misses(tmp_path: Path) -> None:
    cache = MemoryModelCache()
    one = NamedModel(script=[GOOD, answer(city="Bergen", celsius=12)], model_name="one")
    graph = graph_for(one, tmp_path / "1", cache)
    ask(graph, "a")
    bergen, _ = ask(graph, "b", city="Bergen")
    assert bergen["stats"]["cache_misses"] == 1 and len(one.calls) == 2
    two = NamedModel(script=[GOOD], model_name="two")
    other, _ = ask(graph_for(two, tmp_path / "2", cache), "a")
    assert other["stats"]["cache_hits"] == 0 and len(two.calls) == 1


def test_a_sampled_model_bypasses_the_cache(tmp_path: Path) -> None:
    cache = MemoryModelCache()
    model = NamedModel(script=[GOOD, GOOD], temperature=0.7)
    graph = graph_for(model, tmp_path, cache)
    ask(graph, "a")
    second, _ = ask(graph, "b")
    assert len(model.calls) == 2 and cache._items == {}
    assert second["stats"]["cache_hits"] == second["stats"]["cache_misses"] == 0


def test_no_cache_by_default_and_default_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    model = ScriptedChatModel([GOOD, GOOD])
    graph = graph_for(model, tmp_path / "off", None)
    ask(graph, "a")
    second, _ = ask(graph, "b")
    assert len(model.calls) == 2 and second["stats"]["cache_misses"] == 0
    model = ScriptedChatModel([GOOD])
    graph = graph_for(model, tmp_path / "on", "default")
    ask(graph, "a")
    second, _ = ask(graph, "b")
    assert len(model.calls) == 1 and second["stats"]["cache_hits"] == 1
    assert (Settings.from_env().data_dir / "model_cache.db").exists()


def test_sqlite_cache_persists_evicts_and_expires(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    cache = SqliteModelCache(path, max_entries=2)
    for key in ("a", "b", "c"):
        cache.put(key, {"content": key, "tool_calls": []})
    cache.close()
    again = SqliteModelCache(path, max_entries=2)
    assert again.get("a") is None  # the oldest went
    assert again.get("c") == {"content": "c", "tool_calls": []}
    expiring = SqliteModelCache(path, ttl_s=0.05)
    assert expiring.get("b") is not None
    time.sleep(0.1)
    assert expiring.get("b") is None


def test_the_key_covers_model_strategy_prompt_and_options() -> None:
    prompt = [HumanMessage("hi")]
    base = cache_key("m", "json_object", prompt, {})
    assert base == cache_key("m", "json_object", [HumanMessage("hi")], {})
    assert base != cache_key("n", "json_object", prompt, {})
    assert base != cache_key("m", "prompted", prompt, {})
    assert base != cache_key("m", "json_object", [HumanMessage("ho")], {})
    assert base != cache_key("m", "json_object", prompt, {"response_format": {"type": "json_object"}})


@pytest.mark.parametrize("make", [MemoryModelCache, lambda: SqliteModelCache(":memory:")])
def test_both_caches_store_and_replace(make: Any) -> None:
    cache = make()
    assert cache.get("k") is None
    cache.put("k", {"content": "1"})
    cache.put("k", {"content": "2"})
    assert cache.get("k") == {"content": "2"}
