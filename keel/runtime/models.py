"""The model runtime: chat models for the configured endpoint or the embedded one, transient-error
rules, prices, and the failover chain."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import openai
from langchain_core.exceptions import ModelError
from langchain_core.language_models import BaseChatModel
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from keelgraph.contracts.errors import ModelUnavailable, UserError
from keelgraph.local.embedded import LocalModelServer, tools_alias
from keelgraph.settings import LARGER_MODEL_NAME, Settings
from keelgraph.tools.retry import Backoff, retry_after

__all__ = [
    "ModelChain",
    "ModelSource",
    "ModelUnavailable",
    "Price",
    "as_chain",
    "chat_model",
    "default_chain",
    "default_model",
    "http_status",
    "is_malformed",
    "is_transient",
    "model_label",
    "output_cap",
    "price_of",
    "retry_after",
    "tool_choice_for",
]

ModelSource = BaseChatModel | Callable[[], BaseChatModel]

_LOCK = threading.Lock()
_DEFAULT: list[BaseChatModel] = []


def chat_model(
    settings: Settings | None = None, *, base_url: str | None = None, model: str | None = None
) -> ChatOpenAI:
    """A `ChatOpenAI` for the configured endpoint, or for the embedded server at `base_url`;
    `model` overrides the configured model name.

    Transport retries are left to the graph's model chain (`max_retries=0`, see `ModelChain`), so
    the two kinds of retry never stack.
    """
    settings = settings or Settings.from_env()
    url = base_url or settings.base_url
    if url is None:
        raise UserError("no endpoint: set KEELGRAPH_BASE_URL or use default_model()")
    key = settings.api_key or "not-needed"
    return ChatOpenAI(
        model=model or settings.model,
        base_url=url,
        api_key=SecretStr(key),
        temperature=settings.temperature,
        timeout=settings.timeout_s,
        max_retries=0,
        max_tokens=settings.max_tokens,  # sent as max_completion_tokens
        extra_body=output_cap(url, settings.max_tokens),
    )


def output_cap(url: str, max_tokens: int) -> dict[str, Any] | None:
    """The output cap local servers understand.

    langchain-openai sends the cap as `max_completion_tokens`, which llama.cpp-style servers ignore:
    measured here, a grammar-constrained reply then ran on for 3,700 tokens (four minutes) until the
    context was full. Local servers also get the older `max_tokens`, which they honour.
    """
    if url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        return {"max_tokens": max_tokens}
    return None


def default_model() -> BaseChatModel:
    """The configured endpoint, or the embedded model (started on first use, stopped at exit)."""
    with _LOCK:
        if not _DEFAULT:
            settings = Settings.from_env()
            if settings.embedded:
                url = LocalModelServer(settings).start()
                # Native tool calling on the embedded model asks the server's tool-calling alias.
                name = tools_alias(settings.model) if settings.output_strategy == "tool_calling" else None
                _DEFAULT.append(chat_model(settings, base_url=url, model=name))
            else:
                _DEFAULT.append(chat_model(settings))
        return _DEFAULT[0]


# -- transient errors, retries and failover ----------------------------------------------------


def _httpx_modules() -> list[Any]:
    # openai >= 2 talks through httpx2, a fork with the same exception classes; a stream can raise
    # its errors unwrapped.
    modules: list[Any] = [httpx]
    with contextlib.suppress(ImportError):
        import httpx2

        modules.append(httpx2)
    return modules


_HTTPX = _httpx_modules()
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    openai.APIConnectionError,  # includes APITimeoutError
    TimeoutError,
    ConnectionError,
    *(cls for m in _HTTPX for cls in (m.TimeoutException, m.NetworkError, m.RemoteProtocolError)),
)
_STATUS_ERRORS: tuple[type[BaseException], ...] = tuple(m.HTTPStatusError for m in _HTTPX)
_MALFORMED_ERRORS: tuple[type[BaseException], ...] = (
    json.JSONDecodeError,
    openai.APIResponseValidationError,
    *(m.DecodingError for m in _HTTPX),
)
_MALFORMED_TEXT = (
    # langchain-openai, when a 200 body is JSON but not a chat completion
    "Unexpected response type from OpenAI-compatible endpoint",
    "Received response with null value for 'choices'",
)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an error reply carried by `exc`, or None."""
    if isinstance(exc, _STATUS_ERRORS):
        status = getattr(getattr(exc, "response", None), "status_code", None)
    else:
        status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def is_malformed(exc: BaseException) -> bool:
    """Whether `exc` says a model endpoint answered 200 with a body that is not a chat completion
    (not JSON, cut-off JSON, or JSON of another shape)."""
    if isinstance(exc, _MALFORMED_ERRORS):
        return True
    return isinstance(exc, ValueError | TypeError) and str(exc).startswith(_MALFORMED_TEXT)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same model request may succeed: keelgraph's rule, case by case.

    Transient: timeouts (`openai.APITimeoutError`, `httpx.TimeoutException`, `TimeoutError`),
    connection failures (`openai.APIConnectionError`, `httpx.ConnectError`, `httpx.RemoteProtocolError`,
    `ConnectionError`), HTTP 408, 429 and 5xx (but 501 and 505), a malformed 200 body (a provider
    fault; see `is_malformed`), and LangChain `ModelError`s marked `is_retryable`. Everything else is
    not, 400/401/403/404/422 above all: the caller or the configuration must change.

    >>> is_transient(TimeoutError()), is_transient(ValueError("bad argument"))
    (True, False)
    """
    if is_malformed(exc):
        return True
    status = http_status(exc)
    if status is not None:
        return status in {408, 429} or (500 <= status < 600 and status not in {501, 505})
    if isinstance(exc, _TRANSPORT_ERRORS):
        return True
    return isinstance(exc, ModelError) and exc.is_retryable


_REQUIRED_REFUSED: set[tuple[str, str]] = set()
"""Endpoints (base URL, model) that refused `tool_choice="required"`: asked with "auto" since."""


def _endpoint(model: BaseChatModel) -> tuple[str, str]:
    base = str(getattr(model, "openai_api_base", "") or getattr(model, "base_url", "") or "")
    return base, model_label(model)


def tool_choice_for(model: BaseChatModel) -> str:
    """How `model`'s endpoint is asked to call one of several tools: "required" (OpenAI's value),
    or "auto" once the endpoint refused "required" (llama-cpp-python's server answers it with a
    500; some others with a 400 naming `tool_choice`). Remembered per endpoint for the process."""
    return "auto" if _endpoint(model) in _REQUIRED_REFUSED else "required"


def refuses_required_choice(exc: BaseException) -> bool:
    """Whether an error may be an endpoint refusing `tool_choice="required"`: a 4xx that names
    `tool_choice`, or a 500 (which is what llama-cpp-python answers, with an empty message)."""
    status = http_status(exc)
    if status == 500:
        return True
    return status in {400, 404, 422} and "tool_choice" in str(exc)


def remember_tool_choice(model: BaseChatModel, required_refused: bool) -> None:
    """Record whether `model`'s endpoint refuses `tool_choice="required"` (see `tool_choice_for`)."""
    if required_refused:
        _REQUIRED_REFUSED.add(_endpoint(model))
    else:
        _REQUIRED_REFUSED.discard(_endpoint(model))


@dataclass(frozen=True)
class Price:
    """What a model charges per million tokens, in one currency of your choice (USD, EUR...).

    >>> Price(input=0.15, output=0.60).cost(input_tokens=2000, output_tokens=500)
    0.0006
    """

    input: float
    output: float

    def __post_init__(self) -> None:
        if self.input < 0 or self.output < 0:
            raise UserError(f"a price must be >= 0, got {self}")

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return round((input_tokens * self.input + output_tokens * self.output) / 1_000_000, 9)


def price_of(prices: Mapping[str, Price], model: str) -> Price | None:
    """The price of `model` (a `model_label`): its own entry, else the `"*"` entry, else None."""
    return prices.get(model) or prices.get("*")


def model_label(model: BaseChatModel) -> str:
    """The name a model is recorded under in a turn's stats: its model name, else its type."""
    for attr in ("model_name", "model"):
        name = getattr(model, attr, None)
        if isinstance(name, str) and name:
            return name
    return model._llm_type


@dataclass(frozen=True)
class ModelChain:
    """The models a graph asks, in order, and how it retries each before moving on.

    A transient error (see `is_transient`) is retried on the same model up to `attempts` requests
    in all, after an exponential backoff (`base_s`, doubling, times a random factor in
    [1 - jitter, 1], at most `max_wait_s`) or exactly the wait a `Retry-After` asks for; a
    `Retry-After` beyond `max_wait_s`, or a second malformed body, moves on at once. Then the next
    model takes the call. `handover_after=N` also hands a turn to the next model after every N
    failed repair attempts (a model that keeps breaking the contract). Each model is bound with the
    graph's tools and output format (LangChain's `with_fallbacks` would drop them).

    >>> from keelgraph.testing import ScriptedChatModel
    >>> chain = ModelChain((ScriptedChatModel([]), ScriptedChatModel([])), handover_after=2)
    >>> [chain.first_position(repairs) for repairs in range(5)]
    [0, 0, 1, 1, 1]
    """

    models: tuple[ModelSource, ...]
    """Chat models or zero-argument factories (resolved when first needed), primary first."""
    attempts: int = 3
    base_s: float = 0.5
    max_wait_s: float = 30.0
    jitter: float = 0.5
    handover_after: int | None = None
    _resolved: dict[int, BaseChatModel] = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.models:
            raise UserError("a model chain needs at least one model")
        if self.attempts < 1:
            raise UserError(f"attempts must be >= 1, got {self.attempts}")
        if self.base_s < 0 or self.max_wait_s < 0 or not 0 <= self.jitter <= 1:
            raise UserError("base_s and max_wait_s must not be negative, jitter must be in [0, 1]")
        if self.handover_after is not None and self.handover_after < 1:
            raise UserError(f"handover_after must be None or >= 1, got {self.handover_after}")

    def model(self, position: int) -> BaseChatModel:
        """The chat model at `position` (0: the primary), resolving a factory once."""
        source = self.models[position]
        if isinstance(source, BaseChatModel):
            return source
        with self._lock:
            if position not in self._resolved:
                self._resolved[position] = source()
            return self._resolved[position]

    def first_position(self, repairs: int) -> int:
        """Where a call starts after `repairs` failed attempts this turn (see `handover_after`)."""
        if self.handover_after is None:
            return 0
        return min(repairs // self.handover_after, len(self.models) - 1)

    def wait(
        self, exc: BaseException, attempt: int, *, rng: Callable[[], float] = random.random
    ) -> float | None:
        """Seconds to wait after failed request number `attempt` (from 1) to a model before asking it
        again, or None to move on to the next model."""
        if attempt >= self.attempts or not is_transient(exc):
            return None
        backoff = Backoff(self.base_s, cap_s=self.max_wait_s, jitter=self.jitter)
        return backoff.delay(attempt, retry_after=retry_after(exc), rng=rng)


def as_chain(model: ModelSource | Sequence[ModelSource] | ModelChain | None) -> ModelChain:
    """A graph's `model=` argument as a chain: None is `default_chain()`; a model or a sequence of
    models gets the retry settings of the environment (KEELGRAPH_MODEL_ATTEMPTS,
    KEELGRAPH_MAX_RETRY_WAIT)."""
    if isinstance(model, ModelChain):
        return model
    if model is None:
        return default_chain()
    settings = Settings.from_env()
    models: tuple[ModelSource, ...]
    if isinstance(model, BaseChatModel) or callable(model):
        models = (model,)
    else:
        models = tuple(model)
        if not models:
            raise UserError("model=[] names no model; pass at least one, or None for the default")
    return ModelChain(models, attempts=settings.model_attempts, max_wait_s=settings.max_retry_wait_s)


def _fallback_model(name: str) -> BaseChatModel:
    settings = Settings.from_env()
    url = settings.fallback_base_url or settings.base_url or LocalModelServer(settings).start()
    return chat_model(settings, base_url=url, model=name)


def larger_model() -> BaseChatModel:
    """The cascade's larger local model, on the embedded server (which then serves both)."""
    settings = Settings.from_env()
    if not settings.cascade:
        settings = dataclasses.replace(settings, cascade=True)
    return chat_model(settings, base_url=LocalModelServer(settings).start(), model=LARGER_MODEL_NAME)


def default_chain(settings: Settings | None = None) -> ModelChain:
    """`default_model()` followed by the fallbacks of KEELGRAPH_FALLBACK_MODELS /
    KEELGRAPH_FALLBACK_BASE_URL, each resolved when first needed; with KEELGRAPH_CASCADE=1 on the
    embedded model, the larger local model takes a turn after KEELGRAPH_HANDOVER_AFTER failed repairs."""
    settings = settings or Settings.from_env()
    names = settings.fallback_models or ((settings.model,) if settings.fallback_base_url else ())
    fallbacks: list[ModelSource] = [partial(_fallback_model, name) for name in names]
    if settings.embedded and settings.cascade:
        return ModelChain(
            (default_model, larger_model, *fallbacks),
            attempts=settings.model_attempts,
            max_wait_s=settings.max_retry_wait_s,
            handover_after=settings.handover_after,
        )
    return ModelChain(
        (default_model, *fallbacks), attempts=settings.model_attempts, max_wait_s=settings.max_retry_wait_s
    )
