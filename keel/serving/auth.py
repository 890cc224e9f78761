"""Who may use a served graph, and which threads are theirs (LangGraph server's custom auth).

`langgraph.json` points at `keelgraph.serving.auth:auth`. Every request must carry
`Authorization: Bearer <token>`; the token is checked against one of two sources, configured by
environment variables on the server:

- **a token file** (`KEELGRAPH_AUTH_TOKENS`, default `$KEELGRAPH_DATA_DIR/tokens.json`): users and
  the SHA-256 of their tokens, managed with `keelgraph token create|list|revoke`. Only hashes are
  stored; the file is re-read when it changes, so new and revoked tokens apply without a restart.
- **JWTs from your identity provider**: `KEELGRAPH_AUTH_JWT_SECRET` (HS256), or
  `KEELGRAPH_AUTH_JWT_PUBLIC_KEY` (a PEM file; RS256/ES256), or `KEELGRAPH_AUTH_JWKS_URL` (the
  provider's key set), with optional `KEELGRAPH_AUTH_JWT_ISSUER` / `KEELGRAPH_AUTH_JWT_AUDIENCE`.
  The user is the `sub` claim; permissions come from `permissions` (a list) or `scope` (words).

Failing closed without failing over: every bad token (missing, malformed, unknown, forged, expired,
for another issuer or audience, signed by an unknown key, for an empty or reserved user) is 401
with what to do, never 500. A fault of the server's own (a token file that is no longer valid
JSON, an unreadable key file, an identity provider whose key set cannot be fetched) is 503: a token
file broken by a hand edit keeps the last good set of tokens (logged once, as an error), and only
with no good set yet are requests refused with 503.

Authorisation is deny-by-default. Threads, runs and crons are stamped with their owner
(`metadata.owner`) when created and filtered by it on every read, search, update, delete and run:
another user's thread answers 404 and never appears in a listing. A run never names its user (a
request carrying `keelgraph_user` is refused): the graph reads the server's authenticated user
(`keelgraph.tools.identity`). Resuming an interrupt (any run with a `command`) and writing a
thread's state directly need the `approve` permission. The graphs (assistants) are readable by
every signed-in user; changing them needs `assistants:write`. Store namespaces are placed under
the user's identity; keelgraph's own (archives, memories) live under a root no user can take.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from langgraph_sdk import Auth

from keelgraph.contracts.errors import UserError
from keelgraph.tools.identity import IDENTITY_KEY, namespace_label, subject_problem

__all__ = [
    "ADMIN_ASSISTANTS",
    "APPROVE",
    "OWNER",
    "TokenFile",
    "TokenInfo",
    "auth",
    "authenticate",
    "hash_token",
    "token_file_path",
]

OWNER = "owner"
"""The metadata key that holds a thread's (run's, cron's) owner."""
ADMIN_ASSISTANTS = "assistants:write"
APPROVE = "approve"
"""The permission to resume an interrupt (a person's decision on a tool call) or write a thread's
state directly: `keelgraph token create USER --permission approve`, or in the JWT's permissions."""
_PREFIX = "kg_"
_JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA")
_REGISTERED = frozenset({"sub", "iss", "aud", "exp", "iat", "nbf", "jti", "permissions", "scope"})
JWKS_TIMEOUT_S = 5.0
RETRY_AFTER_S = 30
_log = logging.getLogger("keelgraph")

MISSING = "missing 'Authorization: Bearer <token>' header"
NOT_BEARER = "the Authorization header must be 'Bearer <token>'"
UNKNOWN = "unknown token: ask your administrator for one (`keelgraph token create USER`)"
EXPIRED = "the token has expired: get a new one from your identity provider"
INVALID = "the token is not valid here ({why}): get a new one from your identity provider"
UNKNOWN_KEY = (
    "the token is signed by a key the identity provider does not list ({why}): get a new token "
    "from your identity provider"
)
BAD_SUBJECT = "the token's user {user!r} cannot sign in here ({why}): ask your administrator for another"
UNAVAILABLE = "sign-in is unavailable: {why}; try again later (an administrator must fix the server)"
TOKEN_FILE_BROKEN = "the server's token file cannot be read"
KEY_FILE_BROKEN = "the server's JWT public key cannot be read"
JWKS_DOWN = "the identity provider's key set cannot be fetched"
NAMES_IDENTITY = (
    f"a request cannot name the acting user ({IDENTITY_KEY!r}): the graph acts for the user of "
    "your token; remove it"
)
NEEDS_APPROVE = (
    "{what} needs the {permission!r} permission: ask an administrator, or someone who has it, to "
    "decide (`keelgraph token create USER --permission approve`)"
)


def hash_token(token: str) -> str:
    """The SHA-256 hex digest of a token: what the token file stores instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_file_path(env: Mapping[str, str] | None = None) -> Path:
    """`KEELGRAPH_AUTH_TOKENS`, else `tokens.json` in keelgraph's data directory."""
    env = os.environ if env is None else env
    if env.get("KEELGRAPH_AUTH_TOKENS"):
        return Path(env["KEELGRAPH_AUTH_TOKENS"])
    from keelgraph.settings import Settings

    return Settings.from_env(env).data_dir / "tokens.json"


@dataclass(frozen=True)
class TokenInfo:
    """One issued token, as listed (never the token itself)."""

    user: str
    token_id: str
    """The first 12 hex digits of the token's hash: names the token for `revoke`."""
    permissions: tuple[str, ...]
    created_at: str
    label: str


class TokenFile:
    """Users' bearer tokens, stored as SHA-256 hashes in a JSON file (mode 0600).

    >>> import tempfile
    >>> tokens = TokenFile(Path(tempfile.mkdtemp()) / "tokens.json")
    >>> token = tokens.create("alice")
    >>> tokens.lookup(token)[0], tokens.lookup("kg_wrong")
    ('alice', None)
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            entries = data["tokens"]
            if not isinstance(entries, list):
                raise TypeError("'tokens' is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"{self.path} is not a keelgraph token file ({exc}): fix it or move it away "
                "and create tokens again with `keelgraph token create USER`"
            ) from None
        return [e for e in entries if isinstance(e, dict)]

    def _write(self, entries: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"version": 1, "tokens": entries}, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    def create(self, user: str, *, permissions: Sequence[str] = (), label: str = "") -> str:
        """Issue a new token for `user` and return it: it is shown once and stored only as a hash.
        Empty and reserved user names are refused (`keelgraph.tools.identity.subject_problem`)."""
        user = user.strip()
        if why := subject_problem(user):
            raise UserError(
                f"user {user!r} cannot have a token: {why}; a user is 1-200 characters without "
                "spaces, and not one of keelgraph's reserved names"
            )
        token = _PREFIX + secrets.token_urlsafe(32)
        entries = self._read()
        entries.append(
            {
                "user": user,
                "sha256": hash_token(token),
                "permissions": sorted(set(permissions)),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "label": label,
            }
        )
        self._write(entries)
        return token

    def list(self) -> list[TokenInfo]:
        return [
            TokenInfo(
                user=str(e.get("user", "")),
                token_id=str(e.get("sha256", ""))[:12],
                permissions=tuple(e.get("permissions", ())),
                created_at=str(e.get("created_at", "")),
                label=str(e.get("label", "")),
            )
            for e in self._read()
        ]

    def revoke(self, user_or_id: str) -> int:
        """Remove every token of a user, or the one token whose id is given; returns how many."""
        entries = self._read()
        kept = [
            e
            for e in entries
            if e.get("user") != user_or_id and not str(e.get("sha256", "")).startswith(user_or_id or "-")
        ]
        if len(kept) != len(entries):
            self._write(kept)
        return len(entries) - len(kept)

    def lookup(self, token: str) -> tuple[str, tuple[str, ...]] | None:
        """The user and permissions a token belongs to, or None."""
        digest = hash_token(token)
        for entry in self._read():
            if secrets.compare_digest(str(entry.get("sha256", "")), digest):
                return str(entry["user"]), tuple(entry.get("permissions", ()))
        return None


def _by_hash(entries: list[dict[str, Any]]) -> dict[str, tuple[str, tuple[str, ...]]]:
    found = {}
    for entry in entries:
        digest, user, permissions = entry.get("sha256"), entry.get("user"), entry.get("permissions", [])
        if isinstance(digest, str) and isinstance(user, str) and isinstance(permissions, list):
            found[digest] = (user, tuple(str(p) for p in permissions))
    return found


class _ServerFault(Exception):
    """The server cannot check tokens now (its own fault, not the token's): answered 503."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _CachedTokens:
    """The token file, re-read only when its modification time or size changes.

    A file that cannot be read or parsed (a hand edit gone wrong) keeps the last good set in use,
    logged once as an error per broken version of the file; with no good set yet, lookups raise
    `_ServerFault` (the request is answered 503). A missing file holds no tokens.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, int, int] | None = None
        self._bad: tuple[str, int, int] | None = None
        self._by_hash: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._good = False

    def lookup(self, path: Path, token: str) -> tuple[str, tuple[str, ...]] | None:
        error: Exception | None = None
        try:
            stat = path.stat()
            key = (str(path), stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            return None
        except OSError as exc:
            key, error = (str(path), -1, -1), exc
        with self._lock:
            if error is None and key not in (self._key, self._bad):
                try:
                    self._by_hash = _by_hash(TokenFile(path)._read())
                    self._key, self._bad, self._good = key, None, True
                except (UserError, OSError) as exc:
                    error = exc
            if error is not None and key != self._bad:
                self._bad = key
                kept = "the last good set of tokens stays in use" if self._good else "requests get 503"
                _log.error(
                    "keelgraph auth: the token file %s cannot be read (%s); %s until it is fixed",
                    path,
                    error,
                    kept,
                )
            if key == self._bad and not self._good:
                raise _ServerFault(TOKEN_FILE_BROKEN)
            return self._by_hash.get(hash_token(token))


_TOKENS = _CachedTokens()
_JWKS: dict[str, Any] = {}
_LOGGED: set[str] = set()


def _unauthorized(detail: str) -> NoReturn:
    raise Auth.exceptions.HTTPException(
        status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def _unavailable(why: str) -> NoReturn:
    raise _ServerFault(why)


def _answer_503(fault: _ServerFault) -> Exception:
    """The 503 answer: LangGraph server turns only 401/403 from an authenticator into answers (and
    anything else into a 500), so this is Starlette's HTTPException, which it answers as it is."""
    from starlette.exceptions import HTTPException

    detail = UNAVAILABLE.format(why=fault.why)
    return HTTPException(status_code=503, detail=detail, headers={"Retry-After": str(RETRY_AFTER_S)})


def _jwks_client(url: str) -> Any:
    import jwt

    client = _JWKS.get(url)
    if client is None:
        try:
            made = jwt.PyJWKClient(url, cache_keys=True, timeout=JWKS_TIMEOUT_S)
        except jwt.PyJWKClientError as exc:  # a URL it cannot use: the server's setting, not the token
            _log_once("jwks-url", f"keelgraph auth: KEELGRAPH_AUTH_JWKS_URL={url!r}: {exc}")
            _unavailable(JWKS_DOWN)
        client = _JWKS.setdefault(url, made)
    return client


def _jwt_key(token: str, env: Mapping[str, str]) -> tuple[Any, list[str]]:
    """The key to verify `token` with, and the algorithms allowed with it."""
    if secret := env.get("KEELGRAPH_AUTH_JWT_SECRET"):
        return secret, ["HS256", "HS384", "HS512"]
    if public_key := env.get("KEELGRAPH_AUTH_JWT_PUBLIC_KEY"):
        try:
            return Path(public_key).read_text(), list(_JWT_ALGORITHMS)
        except (OSError, UnicodeDecodeError) as exc:
            _log_once("key-file", f"keelgraph auth: {public_key} cannot be read ({exc})")
            _unavailable(KEY_FILE_BROKEN)
    return _jwks_client(str(env.get("KEELGRAPH_AUTH_JWKS_URL"))).get_signing_key_from_jwt(token).key, list(
        _JWT_ALGORITHMS
    )


def _jwt_user(token: str, env: Mapping[str, str]) -> tuple[str, tuple[str, ...], dict[str, Any]] | None:
    """Verify a JWT with the configured key: its user, permissions and other claims; None when no
    JWT key is configured. Every fault of the token is 401, every fault of the server 503."""
    import jwt

    if not any(
        env.get(k)
        for k in ("KEELGRAPH_AUTH_JWT_SECRET", "KEELGRAPH_AUTH_JWT_PUBLIC_KEY", "KEELGRAPH_AUTH_JWKS_URL")
    ):
        return None
    options: jwt.types.Options = {"require": ["sub", "exp"]}
    kwargs: dict[str, Any] = {
        "issuer": env.get("KEELGRAPH_AUTH_JWT_ISSUER") or None,
        "audience": env.get("KEELGRAPH_AUTH_JWT_AUDIENCE") or None,
        "leeway": 30,
    }
    if not kwargs["audience"]:
        options["verify_aud"] = False
    try:
        key, algorithms = _jwt_key(token, env)
        claims = jwt.decode(token, key, algorithms=algorithms, options=options, **kwargs)
    except jwt.ExpiredSignatureError:
        _unauthorized(EXPIRED)
    except jwt.PyJWKClientConnectionError as exc:
        _log_once("jwks", f"keelgraph auth: {exc}")
        _unavailable(JWKS_DOWN)
    except jwt.PyJWKClientError as exc:
        _unauthorized(UNKNOWN_KEY.format(why=exc))
    except jwt.InvalidTokenError as exc:
        _unauthorized(INVALID.format(why=exc))
    except jwt.InvalidKeyError as exc:  # the token's algorithm does not fit the configured key
        _unauthorized(INVALID.format(why=exc))
    raw = claims.get("permissions")
    permissions = [str(p) for p in raw] if isinstance(raw, list) else str(claims.get("scope", "")).split()
    extra = {k: v for k, v in claims.items() if k not in _REGISTERED}
    return claims["sub"], tuple(permissions), extra


def _log_once(what: str, line: str) -> None:
    """Log a fault of the server's once per kind and text, not once per request."""
    if f"{what}:{line}" not in _LOGGED:
        _LOGGED.add(f"{what}:{line}")
        _log.error(line)


def _verify(token: str) -> tuple[str, tuple[str, ...], dict[str, Any]] | None:
    env = os.environ
    if token.startswith(_PREFIX):
        found = _TOKENS.lookup(token_file_path(env), token)
        return None if found is None else (*found, {})
    if token.count(".") == 2:
        return _jwt_user(token, env)
    return None


auth = Auth()
"""The server's auth object: `"auth": {"path": "keelgraph.serving.auth:auth"}` in langgraph.json."""


@auth.authenticate  # type: ignore[type-var]  # a sync authenticator: the server runs it in a thread
def authenticate(authorization: str | None) -> Auth.types.MinimalUserDict:
    """Map `Authorization: Bearer <token>` to a user, or refuse the request: 401 for a bad token,
    503 when the server cannot check tokens now (see the module's docstring)."""
    if not authorization:
        _unauthorized(MISSING)
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        _unauthorized(NOT_BEARER)
    try:
        found = _verify(token)
    except Auth.exceptions.HTTPException:
        raise
    except _ServerFault as fault:
        raise _answer_503(fault) from None
    except Exception as exc:  # a fault of the server's, not of the token: logged once, 503
        _log_once("unexpected", f"keelgraph auth: checking a token failed: {type(exc).__name__}: {exc}")
        raise _answer_503(_ServerFault("the server could not check the token")) from None
    if found is None:
        _unauthorized(UNKNOWN)
    user, permissions, claims = found
    if why := subject_problem(user):
        _unauthorized(BAD_SUBJECT.format(user=str(user)[:60], why=why))
    identity: Auth.types.MinimalUserDict = {"identity": user, "permissions": [*permissions, "authenticated"]}
    if claims:
        identity["claims"] = claims  # type: ignore[typeddict-unknown-key]
    return identity


def _identity(ctx: Auth.types.AuthContext) -> str:
    return str(ctx.user.identity)


_CARRIERS = frozenset({"kwargs", "payload", "config", "configurable", "context"})


def _names_identity(value: Any, depth: int = 0) -> bool:
    """Whether a request's run settings (config, context, a cron's payload) name the acting user."""
    if not isinstance(value, Mapping) or depth > 4:
        return False
    if IDENTITY_KEY in value:
        return True
    return any(_names_identity(v, depth + 1) for k, v in value.items() if k in _CARRIERS)


def _forbidden(detail: str) -> NoReturn:
    raise Auth.exceptions.HTTPException(status_code=403, detail=detail)


def _steers(value: Mapping[str, Any]) -> bool:
    """Whether a run carries a command (`Command(resume=..., update=..., goto=...)`)."""
    kwargs = value.get("kwargs")
    return isinstance(kwargs, Mapping) and bool(kwargs.get("command"))


def _writes_state(value: Mapping[str, Any]) -> bool:
    """Whether a thread update writes its state (`POST /threads/{id}/state`): LangGraph server
    describes it by the thread's id alone, where a metadata update or a cancel says more."""
    return set(value) <= {"thread_id"}


@auth.on
async def _deny_unlisted(ctx: Auth.types.AuthContext, value: Any) -> bool:
    """Anything without a rule below is refused (403)."""
    return False


@auth.on(resources=["threads", "crons"])
async def _owned(ctx: Auth.types.AuthContext, value: Any) -> Auth.types.FilterType:
    """Stamp the owner on what is created; see and touch only what is yours. A request may not
    name the acting user, and steering a run past a person's decision needs `approve`."""
    owner = _identity(ctx)
    if _names_identity(value):
        _forbidden(NAMES_IDENTITY)
    if ctx.resource == "threads" and isinstance(value, dict) and APPROVE not in ctx.permissions:
        if ctx.action == "create_run" and _steers(value):
            _forbidden(NEEDS_APPROVE.format(what="resuming a run (a command)", permission=APPROVE))
        if ctx.action == "update" and _writes_state(value):
            _forbidden(NEEDS_APPROVE.format(what="writing a thread's state", permission=APPROVE))
    if ctx.action in ("create", "create_run", "update") and isinstance(value, dict):
        metadata = value.get("metadata")
        if not isinstance(metadata, dict):
            metadata = value["metadata"] = {}
        metadata[OWNER] = owner  # in place (the server keeps this dict): no one claims another's owner
    return {OWNER: owner}


@auth.on.assistants.read
async def _read_assistant(ctx: Auth.types.AuthContext, value: Any) -> bool:
    return True


@auth.on.assistants.search
async def _search_assistants(ctx: Auth.types.AuthContext, value: Any) -> bool:
    return True


@auth.on(resources="assistants", actions=["create", "update", "delete"])
async def _change_assistant(ctx: Auth.types.AuthContext, value: Any) -> bool:
    if ADMIN_ASSISTANTS not in ctx.permissions:
        _forbidden(f"changing assistants needs the {ADMIN_ASSISTANTS!r} permission")
    if _names_identity(value):
        _forbidden(NAMES_IDENTITY)
    return True


@auth.on.store()
async def _own_namespace(ctx: Auth.types.AuthContext, value: Any) -> bool:
    """Every store namespace a user names is placed under their identity (as one store label), so
    no user reaches another's namespaces or keelgraph's own (`keelgraph.tools.identity`)."""
    owner = namespace_label(_identity(ctx))
    namespace = tuple(value.get("namespace") or ())
    if namespace[:1] != (owner,):
        value["namespace"] = (owner, *namespace)
    return True
