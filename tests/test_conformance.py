"""LangGraph's checkpointer conformance suite against every saver keelgraph configures.

The suite (langgraph-checkpoint-conformance) is async-only, so it runs against the async savers
that `async_checkpointer` returns, with keelgraph's tuning and serializer: `AsyncSqliteSaver` and
`AsyncPostgresSaver`. The sync savers share their schema and code paths (`test_postgres.py` runs the
graph on both). Each capability is one test, so a regression names the capability that broke.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import BASE_CAPABILITIES, Capability
from langgraph.checkpoint.conformance.initializer import RegisteredCheckpointer

from keelgraph.graphs.persistence import StorableSerializer, async_checkpointer
from keelgraph.testing.postgres import create_database

# Optional capabilities the stock savers do not implement at the pinned versions
# (langgraph-checkpoint-sqlite 3.1.2, langgraph-checkpoint-postgres 3.2.0): the suite detects a
# capability by the saver overriding its method, and skips what it does not find.
NOT_IMPLEMENTED = {
    "sqlite": {Capability.DELETE_FOR_RUNS, Capability.COPY_THREAD, Capability.PRUNE},
    "postgres": {Capability.DELETE_FOR_RUNS, Capability.COPY_THREAD},
}


def _sqlite() -> Callable[[], AsyncIterator[BaseCheckpointSaver[object]]]:
    async def factory() -> AsyncIterator[BaseCheckpointSaver[object]]:
        with tempfile.TemporaryDirectory() as tmp:  # a fresh file per capability suite
            async with async_checkpointer(Path(tmp) / "threads.db") as saver:
                yield saver

    return factory


def _postgres(server: str) -> Callable[[], AsyncIterator[BaseCheckpointSaver[object]]]:
    async def factory() -> AsyncIterator[BaseCheckpointSaver[object]]:
        url = await asyncio.to_thread(create_database, server, f"c_{uuid.uuid4().hex[:12]}")
        async with async_checkpointer(url) as saver:
            yield saver

    return factory


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.e2e)])
def saver(request: pytest.FixtureRequest) -> tuple[str, RegisteredCheckpointer]:
    backend: str = request.param
    factory = _sqlite() if backend == "sqlite" else _postgres(request.getfixturevalue("postgres_url"))
    return backend, checkpointer_test(name=f"keelgraph {backend}")(factory)


@pytest.mark.parametrize("capability", list(Capability), ids=[c.value for c in Capability])
async def test_conformance(saver: tuple[str, RegisteredCheckpointer], capability: Capability) -> None:
    backend, registered = saver
    report = await validate(registered, capabilities={capability.value})
    result = report.results[capability.value]
    if capability in NOT_IMPLEMENTED[backend]:
        assert not result.detected, f"{backend} now implements {capability.value}: test it"
        assert capability not in BASE_CAPABILITIES
        pytest.skip(f"{capability.value} is optional and not implemented by the stock {backend} saver")
    assert result.detected
    assert result.passed, "\n".join(result.failures)
    assert result.tests_passed > 0 and result.tests_failed == 0


async def test_the_savers_use_keelgraphs_serializer(tmp_path: Path) -> None:
    """What the suite ran against is what keelgraph configures, not a stock saver."""
    async with async_checkpointer(tmp_path / "threads.db") as saver:
        assert isinstance(saver.serde, StorableSerializer)
