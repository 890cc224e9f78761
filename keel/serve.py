"""Serving langgraph.json's graphs offline with `langgraph dev` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from keelgraph.contracts.errors import UserError

__all__ = ["DevServer", "free_port", "run", "serve_env"]

_QUIET = {
    "LANGGRAPH_CLI_NO_ANALYTICS": "1",
    "LANGGRAPH_NO_VERSION_CHECK": "true",
    "LANGSMITH_TRACING": "false",
    "LANGCHAIN_TRACING_V2": "false",
}


def serve_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for an offline server: no analytics, no version check, no tracing.

    LangSmith keys are dropped too: tracing turns itself on when one is set.
    """
    env = dict(os.environ if base is None else base)
    for key in ("LANGSMITH_API_KEY", "LANGCHAIN_API_KEY"):
        env.pop(key, None)
    env.update(_QUIET)
    return env


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (port 2024, langgraph dev's default, is taken on some machines)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DevServer:
    """A `langgraph dev` process on 127.0.0.1, started and stopped by this object.

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
    ) -> None:
        self.config = config.resolve()
        self.port = port or free_port()
        self.env = serve_env(env)
        self.log = log or Path(tempfile.gettempdir()) / f"keelgraph-langgraph-dev-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DevServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 90.0) -> str:
        if not self.config.exists():
            raise UserError(f"no {self.config.name} at {self.config.parent}: run from the repository root")
        cmd = [
            sys.executable, "-m", "langgraph_cli", "dev", "--no-browser", "--no-reload",
            "--host", "127.0.0.1", "--port", str(self.port), "--config", str(self.config),
        ]  # fmt: skip
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                cmd,
                cwd=self.config.parent,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise UserError(f"langgraph dev exited with {self.process.returncode}:\n{self._tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ok", timeout=2).status_code == 200:
                    return self.url
            time.sleep(0.2)
        self.stop()
        raise UserError(f"langgraph dev did not answer within {timeout_s:.0f} s:\n{self._tail()}")

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def run(port: int | None = None, config: Path | None = None) -> int:
    """Serve in the foreground until Ctrl-C (`keelgraph serve`)."""
    server = DevServer(config or Path("langgraph.json"), port=port)
    server.start()
    print(
        f"serving {server.config} at {server.url} (API docs: {server.url}/docs); Ctrl-C stops it", flush=True
    )
    print(f"log: {server.log}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
