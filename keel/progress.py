"""Progress of long commands: a bar redrawn in place on a terminal, plain lines elsewhere.

`keelgraph eval`, the benchmarks and the model download report through `Progress`. On a terminal
(stderr is a TTY, `CI` unset, `TERM` not `dumb`) one line is redrawn: label, bar, count, rate and
time left. Anywhere else (CI logs, pipes, files) each step prints one plain line, so a log shows
what happened and when, without carriage returns.

>>> import io
>>> out = io.StringIO()
>>> with Progress(2, "eval", stream=out, interactive=False) as bar:
...     bar.advance(note="case-a ok")
...     bar.advance(note="case-b failed")
>>> print(out.getvalue().replace("\\r", ""), end="")  # doctest: +ELLIPSIS
eval 1/2 (50%) case-a ok ...
eval 2/2 (100%) case-b failed ...
eval done: 2 in ...
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import TextIO


def interactive_stream(stream: TextIO) -> bool:
    """Whether `stream` is a terminal a person watches (not CI, not a pipe, not a dumb terminal)."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"} or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Counts steps of a long command and shows them; `total=None` when the count is unknown.

    `advance(n, note)` moves on by `n` steps; `note` (a case id and its outcome, say) goes with
    the step. `say(text)` prints a line that stays (above the bar on a terminal). Use it as a
    context manager, or call `close()`, so the terminal line is finished and a summary printed.
    """

    def __init__(
        self,
        total: int | None,
        label: str,
        *,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        width: int = 24,
        unit: str = "",
    ) -> None:
        if total is not None and total < 0:
            raise ValueError("total must be None or >= 0")
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = interactive_stream(self.stream) if interactive is None else interactive
        self.width = width
        self.unit = unit
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0
        self._last_draw = 0.0
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _count(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.total is None:
            return f"{self.done}{unit}"
        pct = 100 * self.done / self.total if self.total else 100
        return f"{self.done}/{self.total}{unit} ({pct:.0f}%)"

    def _timing(self) -> str:
        elapsed = time.monotonic() - self.started
        if self.total is None or not self.done:
            return _duration(elapsed)
        left = elapsed / self.done * (self.total - self.done)
        return (
            f"{_duration(elapsed)}, ~{_duration(left)} left" if self.done < self.total else _duration(elapsed)
        )

    def _line(self, note: str) -> str:
        parts = [self.label]
        if self.interactive and self.total:
            filled = int(self.width * min(self.done, self.total) / self.total)
            parts.append("[" + "#" * filled + "." * (self.width - filled) + "]")
        parts.append(self._count())
        if note:
            parts.append(note)
        parts.append(self._timing())
        return " ".join(parts)

    def _write_interactive(self, line: str) -> None:
        pad = max(0, self._drawn - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._drawn = len(line)

    def _clear(self) -> None:
        if self.interactive and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0

    def advance(self, n: int = 1, note: str = "") -> None:
        """Count `n` more steps done."""
        self.done += n
        line = self._line(note)
        if not self.interactive:
            print(line, file=self.stream, flush=True)
            return
        now = time.monotonic()
        if now - self._last_draw >= 0.05 or (self.total is not None and self.done >= self.total):
            self._write_interactive(line)
            self._last_draw = now

    def say(self, text: str) -> None:
        """A line that stays in the output (printed above the bar on a terminal)."""
        self._clear()
        print(text, file=self.stream, flush=True)
        if self.interactive and not self._closed:
            self._write_interactive(self._line(""))

    def close(self) -> None:
        """Finish the bar; print how many steps took how long."""
        if self._closed:
            return
        self._closed = True
        self._clear()
        unit = f" {self.unit}" if self.unit else ""
        elapsed = time.monotonic() - self.started
        print(f"{self.label} done: {self.done}{unit} in {_duration(elapsed)}", file=self.stream, flush=True)
