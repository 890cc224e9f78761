"""One model server per machine and port: a client finds the server keelgraph started busy (slow to
answer) and waits for it, rather than starting a second one that would compete for the cores."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from keelgraph.local.embedded import LocalModelServer, server_owner
from keelgraph.settings import Settings

pytestmark = pytest.mark.e2e


def test_a_busy_server_keelgraph_started_is_waited_for(tmp_path: Path) -> None:
    settings = dataclasses.replace(Settings.from_env({"KEELGRAPH_CACHE_DIR": str(tmp_path)}), llama_port=0)
    names = LocalModelServer(settings).names
    first_seen: list[float] = []

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # a server generating: /models answers only after a while
            first_seen.append(time.monotonic())
            if time.monotonic() - first_seen[0] < 3.0:
                time.sleep(3.5)
            body = json.dumps({"data": [{"id": n} for n in names]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        settings = dataclasses.replace(settings, llama_port=port)
        # keelgraph started it: its pid is recorded beside the port (here: this test's own process).
        (tmp_path / f"llama-server-{port}.owner").write_text(json.dumps({"pid": os.getpid(), "port": port}))
        assert server_owner(settings, port) == os.getpid()
        client = LocalModelServer(settings)
        began = time.monotonic()
        assert client.start(timeout_s=60) == f"http://127.0.0.1:{port}/v1"
        assert client.process is None  # nothing started: it waited for the busy one
        assert time.monotonic() - began >= 3.0
    finally:
        httpd.shutdown()


def test_a_dead_owner_is_not_waited_for(tmp_path: Path) -> None:
    settings = Settings.from_env({"KEELGRAPH_CACHE_DIR": str(tmp_path)})
    (tmp_path / "llama-server-9.owner").write_text(json.dumps({"pid": 2**22 + 12345, "port": 9}))
    assert server_owner(settings, 9) is None
