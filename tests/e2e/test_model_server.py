"""The embedded model server: started when needed, reused when running, stopped by its starter."""

from __future__ import annotations

import dataclasses
import socket

import httpx
from langchain_core.messages import HumanMessage

from keelgraph.models import LocalModelServer, chat_model
from keelgraph.settings import Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_start_reuse_stop(model_server: str) -> None:
    settings = dataclasses.replace(
        Settings.from_env(), llama_port=_free_port(), llama_threads=1, llama_ctx=1024
    )
    first = LocalModelServer(settings)
    url = first.start()
    try:
        assert first.process is not None
        second = LocalModelServer(settings)
        assert second.start() == url and second.process is None  # reused, not started twice
        second.stop()  # a reuser never stops what it did not start
        assert httpx.get(f"{url}/models", timeout=5).status_code == 200
        reply = chat_model(settings, base_url=url).invoke([HumanMessage("Say OK.")])
        assert reply.content and reply.usage_metadata and reply.usage_metadata["output_tokens"] > 0
    finally:
        first.stop()
    try:
        httpx.get(f"{url}/models", timeout=2)
        raise AssertionError("the server should be stopped")
    except httpx.TransportError:
        pass
