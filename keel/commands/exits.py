"""The exit codes of the `keelgraph` command, defined once: `--help`, the README and the tests read them."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode", "exit_code_table"]


class ExitCode(IntEnum):
    """What a `keelgraph` command's exit status means. Outcomes (3-7) are codes of their own, so a
    script can tell a rejected request from a usage mistake, a regression from a crash.

    >>> int(ExitCode.REJECTED), ExitCode.REJECTED.meaning
    (6, 'ask/approve: the request was rejected (InputRejected); nothing ran')
    """

    OK = 0
    CRASH = 1
    USAGE = 2
    FAILED = 3
    WAITING = 4
    NOT_FOUND = 5
    REJECTED = 6
    REGRESSION = 7
    BUSY = 8
    GRAPH = 9
    CONFIG = 10
    INTERRUPTED = 130

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "done: a valid answer, a decision taken, no regression",
    ExitCode.CRASH: "an unexpected error (a bug: Python prints the traceback; please report it)",
    ExitCode.USAGE: "the command line is wrong (argparse: unknown command or option, missing argument)",
    ExitCode.FAILED: "ask/approve: the turn ended in a typed failure (repairs, a budget or the model spent)",
    ExitCode.WAITING: "ask/approve: the run waits for a person's decision (keelgraph approve)",
    ExitCode.NOT_FOUND: "history: no such thread; token revoke: no such token",
    ExitCode.REJECTED: "ask/approve: the request was rejected (InputRejected); nothing ran",
    ExitCode.REGRESSION: "eval: a regression against --baseline, or fewer correct than --min-correct",
    ExitCode.BUSY: "ask/approve: another run holds the thread (ThreadBusy); nothing was kept, retry later",
    ExitCode.GRAPH: "--graph cannot be loaded: no such module, file or factory, or it is not a graph",
    ExitCode.CONFIG: "keelgraph refused to run: a setting, argument value or thread state is wrong "
    "(the message says what to do)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


def exit_code_table() -> str:
    """The codes as `keelgraph --help` lists them, one per line."""
    return "\n".join(f"  {int(code):>3}  {code.meaning}" for code in ExitCode)
