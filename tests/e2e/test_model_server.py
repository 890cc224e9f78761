"""The embedded model server: started when needed, reused when running, stopped by its starter."""

from __future__ import annotations

import dataclasses
import socket

import httpx
from langchain_core.messages import HumanMessage

from keelgraph.local.embedded import LocalModelServer
from keelgraph.runtime.models import chat_model
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


def test_negated_class_patterns_keep_the_grammar_inside_the_string(model_server: str) -> None:
    """A field pattern with a negated class (`^[^0-9]+$`) once let the grammar's string swallow
    its closing quote and the rest of the answer: constrained output came back as invalid JSON.
    Rewritten by `grammar_safe`, the real server's output parses and every pattern holds."""
    import json
    import re

    from pydantic import BaseModel, Field

    from keelgraph.contracts.decision import decision_schema, grammar_safe, inline_refs

    class Address(BaseModel):
        city: str = Field(pattern=r"^[^0-9]+$")
        postcode: str = Field(pattern=r"^\d{5}$")
        email: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[a-z]+$")

    schema = decision_schema(grammar_safe(inline_refs(Address.model_json_schema())), {})
    text = "Ship to 70 Linden Allee, 10963 Leeds. Mail me at sofia.silva24@mail.org."
    body = {
        "messages": [
            {"role": "system", "content": "Extract the address as JSON."},
            {"role": "user", "content": text},
        ],
        "temperature": 0,
        "max_tokens": 120,
        "response_format": {"type": "json_object", "schema": schema},
    }
    reply = httpx.post(f"{model_server}/chat/completions", json=body, timeout=120).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    answer = json.loads(choice["message"]["content"])["answer"]
    Address.model_validate(answer)  # every original pattern holds
    assert re.fullmatch(r"[^0-9\"]+", answer["city"])
