"""Code written once for sync and async callers: a generator that yields each thing it waits for.

A node that calls a model, awaits a check or sleeps between retries is written as a generator
that yields an `Op` (`Invoke`, `Await`, `Sleep`) wherever it would block, and receives the
result (or has the exception raised at that point, so its `try`/`except` work as written).
`drive` runs it on the calling thread, blocking; `adrive` awaits each `Op` on the event loop
(the code between them runs on executor threads, as LangGraph runs a sync node): the sync API
and `ainvoke`/`astream` share every line of the logic, and an async run holds no thread while a
model answers or a tool or check awaits.

>>> def double_after_nap() -> Steps[int]:
...     yield Sleep(0)
...     value = yield Await(_ready(21))
...     return 2 * value
>>> async def _ready(value: int) -> int:
...     return value
>>> drive(double_after_nap())
42
>>> import asyncio
>>> asyncio.run(adrive(double_after_nap()))
42
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import time
from collections.abc import Awaitable, Generator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

__all__ = ["Await", "Invoke", "Op", "Sleep", "Steps", "adrive", "drive", "run_sync"]

T = TypeVar("T")
Steps = Generator["Op", Any, T]
"""A computation that yields `Op`s and returns a `T`."""


class Op(Protocol):
    """Something a computation waits for, done either way."""

    def run(self) -> Any: ...

    async def arun(self) -> Any: ...


@dataclass(frozen=True)
class Invoke:
    """`runnable.invoke(value, config)`, or `ainvoke` (a chat model, a bound model, a tool)."""

    runnable: Any
    value: Any
    config: Any = None

    def run(self) -> Any:
        return self.runnable.invoke(self.value, self.config)

    async def arun(self) -> Any:
        return await self.runnable.ainvoke(self.value, self.config)


@dataclass(frozen=True)
class Await:
    """An awaitable (an async check's result): awaited, or run to completion from sync code."""

    awaitable: Awaitable[Any]

    def run(self) -> Any:
        return run_sync(self.awaitable)

    async def arun(self) -> Any:
        return await self.awaitable


@dataclass(frozen=True)
class Sleep:
    """A pause (a retry's backoff)."""

    seconds: float

    def run(self) -> None:
        time.sleep(self.seconds)

    async def arun(self) -> None:
        await asyncio.sleep(self.seconds)


def drive(steps: Steps[T]) -> T:
    """Run `steps` to its result on this thread, doing each `Op` blocking."""
    send: Any = None
    error: Exception | None = None
    while True:
        try:
            op = steps.throw(error) if error is not None else steps.send(send)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        send, error = None, None
        try:
            send = op.run()
        except Exception as exc:  # raised inside `steps`, where it waited
            error = exc


async def adrive(steps: Steps[T]) -> T:
    """Run `steps` to its result from the event loop: each `Op` is awaited on the loop, and the
    code between them runs on an executor thread, in one context copied from the caller's.

    That code may block (a SQLite store or ledger, a cache lookup, a sync check): on the loop it
    would stall every other run, and LangGraph server refuses blocking calls there. The one
    context keeps what the code sets (a `ContextVar` set before an `Op` is still set after it)
    and what it reads (the run's config, store and stream writer)."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    send: Any = None
    error: Exception | None = None
    while True:
        finished, value = await loop.run_in_executor(None, context.run, _advance, steps, send, error)
        if finished:
            return value  # type: ignore[no-any-return]
        send, error = None, None
        try:
            send = await value.arun()
        except Exception as exc:
            error = exc


def _advance(steps: Steps[Any], send: Any, error: Exception | None) -> tuple[bool, Any]:
    """(True, the result) or (False, the next `Op`): a `StopIteration` cannot cross a future."""
    try:
        return False, steps.throw(error) if error is not None else steps.send(send)
    except StopIteration as done:
        return True, done.value


def run_sync(awaitable: Awaitable[T]) -> T:
    """Run `awaitable` to completion from sync code: in a new event loop, or in a helper thread's
    when this thread already runs one (a sync node called from async code)."""

    async def wrap() -> T:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wrap())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wrap()).result()
