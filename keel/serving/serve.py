"""Serving langgraph.json's graphs offline with `langgraph dev` on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

import httpx

from keelgraph.contracts.errors import UserError
from keelgraph.local.processes import free_port, log_tail, port_free, start_helper, stop_group

__all__ = ["MAX_BODY_BYTES", "DevServer", "free_port", "run", "serve_env", "write_config"]

_QUIET = {
    "LANGGRAPH_CLI_NO_ANALYTICS": "1",
    "LANGGRAPH_NO_VERSION_CHECK": "true",
    "LANGSMITH_TRACING": "false",
    "LANGCHAIN_TRACING_V2": "false",
}
_KEYS = ("LANGSMITH_API_KEY", "LANGCHAIN_API_KEY")
MAX_BODY_BYTES = 1024 * 1024
"""The largest HTTP body the served API accepts (langgraph-api's `HTTP_MAX_REQUEST_BODY_BYTES`,
300 MB by default): larger ones are answered 413 before anything is parsed or stored. A request
over `Contract.max_request_chars` (20,000 by default) is refused anyway; 1 MiB leaves room for
threads, commands and a run's config. Set the variable to change it."""
_NEEDS = ("langgraph_cli", "langgraph_api", "langgraph_runtime_inmem")
_MOVED = re.compile(r"Port \d+ is already in use, using port (\d+) instead")


def serve_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default: this process's environment) for an offline server.

    No analytics, no version check, no tracing; LangSmith keys are dropped too, since tracing turns
    itself on when one is set and would try to reach the internet.
    """
    env = dict(os.environ if base is None else base)
    for key in _KEYS:
        env.pop(key, None)
    env.update(_QUIET)
    env.setdefault("HTTP_MAX_REQUEST_BODY_BYTES", str(MAX_BODY_BYTES))
    return env


def write_config(
    folder: Path,
    base: Path,
    *,
    graphs: Mapping[str, str] | None = None,
    extra_graphs: Mapping[str, str] | None = None,
) -> Path:
    """A copy of the `langgraph.json` at `base` in `folder`, with every path made absolute.

    `langgraph dev` keeps its thread metadata (`.langgraph_api/`) beside its config, so a server
    for tests or benchmarks gets a config in a folder of its own. `graphs` replaces the served
    graphs, `extra_graphs` adds some; both map names to `file.py:attribute` (relative to `base`'s
    folder, or absolute).
    """
    root = base.resolve().parent
    config = json.loads(base.read_text())

    def absolute(spec: str) -> str:
        path, _, attr = spec.rpartition(":")
        if "/" not in path and not path.endswith(".py"):
            return spec  # a module path (package.module:attr) stays as it is
        return f"{(root / path).resolve()}:{attr}"

    chosen = dict(graphs) if graphs is not None else dict(config["graphs"])
    chosen.update(extra_graphs or {})
    config["graphs"] = {name: absolute(spec) for name, spec in chosen.items()}
    config["dependencies"] = [
        str(root / d) if d.startswith(".") else d for d in config.get("dependencies", [])
    ]
    for key in ("checkpointer", "store", "auth"):
        if isinstance(config.get(key), dict) and "path" in config[key]:
            config[key]["path"] = absolute(config[key]["path"])
    if isinstance(config.get("http"), dict) and "app" in config["http"]:
        config["http"]["app"] = absolute(config["http"]["app"])
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "langgraph.json"
    out.write_text(json.dumps(config, indent=2))
    return out


def _command() -> list[str]:
    missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        from keelgraph.settings import install_hint

        raise UserError(f"serving needs {', '.join(missing)} (the serve extra): {install_hint('serve')}")
    # Under the orphan guard: a parent killed without cleanup does not leave the server running.
    return [sys.executable, "-m", "keelgraph.local.orphan_guard", str(os.getpid()), "langgraph_cli"]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ok", timeout=2.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


class DevServer:
    """A `langgraph dev` process on 127.0.0.1, started and stopped by this object.

    The process runs in its own session (so `stop()` ends its whole process group), in the config's
    folder (where it keeps its in-memory state, `.langgraph_api/`), with its output in `log`.

    >>> with DevServer(Path("langgraph.json")) as server:  # doctest: +SKIP
    ...     print(server.url)
    """

    def __init__(
        self,
        config: Path,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        jobs: int | None = None,
    ) -> None:
        self.config = config.resolve()
        self.jobs = jobs
        """Runs the server executes at once (`--n-jobs-per-worker`; langgraph dev's default is 10)."""
        self.port = port or free_port()
        self.env = serve_env(env)
        self.log = log or Path(tempfile.gettempdir()) / f"keelgraph-langgraph-dev-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's base URL, e.g. `http://127.0.0.1:8123`."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DevServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> str:
        """Start the server and wait until `GET /ok` answers 200; returns the URL.

        Raises `UserError` with the end of the log if the process exits or does not answer in time.
        If the wait is interrupted (Ctrl-C), the half-started server is stopped first.
        """
        if self.process is not None and self.process.poll() is None:
            return self.url
        if not self.config.is_file():
            raise UserError(f"no {self.config.name} in {self.config.parent}: run from the project's folder")
        if not port_free(self.port):
            raise UserError(
                f"port {self.port} on 127.0.0.1 is in use: choose another, or none for a free one"
            )
        cmd = [
            *_command(), "dev", "--no-browser", "--no-reload",
            "--host", "127.0.0.1", "--port", str(self.port), "--config", str(self.config),
        ]  # fmt: skip
        if self.jobs is not None:
            cmd += ["--n-jobs-per-worker", str(self.jobs)]
        self.process = start_helper(
            cmd,
            name="langgraph dev",
            log_path=self.log,
            ready=self._answers,
            timeout_s=timeout_s,
            cwd=self.config.parent,
            env=self.env,
        )
        return self.url

    def _answers(self) -> bool:
        # langgraph dev moves to a random port, with only a warning, when the given one is taken
        # (another process may have bound it since the check in start): follow it.
        moved = _MOVED.search(log_tail(self.log, 20_000))
        if moved:
            self.port = int(moved.group(1))
        return _answers(self.url)

    def stop(self) -> None:
        """Stop the server: SIGTERM to its process group, SIGKILL if it still runs after 10 s."""
        process, self.process = self.process, None
        stop_group(process)


def _no_users_hint(env: Mapping[str, str]) -> str | None:
    """What to do when the server's auth would refuse everyone (no tokens and no JWT key yet)."""
    from keelgraph.serving.auth import TokenFile, token_file_path

    if any(env.get(f"KEELGRAPH_AUTH_{k}") for k in ("JWT_SECRET", "JWT_PUBLIC_KEY", "JWKS_URL")):
        return None
    path = token_file_path(env)
    try:
        if TokenFile(path).list():
            return None
    except UserError as exc:
        return f"warning: {exc}"
    return (
        f"no users yet ({path} has no tokens): every request gets 401 until you create one with "
        "`keelgraph token create USER` and send it as 'Authorization: Bearer <token>'"
    )


def run(port: int | None = None, config: Path | None = None) -> int:
    """Serve in the foreground until Ctrl-C or SIGTERM (`keelgraph serve`); returns the exit code.

    0 when stopped on request, 130 when interrupted while starting, the server's own exit code (or
    1) if it stopped by itself. The server is stopped in every case.
    """
    server = DevServer(config or Path.cwd() / "langgraph.json", port=port)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    serving = False
    try:
        server.start()
        serving = True
        print(
            f"serving {server.config} at {server.url} (API docs: {server.url}/docs); Ctrl-C stops it",
            flush=True,
        )
        print(f"log: {server.log}", flush=True)
        if (hint := _no_users_hint(server.env)) is not None:
            print(hint, flush=True)
        while server.process is not None:
            code = server.process.poll()
            if code is not None:
                print(f"langgraph dev exited with {code}; see {server.log}", file=sys.stderr, flush=True)
                return code if code > 0 else 1
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0 if serving else 130
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
