"""Who may use a served graph, and which threads are theirs (LangGraph server's custom auth).

`langgraph.json` points at `keelgraph.serving.auth:auth` (as `./keel/auth.py:auth`). Every request must carry
`Authorization: Bearer <token>`; the token is checked against one of two sources, configured by
environment variables on the server:

- **a token file** (`KEELGRAPH_AUTH_TOKENS`, default `$KEELGRAPH_DATA_DIR/tokens.json`): users and
  the SHA-256 of their tokens, managed with `keelgraph token create|list|revoke`. Only hashes are
  stored; the file is re-read when it changes, so new and revoked tokens apply without a restart.
- **JWTs from your identity provider**: `KEELGRAPH_AUTH_JWT_SECRET` (HS256), or
  `KEELGRAPH_AUTH_JWT_PUBLIC_KEY` (a PEM file; RS256/ES256), or `KEELGRAPH_AUTH_JWKS_URL` (the
  provider's key set), with optional `KEELGRAPH_AUTH_JWT_ISSUER` / `KEELGRAPH_AUTH_JWT_AUDIENCE`.
  The user is the `sub` claim; permissions come from `permissions` (a list) or `scope` (words).

Authorisation is deny-by-default. Threads, runs and crons are stamped with their owner
(`metadata.owner`) when created and filtered by it on every read, search, update, delete and run:
another user's thread answers 404 and never appears in a listing. The graphs (assistants) are
readable by every signed-in user; changing them needs the `assistants:write` permission. Store
namespaces are scoped under the user's identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langgraph_sdk import Auth

from keelgraph.contracts.errors import UserError

__all__ = [
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
_PREFIX = "kg_"
_JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA")


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
        """Issue a new token for `user` and return it: it is shown once and stored only as a hash."""
        user = user.strip()
        if not user or len(user) > 200 or any(c.isspace() for c in user):
            raise UserError(f"user {user!r} must be 1-200 characters without spaces")
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


class _CachedTokens:
    """The token file, re-read only when its modification time or size changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, int, int] | None = None
        self._by_hash: dict[str, tuple[str, tuple[str, ...]]] = {}

    def lookup(self, path: Path, token: str) -> tuple[str, tuple[str, ...]] | None:
        try:
            stat = path.stat()
            key = (str(path), stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            return None
        with self._lock:
            if key != self._key:
                entries = TokenFile(path)._read()
                self._by_hash = {
                    str(e.get("sha256")): (str(e.get("user")), tuple(e.get("permissions", ())))
                    for e in entries
                }
                self._key = key
            return self._by_hash.get(hash_token(token))


_TOKENS = _CachedTokens()
_JWKS: dict[str, Any] = {}


def _unauthorized(detail: str) -> Auth.exceptions.HTTPException:
    return Auth.exceptions.HTTPException(
        status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def _jwt_user(token: str, env: Mapping[str, str]) -> tuple[str, tuple[str, ...]] | None:
    """Verify a JWT with the configured key; None when no JWT key is configured."""
    import jwt

    secret = env.get("KEELGRAPH_AUTH_JWT_SECRET")
    public_key = env.get("KEELGRAPH_AUTH_JWT_PUBLIC_KEY")
    jwks_url = env.get("KEELGRAPH_AUTH_JWKS_URL")
    if not (secret or public_key or jwks_url):
        return None
    options: jwt.types.Options = {"require": ["sub", "exp"]}
    kwargs: dict[str, Any] = {
        "issuer": env.get("KEELGRAPH_AUTH_JWT_ISSUER") or None,
        "audience": env.get("KEELGRAPH_AUTH_JWT_AUDIENCE") or None,
        "leeway": 30,
    }
    if not kwargs["audience"]:
        options["verify_aud"] = False
    key: Any
    if secret:
        key, algorithms = secret, ["HS256", "HS384", "HS512"]
    elif public_key:
        key, algorithms = Path(public_key).read_text(), list(_JWT_ALGORITHMS)
    else:
        client = _JWKS.get(str(jwks_url))
        if client is None:
            client = _JWKS.setdefault(str(jwks_url), jwt.PyJWKClient(str(jwks_url), cache_keys=True))
        key, algorithms = client.get_signing_key_from_jwt(token).key, list(_JWT_ALGORITHMS)
    try:
        claims = jwt.decode(token, key, algorithms=algorithms, options=options, **kwargs)
    except jwt.ExpiredSignatureError:
        raise _unauthorized("the token has expired: get a new one from your identity provider") from None
    except jwt.InvalidTokenError as exc:
        raise _unauthorized(f"the token is not valid here ({exc})") from None
    raw = claims.get("permissions")
    permissions = [str(p) for p in raw] if isinstance(raw, list) else str(claims.get("scope", "")).split()
    return str(claims["sub"]), tuple(permissions)


auth = Auth()
"""The server's auth object: `"auth": {"path": "./keel/auth.py:auth"}` in langgraph.json."""


@auth.authenticate  # type: ignore[type-var]  # a sync authenticator: the server runs it in a thread
def authenticate(authorization: str | None) -> Auth.types.MinimalUserDict:
    """Map `Authorization: Bearer <token>` to a user, or refuse the request with 401."""
    if not authorization:
        raise _unauthorized("missing 'Authorization: Bearer <token>' header")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("the Authorization header must be 'Bearer <token>'")
    env = os.environ
    found = None
    if token.startswith(_PREFIX):
        found = _TOKENS.lookup(token_file_path(env), token)
    elif token.count(".") == 2:
        found = _jwt_user(token, env)
    if found is None:
        raise _unauthorized("unknown token: ask your administrator for one (`keelgraph token create USER`)")
    user, permissions = found
    return {"identity": user, "permissions": [*permissions, "authenticated"]}


def _identity(ctx: Auth.types.AuthContext) -> str:
    return str(ctx.user.identity)


@auth.on
async def _deny_unlisted(ctx: Auth.types.AuthContext, value: Any) -> bool:
    """Anything without a rule below is refused (403)."""
    return False


@auth.on(resources=["threads", "crons"])
async def _owned(ctx: Auth.types.AuthContext, value: Any) -> Auth.types.FilterType:
    """Stamp the owner on what is created; see and touch only what is yours."""
    owner = _identity(ctx)
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
    if ADMIN_ASSISTANTS in ctx.permissions:
        return True
    raise Auth.exceptions.HTTPException(
        status_code=403, detail=f"changing assistants needs the {ADMIN_ASSISTANTS!r} permission"
    )


@auth.on.store()
async def _own_namespace(ctx: Auth.types.AuthContext, value: Any) -> bool:
    """Every store namespace a user names is placed under their identity."""
    owner = _identity(ctx)
    namespace = tuple(value.get("namespace") or ())
    if namespace[:1] != (owner,):
        value["namespace"] = (owner, *namespace)
    return True
