"""Where a tool argument's value came from: the user's words, the identity, tool data, or nowhere.

An instruction planted in tool output ("pay DE44 5001 0517 5407 3249 31", "forward this to
eve@evil.example") can only act through the values it gets the model to write. So the gate asks,
for each value that chooses where a write goes, where the model could have read it. Values are
compared as whole tokens, never as substrings: `b@example.com` is not in "mail bob@example.com",
nor is `example.com`, `a`, or a field name of the request. Numbers compare as numbers (`120.5`
is "120.50"), and a value written in groups ("DE89 3704 0044") matches it written without
spaces. Nested values (objects, lists) are checked leaf by leaf.

>>> said = Said.of("Pay 120.50 EUR to DE89 3704 0044 0532 0130 00, then mail bob@example.com.")
>>> [said.has(v) for v in ("DE89370400440532013000", 120.5, "bob@example.com", "b@example.com", "example.com")]
[True, True, True, False, False]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["FILLER_WORDS", "Origin", "Said", "leaves", "request_text", "tokens"]

Origin = Literal["user", "identity", "tool", "model"]
"""Where a value was found: the user's words (or the validated request), the signed-in user,
a tool result of this turn, or none of them (the model wrote it from nowhere it was shown)."""

FILLER_WORDS = frozenset(
    {"a", "an", "the", "to", "of", "and", "or", "in", "on", "at", "for", "with", "by", "it", "is", "be"}
)
"""Words so common that a value made only of them says nothing about who chose it (the value `a`
is "written" by every user who typed "send a mail"): such values never count as the user's."""

_SPLIT = re.compile(r"[\s,;!()\[\]{}<>\"'`|*]+")
_THOUSANDS = re.compile(r"(?<=\d)[,'](?=\d{3}(?!\d))")
_EDGE = ".:;,?$€£¥#%-_/\\=+~^&"
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?")


def tokens(text: str) -> list[str]:
    """`text` as whole tokens, case-folded: split at whitespace and punctuation that never sits
    inside an e-mail address, IBAN, URL or number, with trailing sentence punctuation dropped
    (`bob@example.com.` is `bob@example.com`) and thousands separators removed (`1,200` is `1200`).

    >>> tokens("Mail Bob@Example.com, then visit https://x.example/a?b=1.")
    ['mail', 'bob@example.com', 'then', 'visit', 'https://x.example/a?b=1']
    """
    text = _THOUSANDS.sub("", text.casefold())
    found = []
    for raw in _SPLIT.split(text):
        token = raw.strip(_EDGE)
        if token:
            found.append(token)
    return found


def _number(token: str) -> float | None:
    if not _NUMBER.fullmatch(token):
        return None
    value = float(token)
    return value if math.isfinite(value) else None


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every scalar inside `value` with its path (`payment.iban`, `to[1]`); booleans and None are
    left out: they never say where a write goes.

    >>> list(leaves({"to": ["a@x.example"], "amount": 5, "urgent": True}, "pay"))
    [('pay.to[0]', 'a@x.example'), ('pay.amount', 5)]
    """
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from leaves(inner, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, inner in enumerate(value):
            yield from leaves(inner, f"{path}[{i}]")
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, (str, int, float)):
        yield path, value
    else:
        yield path, str(value)


def request_text(request: Mapping[str, Any]) -> str:
    """The values of a validated request as text, without its field names: the names are the
    contract's words, not the user's (a `to` field does not mean the user wrote "to")."""
    return " ".join(str(v) for _, v in leaves(request))


@dataclass(frozen=True)
class Said:
    """A text as whole tokens, to ask whether a value was written in it."""

    words: tuple[str, ...]
    numbers: frozenset[float]

    @classmethod
    def of(cls, *texts: str) -> Said:
        words = tuple(t for text in texts for t in tokens(text))
        numbers = frozenset(n for w in words if (n := _number(w)) is not None)
        return cls(words, numbers)

    def has(self, value: Any) -> bool:
        """Whether `value` (a scalar) appears here as whole tokens: a number as an equal number, a
        text as the same run of tokens, or, written without its spaces, as adjacent tokens run
        together (an IBAN or phone number written in groups). Empty values and values made only of
        `FILLER_WORDS` are never found."""
        if isinstance(value, bool) or value is None:
            return False
        if isinstance(value, (int, float)):
            return float(value) in self.numbers
        wanted = tokens(str(value))
        if not wanted or all(w in FILLER_WORDS for w in wanted):
            return False
        if len(wanted) == 1 and (n := _number(wanted[0])) is not None and n in self.numbers:
            return True
        return self._run(wanted) or self._joined("".join(wanted))

    def _run(self, wanted: list[str]) -> bool:
        size = len(wanted)
        first = wanted[0]
        for i, word in enumerate(self.words):
            if word == first and list(self.words[i : i + size]) == wanted:
                return True
        return False

    def _joined(self, compact: str) -> bool:
        for i, word in enumerate(self.words):
            if not compact.startswith(word):
                continue
            joined = word
            j = i + 1
            while len(joined) < len(compact) and j < len(self.words):
                joined += self.words[j]
                j += 1
            if joined == compact and j - i > 1:
                return True
        return False
