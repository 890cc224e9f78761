"""Who is acting: the signed-in principal of a run, and the names no principal may take.

A served run's identity is the user LangGraph server authenticated (`langgraph_auth_user` in the
run's `config["configurable"]`, set by the server after the request is read, so no request field
can name it). In process there is no server: the caller names the user under `IDENTITY_KEY`,
`config={"configurable": {"keelgraph_user": "ada"}}`, and a run without it has no identity. A tool
argument that names the acting principal is bound to the identity (`with_policy(tool,
from_identity={"customer_id": customer_of})`): it is set from the identity whatever the request or
the model sent, and the model is never asked for it.

Subjects are checked wherever an identity is made: not empty, no spaces or control characters, and
none of keelgraph's own store roots (`RESERVED_ROOTS`, and any name starting with "keelgraph"), so
no user's store namespace can reach what keelgraph keeps for itself (`INTERNAL_ROOT`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keelgraph.contracts.errors import UserError

__all__ = [
    "IDENTITY_KEY",
    "INTERNAL_ROOT",
    "MAX_SUBJECT_CHARS",
    "RESERVED_ROOTS",
    "SERVER_PERMISSIONS_KEY",
    "SERVER_USER_KEY",
    "Identity",
    "IdentityRequired",
    "identity_from_config",
    "namespace_label",
    "no_identity",
    "not_mapped",
    "subject_problem",
]

IDENTITY_KEY = "keelgraph_user"
"""Where an in-process caller names the acting user: `config["configurable"]["keelgraph_user"]`,
a subject (`"ada"`), an `Identity`, or `{"identity": ..., "permissions": [...], "claims": {...}}`.
Ignored in a served run (the server's authenticated user counts), and refused by keelgraph's auth
in any request."""
SERVER_USER_KEY = "langgraph_auth_user"
"""Where LangGraph server puts the authenticated user of a run (in `config["configurable"]`)."""
SERVER_PERMISSIONS_KEY = "langgraph_auth_permissions"
INTERNAL_ROOT = "keelgraph"
"""The first label of every store namespace keelgraph writes for itself: thread archives
(`keelgraph.graphs.history.archive_namespace`) and long-term memories (`memory_namespace`)."""
RESERVED_ROOTS = frozenset({INTERNAL_ROOT, "archive", "memory"})
"""Subjects no user may have (compared case-insensitively; any name starting with "keelgraph" too):
a user's store namespaces start with their subject, so no subject may look like one of the roots
keelgraph keeps its own data under, now (`INTERNAL_ROOT`) or before (`("archive", ...)`)."""
MAX_SUBJECT_CHARS = 200

NO_IDENTITY = (
    "{tool} takes {args} from the signed-in user, and this run has none: serve the graph behind "
    "keelgraph's auth, or in process pass config={{'configurable': {{'{key}': <user>}}}}"
)
NOT_MAPPED = (
    "the signed-in user {subject!r} has no {arg} for {tool}: map the user to one "
    "(the deployment's `from_identity` mapping returned none{why})"
)


def subject_problem(subject: object) -> str | None:
    """Why `subject` cannot be a user's identity, or None when it can.

    >>> subject_problem("alice@example.com") is None
    True
    >>> subject_problem("")
    'it is empty'
    >>> subject_problem("KeelGraph-admin")
    'names starting with "keelgraph" are reserved for keelgraph itself'
    """
    if not isinstance(subject, str):
        return f"it is a {type(subject).__name__}, not text"
    if not subject:
        return "it is empty"
    if len(subject) > MAX_SUBJECT_CHARS:
        return f"it is longer than {MAX_SUBJECT_CHARS} characters"
    if any(c.isspace() or unicodedata.category(c) in {"Cc", "Cf", "Cs"} for c in subject):
        return "it holds spaces or control characters"
    folded = subject.casefold()
    if folded.startswith(INTERNAL_ROOT):
        return f'names starting with "{INTERNAL_ROOT}" are reserved for keelgraph itself'
    if folded in RESERVED_ROOTS:
        return f"{subject!r} is reserved: it names one of keelgraph's store roots"
    return None


def namespace_label(subject: str | int) -> str:
    """`subject` as one label of a store namespace: LangGraph stores refuse labels with a period,
    so "%" and "." are percent-encoded (one label per subject, never two subjects per label).

    >>> namespace_label("ada@example.com")
    'ada@example%2Ecom'
    """
    return str(subject).replace("%", "%25").replace(".", "%2E")


@dataclass(frozen=True)
class Identity:
    """The signed-in principal of a run: who is acting, and what they may do.

    >>> Identity.of({"identity": "ada", "permissions": ["approve"]}).permissions
    ('approve',)
    """

    subject: str
    """The user's id: the token file's user, or the JWT's `sub`."""
    permissions: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """What the identity provider said about the user besides (the JWT's claims; empty for tokens
    from the token file): a deployment may map a claim (say `customer_id`) to its own principal."""

    def __post_init__(self) -> None:
        if why := subject_problem(self.subject):
            raise IdentityRequired(f"{self.subject!r} cannot be a user's identity: {why}")

    @classmethod
    def of(cls, value: Any, permissions: Any = None) -> Identity:
        """An identity from a subject, an `Identity`, a mapping with `identity` (what keelgraph's
        auth returns), or a LangGraph server user (anything with an `identity` attribute)."""
        if isinstance(value, Identity):
            return value
        if isinstance(value, str):
            return cls(value, _texts(permissions))
        data = _as_mapping(value)
        subject = data.get("identity", data.get("subject", getattr(value, "identity", None)))
        if subject is None:
            raise IdentityRequired(
                f"{IDENTITY_KEY} must be a user id, an Identity or a mapping with 'identity', "
                f"got {type(value).__name__}"
            )
        claims = data.get("claims")
        return cls(
            subject,
            _texts(data.get("permissions", ()) if permissions is None else permissions),
            dict(claims) if isinstance(claims, Mapping) else {},
        )

    def can(self, permission: str) -> bool:
        """Whether the identity holds `permission`."""
        return permission in self.permissions


class IdentityRequired(UserError, ValueError):
    """A tool argument is bound to the signed-in user, and the run has no usable one (no identity,
    an invalid one, or one the deployment's mapping does not know). Nothing was run.

    Also a `ValueError`: LangGraph server shows a served run's error text to the caller only for
    built-in error types (others read "An internal error occurred"), and this one says what to do.
    """

    code = "identity_required"


def _as_mapping(value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    dump = getattr(value, "dict", None)  # LangGraph server's ProxyUser
    if callable(dump):
        found = dump()
        if isinstance(found, Mapping):
            return found
    return {}


def _texts(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(str(v) for v in value)
    return ()


def identity_from_config(config: Mapping[str, Any] | None) -> Identity | None:
    """The identity of the run with this config, or None.

    A run whose config carries the server's user key is served: only the server's authenticated
    user counts (None when it has none), and `IDENTITY_KEY` is ignored. Otherwise `IDENTITY_KEY`.

    >>> identity_from_config({"configurable": {"keelgraph_user": "ada"}}).subject
    'ada'
    >>> identity_from_config({"configurable": {"langgraph_auth_user": None, "keelgraph_user": "ada"}}) is None
    True
    """
    configurable = (config or {}).get("configurable") or {}
    if SERVER_USER_KEY in configurable:
        user = configurable[SERVER_USER_KEY]
        if user is None:
            return None
        return Identity.of(user, configurable.get(SERVER_PERMISSIONS_KEY))
    value = configurable.get(IDENTITY_KEY)
    return None if value is None else Identity.of(value)


def no_identity(tool: str, args: list[str]) -> IdentityRequired:
    """The error of a tool bound to the identity, called in a run that has none."""
    return IdentityRequired(NO_IDENTITY.format(tool=tool, args=", ".join(args), key=IDENTITY_KEY))


def not_mapped(tool: str, arg: str, identity: Identity, why: str = "") -> IdentityRequired:
    """The error of an identity that the deployment's mapping gives no value for `arg`."""
    return IdentityRequired(
        NOT_MAPPED.format(subject=identity.subject, arg=arg, tool=tool, why=f": {why}" if why else "")
    )
