"""A private, throwaway PostgreSQL cluster on 127.0.0.1 for tests, benchmarks and local development."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keelgraph.contracts.errors import UserError
from keelgraph.local.processes import free_port, spawn, stop_group

__all__ = ["LocalPostgres", "create_database", "find_pg_bin"]

_NOT_INSTALLED = "PostgreSQL is not installed: run `bash .ci/setup` or `apt-get install postgresql`"
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes, and the name adds "/.s.PGSQL.NNNNN"

# Runs beside the server, as a separate process: postgres daemonises through pg_ctl, so it outlives
# a parent killed by SIGKILL or an OOM kill, which runs no atexit. Once the parent is gone this
# asks the postmaster for a fast shutdown (SIGINT); it exits by itself when the server stops.
_WATCHDOG = """
import os, signal, sys, time
parent, postmaster = int(sys.argv[1]), int(sys.argv[2])
while True:
    time.sleep(0.5)
    try:
        os.kill(postmaster, 0)
    except ProcessLookupError:
        sys.exit(0)
    if os.getppid() != parent:
        os.kill(postmaster, signal.SIGINT)
        sys.exit(0)
"""


def find_pg_bin() -> Path | None:
    """The folder holding `initdb` and `pg_ctl`: Debian's newest `/usr/lib/postgresql/N/bin`, else PATH.

    >>> find_pg_bin() is None or (find_pg_bin() / "pg_ctl").exists()
    True
    """

    def major(path: Path) -> int:
        return int(path.parent.name) if path.parent.name.isdigit() else -1

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: major(p.parent))
    candidates = [p.parent for p in reversed(debian)]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    return next((d for d in candidates if (d / "pg_ctl").exists()), None)


def create_database(url: str, name: str) -> str:
    """Create database `name` on the server at `url` and return the URL that points at it.

    Needs the `postgres` extra (psycopg). Handy for giving each test its own database.
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise UserError(f"database name {name!r}: use lower-case letters, digits and _ (at most 63)")
    try:
        import psycopg
        from psycopg import sql
    except ImportError:
        from keelgraph.settings import install_hint

        raise UserError(
            f"creating a database needs psycopg (the postgres extra): {install_hint('postgres')}"
        ) from None
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return urlsplit(url)._replace(path=f"/{name}").geturl()


class LocalPostgres:
    """A PostgreSQL cluster in `base_dir/data`, listening on 127.0.0.1 only, superuser `postgres`
    with trust authentication: for throwaway data, never for anything exposed.

    `start()` initialises the cluster on first use (about 1 s), starts the server and returns its
    URL; `stop()` shuts it down (also at interpreter exit, and within a second of this process
    dying by a signal). Running as root, the server runs as the `postgres` user (PostgreSQL
    refuses root) and `base_dir` is handed to it. `fsync=False` trades crash safety for speed
    (fsync, synchronous_commit and full_page_writes off): only for data you can lose.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp, LocalPostgres(Path(tmp)) as pg:  # doctest: +SKIP
    ...     pg.url
    'postgresql://postgres@127.0.0.1:...'
    """

    def __init__(self, base_dir: Path, port: int | None = None, *, fsync: bool = True) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self.port = port
        self.fsync = fsync
        self.started_in_s: float | None = None
        """Seconds the last `start()` took (initdb included when it ran)."""
        self._running = False
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """`postgresql://postgres@127.0.0.1:PORT/postgres?sslmode=disable` once started."""
        if not self._running or self.port is None:
            raise UserError("the PostgreSQL server is not running: call start() first")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres?sslmode=disable"

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> str:
        """Initialise the cluster if needed, start the server, wait until it accepts connections."""
        if self._running:
            return self.url
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise UserError(_NOT_INSTALLED)
        started = time.monotonic()
        as_user = self._run_as()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if as_user:
            os.chown(self.base_dir, as_user["user"], as_user["group"])
            if self._spawn(["test", "-w", str(self.base_dir)], as_user, timeout_s).returncode != 0:
                raise UserError(
                    f"the postgres user cannot write to {self.base_dir}: a parent folder is private "
                    "(pytest's tmp_path is); use a folder under /tmp or another the postgres user can reach"
                )
        if not (self.data_dir / "PG_VERSION").exists():
            initdb = [
                str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                "--encoding=UTF8", "--locale=C",
                *([] if self.fsync else ["--no-sync"]),
            ]  # fmt: skip
            done = self._spawn(initdb, as_user, timeout_s)
            if done.returncode != 0:
                raise UserError(f"initdb failed ({done.returncode}):\n{_tail(done.stdout)}")
        self.port = self.port or free_port()
        options = ["-p", str(self.port), "-c", "listen_addresses=127.0.0.1"]
        socket_dir = str(self.data_dir)
        options += [
            "-c",
            f"unix_socket_directories={socket_dir if len(socket_dir) < _SOCKET_PATH_MAX else ''}",
        ]
        if not self.fsync:
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        pg_ctl = [
            str(bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path),
            "-w", "-t", str(max(1, int(timeout_s))), "-o", shlex.join(options), "start",
        ]  # fmt: skip
        done = self._spawn(pg_ctl, as_user, timeout_s + 5)
        if done.returncode != 0:
            raise UserError(
                f"PostgreSQL did not start on 127.0.0.1:{self.port} ({done.returncode}):\n"
                f"{_tail(done.stdout)}\n{self._log_tail()}"
            )
        self._running = True
        if self not in _STARTED:
            _STARTED.append(self)
        postmaster = self._postmaster_pid()
        if postmaster is not None:
            self._watchdog = spawn([sys.executable, "-I", "-c", _WATCHDOG, str(os.getpid()), str(postmaster)])
        self.started_in_s = time.monotonic() - started
        return self.url

    def stop(self, timeout_s: float = 15.0) -> None:
        """Fast shutdown (`pg_ctl stop -m fast`); signals the postmaster directly if that fails."""
        if not self._running:
            return
        self._running = False
        watchdog, self._watchdog = self._watchdog, None
        stop_group(watchdog)  # first, so it does not signal the server being shut down
        pid = self._postmaster_pid()
        bin_dir = find_pg_bin()
        if bin_dir is not None:
            cmd = [str(bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", str(int(timeout_s)), "stop"]  # fmt: skip
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                if self._spawn(cmd, self._run_as(), timeout_s + 5).returncode == 0:
                    return
        if pid is None:
            return
        for sig, wait_s in ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not _alive(pid):
                    return
                time.sleep(0.1)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _log_tail(self) -> str:
        try:
            return _tail(self.log_path.read_text(errors="replace"))
        except OSError:
            return f"(no log at {self.log_path})"

    @staticmethod
    def _run_as() -> dict[str, Any]:
        """subprocess arguments that drop root to the `postgres` user; none when not root."""
        if os.geteuid() != 0:
            return {}
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise UserError(
                "PostgreSQL refuses to run as root and there is no `postgres` user: "
                "run as another user, or `apt-get install postgresql` (it creates one)"
            ) from None
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _spawn(
        self, cmd: list[str], as_user: dict[str, Any], timeout_s: float
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd,
            cwd=self.base_dir,  # the postgres user may not be allowed into ours
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            check=False,
            start_new_session=True,  # a terminal's Ctrl-C is for us; stop() shuts the server down
            **as_user,
        )


def _tail(text: str, chars: int = 2000) -> str:
    return text.strip()[-chars:]


def _alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie does not (a container's PID 1 may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in {"Z", "X"}


_STARTED: list[LocalPostgres] = []


@atexit.register
def _stop_started() -> None:
    for server in _STARTED:
        server.stop()
