"""Helpers for checks that hold an answer to its source text: "copy it exactly" with a "did you mean".

A small model told only that a value "is not written in the e-mail" tends to write it again; told
what the e-mail does say ("'148 Park Avenue'"), it copies that. These helpers give a check the
closest span of the source, so its complaint is a correction the model can act on.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

__all__ = ["closest_span", "not_copied"]

_WORD = re.compile(r"\S+")
_EDGE = "\"'`,.;:!?()[]{}<>"


def _similarity(a: str, b: str) -> float:
    a, b = a.lower(), b.lower()
    in_order = SequenceMatcher(None, a, b, autojunk=False).ratio()
    as_sets = SequenceMatcher(
        None, " ".join(sorted(a.split())), " ".join(sorted(b.split())), autojunk=False
    ).ratio()
    return max(in_order, as_sets)


def closest_span(value: str, text: str, *, min_ratio: float = 0.6) -> str | None:
    """The run of whole words of `text` most like `value` (order and case aside), or None when
    nothing is at least `min_ratio` alike. Punctuation at the span's ends is left off.

    >>> closest_span("Park Avenue 148", "Please ship to 148 Park Avenue, 14433 Lisbon.")
    '148 Park Avenue'
    >>> closest_span("Lisboa", "Please ship to 148 Park Avenue, 14433 Lisbon.")
    'Lisbon'
    >>> closest_span("Tokyo", "Please ship to 148 Park Avenue.") is None
    True
    """
    words = list(_WORD.finditer(text))
    size = len(value.split()) or 1
    best: tuple[float, int, str] | None = None
    for start in range(len(words)):
        for n in (size, size - 1, size + 1):
            if n < 1 or start + n > len(words):
                continue
            span = text[words[start].start() : words[start + n - 1].end()].strip(_EDGE)
            if not span:
                continue
            score = (_similarity(value, span), -abs(n - size), span)
            if best is None or score[:2] > best[:2]:
                best = score
    if best is None or best[0] < min_ratio:
        return None
    return best[2]


def not_copied(field: str, value: str, text: str, *, source: str = "the text") -> str | None:
    """A check's complaint when `value` is not written in `text` (case aside), naming the field
    first (so a repair changes it alone) and the closest span of `text`; None when it is written.

    >>> not_copied("ship_to.city", "Lisboa", "Ship to 148 Park Avenue, 14433 Lisbon.", source="the e-mail")
    "ship_to.city 'Lisboa' is not written in the e-mail; copy it exactly as written: 'Lisbon'"
    >>> not_copied("ship_to.city", "lisbon", "Ship to 14433 Lisbon.") is None
    True
    """
    if value and value.lower() in text.lower():
        return None
    near = closest_span(value, text)
    hint = f"copy it exactly as written: {near!r}" if near else "copy it exactly as written"
    return f"{field} {value!r} is not written in {source}; {hint}"
