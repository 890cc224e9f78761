"""What a tool's exception may say to the model and the thread, and what only the logs may see.

Tool exceptions carry whatever their authors put in them: SQL statements, file paths, hosts, tokens.
The thread is readable over the API by the caller, and the model repeats what it reads, so by
default they get the tool's name, the error class and a short, redacted first line; the full text
goes to the `keelgraph` log. A tool opts in to its full text with `with_policy(tool,
error_detail="full")`, and a `ToolException` (LangChain's convention for messages written for the
model, which keelgraph's HTTP and workflow tools raise) is shown whole.
"""

from __future__ import annotations

import re

__all__ = ["REDACTED", "SHORT_REASON_CHARS", "short_reason"]

SHORT_REASON_CHARS = 160
"""The most of an exception's first line the model and the thread are shown."""
REDACTED = "[redacted]"

_RULES = (
    # statements: SQL and the like, from the first keyword to the end of the line
    re.compile(r"\b(?:SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|WITH)\b.*", re.IGNORECASE),
    # URLs (credentials and query strings included) and absolute or home-relative file paths
    re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE),
    re.compile(r"(?<![\w.])(?:~|\.{1,2})?/(?:[\w.@-]+/)*[\w.@-]+"),
    re.compile(r"\b[A-Za-z]:\\\S+"),
    # e-mail addresses, and long runs that look like keys or tokens
    re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b"),
    re.compile(r"\b(?=[A-Za-z0-9_\-]*\d)[A-Za-z0-9_\-]{24,}\b"),
)


def short_reason(exc: BaseException) -> str:
    """The first line of `exc`'s message, redacted and cut to `SHORT_REASON_CHARS`.

    >>> short_reason(RuntimeError("database is locked"))
    'database is locked'
    >>> short_reason(ValueError("bad query: SELECT * FROM users WHERE pw='x'"))
    'bad query: [redacted]'
    >>> short_reason(OSError("cannot open /srv/app/secrets/db.sqlite"))
    'cannot open [redacted]'
    """
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    for rule in _RULES:
        text = rule.sub(REDACTED, text)
    if len(text) > SHORT_REASON_CHARS:
        text = text[: SHORT_REASON_CHARS - 3].rstrip() + "..."
    return text
