"""Shared fixtures. Unit tests run with sockets disabled; e2e tests may reach 127.0.0.1 only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keelgraph.models import LocalModelServer
from keelgraph.settings import Settings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath) or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)
            # pytest-socket: loopback only (see --allow-hosts in pyproject).
            item.add_marker(pytest.mark.enable_socket)


@pytest.fixture(autouse=True)
def _data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data directory: no test touches ~/.local/share/keelgraph."""
    data = tmp_path / "keelgraph-data"
    monkeypatch.setenv("KEELGRAPH_DATA_DIR", str(data))
    return data


@pytest.fixture(scope="session")
def model_server() -> Iterator[str]:
    """The embedded llama.cpp server (reused if one already answers), as an OpenAI base URL.

    Set KEELGRAPH_BASE_URL to run the e2e suite against another endpoint instead.
    """
    if os.environ.get("KEELGRAPH_BASE_URL"):
        yield os.environ["KEELGRAPH_BASE_URL"]
        return
    server = LocalModelServer(Settings.from_env())
    url = server.start()
    try:
        yield url
    finally:
        server.stop()
