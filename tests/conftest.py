"""Shared fixtures. Unit tests run with sockets disabled; e2e tests may reach 127.0.0.1 only."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from keelgraph.local.embedded import LocalModelServer
from keelgraph.settings import Settings
from keelgraph.testing.postgres import LocalPostgres, create_database, find_pg_bin


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


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL server for the session (about 1 s to start), as a superuser URL.

    Set KEELGRAPH_TEST_POSTGRES_URL to use another server instead. Tests that use it are e2e.
    """
    if os.environ.get("KEELGRAPH_TEST_POSTGRES_URL"):
        yield os.environ["KEELGRAPH_TEST_POSTGRES_URL"]
        return
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL is not installed: run `bash .ci/setup` or `apt-get install postgresql`")
    # Not pytest's tmp_path: its parents are private to root, and the server runs as `postgres`.
    # fsync off: with it on, the shutdown checkpoint of the session's ~40 databases took 4-17 s.
    with (
        tempfile.TemporaryDirectory(prefix="keelgraph-pg-") as tmp,
        LocalPostgres(Path(tmp), fsync=False) as server,
    ):
        yield server.url


@pytest.fixture
def postgres_db(postgres_url: str) -> str:
    """A fresh database on the session's server for one test: tests never see each other's rows."""
    return create_database(postgres_url, f"t_{uuid.uuid4().hex[:12]}")
