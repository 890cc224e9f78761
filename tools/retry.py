"""One retry policy for model calls, tools and HTTP: exponential backoff, jitter, and server-asked waits."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final, overload

from keelgraph.contracts.errors import UserError

__all__ = ["Backoff", "retry_after"]

BAD_BACKOFF: Final = (
    "a backoff needs base_s >= 0, cap_s >= 0, multiplier >= 1 and jitter in [0, 1]; got {policy}"
)


@dataclass(frozen=True)
class Backoff:
    """How long to wait after a failed try: `base_s` times `multiplier` per earlier failure, at most
    `cap_s`, times a random factor in [1 - jitter, 1] (jitter 0: exact waits).

    A wait the server asks for (see `retry_after`) is taken as it is, with no jitter; one longer than
    `cap_s` gives None, meaning "do not wait here": give up, or move on to another model.

    >>> policy = Backoff(0.5, cap_s=3.0)
    >>> [policy.delay(n) for n in (1, 2, 3, 4)]
    [0.5, 1.0, 2.0, 3.0]
    >>> Backoff(0.5, cap_s=3.0, jitter=0.5).delay(2, rng=lambda: 1.0)
    0.5
    >>> policy.delay(1, retry_after=2.0), policy.delay(1, retry_after=9.0)
    (2.0, None)
    """

    base_s: float
    cap_s: float = math.inf
    multiplier: float = 2.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        # `not x >= 0` also refuses NaN.
        if not (self.base_s >= 0 and self.cap_s >= 0 and self.multiplier >= 1 and 0 <= self.jitter <= 1):
            raise UserError(BAD_BACKOFF.format(policy=self))

    @overload
    def delay(self, attempt: int, *, retry_after: None = None, rng: Callable[[], float] = ...) -> float: ...
    @overload
    def delay(
        self, attempt: int, *, retry_after: float | None, rng: Callable[[], float] = ...
    ) -> float | None: ...

    def delay(
        self, attempt: int, *, retry_after: float | None = None, rng: Callable[[], float] = random.random
    ) -> float | None:
        """Seconds to wait after failed try number `attempt` (from 1), or None when the server asks
        for longer than `cap_s`."""
        if retry_after is not None:
            asked = max(0.0, retry_after)
            return asked if asked <= self.cap_s else None
        try:
            grown = self.base_s * self.multiplier ** max(0, attempt - 1)
        except OverflowError:
            grown = math.inf if self.base_s else 0.0
        return min(self.cap_s, grown) * (1.0 - self.jitter * rng())


def retry_after(source: object) -> float | None:
    """The wait in seconds a response asks for: `retry-after-ms`, else `Retry-After` as seconds or
    an HTTP date; never negative, not capped; None when it asks for none (or says nothing readable).

    `source` is an exception carrying `.response.headers` (openai, `httpx.HTTPStatusError`), a
    response with `.headers`, or a headers mapping.

    >>> import httpx
    >>> request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    >>> reply = httpx.Response(429, headers={"Retry-After": "2"}, request=request)
    >>> retry_after(httpx.HTTPStatusError("429", request=request, response=reply))
    2.0
    >>> retry_after({"retry-after-ms": "1500", "Retry-After": "9"}), retry_after({"Retry-After": "soon"})
    (1.5, None)
    """
    headers = _headers(source)
    if headers is None:
        return None
    millis = _seconds(headers.get("retry-after-ms", ""))
    if millis is not None:
        return millis / 1000
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": an HTTP date is always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def _headers(source: object) -> dict[str, str] | None:
    """The headers of `source`, keys lower-cased; None when it has none."""
    if not isinstance(source, Mapping):
        response = getattr(source, "response", None)
        source = getattr(response if response is not None else source, "headers", None)
    if not isinstance(source, Mapping):
        return None
    return {str(key).lower(): str(value) for key, value in source.items()}


def _seconds(text: str) -> float | None:
    """A finite number of seconds, at least 0; None when `text` is not one."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return max(0.0, value) if math.isfinite(value) else None
