"""Local helper processes (model server, langgraph dev): ports, starting one and waiting until it
answers, process-group shutdown, and the file lock and checksum shared by the model downloads."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

from keelgraph.contracts.errors import UserError

__all__ = [
    "file_lock",
    "free_port",
    "log_tail",
    "port_free",
    "sha256_file",
    "spawn",
    "start_helper",
    "stop_group",
]

HELPER_EXITED: Final = "{name} exited with {code} (log: {log}):\n{tail}"
HELPER_SILENT: Final = "{name} did not answer within {timeout_s:.0f} s (log: {log}):\n{tail}"
HELPER_UP: Final = "keelgraph: {name} answered after {seconds:.1f} s"
HELPER_WAITING: Final = "keelgraph: still waiting for {name} ({seconds:.0f} s; log {log})"
_NOTE_EVERY_S: Final = 5.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_free(port: int) -> bool:
    """Whether `port` can be bound on 127.0.0.1 (with SO_REUSEADDR, as uvicorn binds)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def stop_group(process: subprocess.Popen[bytes] | None, grace_s: float = 10.0) -> None:
    """SIGTERM to the process's group (it runs in its own session), SIGKILL after `grace_s`."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def spawn(
    cmd: Sequence[str],
    *,
    log_path: Path | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `cmd` in a session of its own (so `stop_group` ends it with its children, and a
    terminal's Ctrl-C is not sent to it), stdin closed, output to `log_path` (else discarded)."""
    if log_path is None:
        return subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as sink:
        return subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_helper(
    cmd: Sequence[str],
    *,
    name: str,
    log_path: Path,
    ready: Callable[[], bool],
    timeout_s: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    poll_s: float = 0.2,
) -> subprocess.Popen[bytes]:
    """`spawn` a helper server and wait until `ready()` holds; returns its process.

    Raises `UserError` with the end of the log if it exits first or is not ready within
    `timeout_s`; on that, or on any interruption (Ctrl-C), its process group is stopped first.
    `progress`, when given, hears when it is up and, every 5 s, that it is still awaited.

    >>> import sys, tempfile
    >>> log = Path(tempfile.mkdtemp()) / "helper.log"
    >>> cmd = [sys.executable, "-c", "print('no config'); raise SystemExit(3)"]
    >>> start_helper(cmd, name="the helper", log_path=log, ready=lambda: False, timeout_s=30)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    keelgraph.contracts.errors.UserError: the helper exited with 3 (log: ...helper.log):
    no config
    """
    process = spawn(cmd, log_path=log_path, cwd=cwd, env=env)
    started = time.monotonic()
    note_at = started + _NOTE_EVERY_S
    try:
        while (now := time.monotonic()) - started < timeout_s:
            code = process.poll()
            if code is not None:
                tail = log_tail(log_path)
                raise UserError(HELPER_EXITED.format(name=name, code=code, log=log_path, tail=tail))
            if ready():
                if progress is not None:
                    progress(HELPER_UP.format(name=name, seconds=time.monotonic() - started))
                return process
            if progress is not None and now >= note_at:
                progress(HELPER_WAITING.format(name=name, seconds=now - started, log=log_path))
                note_at += _NOTE_EVERY_S
            time.sleep(poll_s)
        tail = log_tail(log_path)
        raise UserError(HELPER_SILENT.format(name=name, timeout_s=timeout_s, log=log_path, tail=tail))
    except BaseException:
        stop_group(process)
        raise


def log_tail(path: Path, chars: int = 2000) -> str:
    """The last `chars` characters of a log, colour codes removed; empty when there is none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return _ANSI.sub("", text)[-chars:].strip()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes, held on `path` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
