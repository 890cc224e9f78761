"""Configuration from the environment."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from keelgraph import Settings, UserError
from keelgraph.graphs import infer_strategy
from keelgraph.runtime.models import chat_model
from keelgraph.testing import ScriptedChatModel


class Q(BaseModel):
    q: str


def test_defaults_are_the_embedded_model() -> None:
    settings = Settings.from_env({"HOME": "/home/u"})
    assert settings.embedded and settings.model == "qwen2.5-coder-0.5b-instruct"
    assert (
        settings.data_dir == Path.home() / ".local" / "share" / "keelgraph"
        or settings.data_dir.name == "keelgraph"
    )


def test_configured_endpoint() -> None:
    env = {
        "KEELGRAPH_BASE_URL": "https://api.example.com/v1",
        "KEELGRAPH_API_KEY": "k",
        "KEELGRAPH_MODEL": "m",
    }
    settings = Settings.from_env(env)
    model = chat_model(settings)
    assert model.model_name == "m" and model.openai_api_base == "https://api.example.com/v1"
    assert model.max_retries == 0  # transport retries belong to the graph's retry policy
    assert infer_strategy(model) == "tool_calling"
    assert infer_strategy(chat_model(settings, base_url="http://127.0.0.1:1/v1")) == "json_object"
    assert infer_strategy(ScriptedChatModel([])) == "prompted"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KEELGRAPH_OUTPUT_STRATEGY": "magic"}, "unknown; use one of json_object"),
        ({"KEELGRAPH_TEMPERATURE": "hot"}, "is not a number"),
        ({"KEELGRAPH_LLAMA_PORT": "x"}, "is not a whole number"),
    ],
)
def test_bad_settings_say_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        Settings.from_env(env)


def test_every_reply_has_an_output_cap_that_the_server_honours() -> None:
    from langchain_core.messages import HumanMessage

    from keelgraph import Contract
    from keelgraph.graphs.model_call import bind as _bind

    settings = Settings.from_env({"KEELGRAPH_MAX_TOKENS": "300"})
    local = chat_model(settings, base_url="http://127.0.0.1:1/v1")
    payload = local._get_request_payload([HumanMessage("x")])
    # langchain-openai's field, which llama.cpp ignores, and the one it honours.
    assert payload["max_completion_tokens"] == 300 and payload["extra_body"] == {"max_tokens": 300}
    hosted = chat_model(Settings.from_env({"KEELGRAPH_BASE_URL": "https://api.example.com/v1"}))
    assert hosted._get_request_payload([HumanMessage("x")])["max_completion_tokens"] == 1024
    assert hosted.extra_body is None
    # Asking for schema-constrained JSON keeps the cap (a bound extra_body replaces the model's).
    contract = Contract(input=Q, output=Q, instructions="x")
    bound = _bind(local, "json_object", contract.output_schema(), [], {})
    extra = bound.kwargs["extra_body"]  # type: ignore[attr-defined]
    assert extra["max_tokens"] == 300 and extra["response_format"]["type"] == "json_object"
